"""The engine's device programs, each a plain `jax.jit` over the model's split state with the page pool (and
slot state) donated, so every call updates them in place. Each call is given the page tables of the rows it
computes (`pages.py` decides them on the host):

* prefill: right-padded prompts through the model as one forward pass with the platform's flash attention
  (`Llama.prefill`), their keys and values written into their pages; the logits after each prompt.
* extend: a chunk of one prompt at positions start.. of its sequence, attending to what its pages hold and to
  itself (the model's cache path, read block by block): the rest of a long prompt, or what follows a cached
  prefix (whose pages the sequence shares).
* admit: each prefilled request's first token sampled; its slot takes the request's settings.
* decode: up to `MAX_STEPS` decode steps of the live slots in one device loop, each slot sampling with its own
  settings, key and step and stopping at its own stop ids or token budget; one program per row count (the
  first 1, 2, 4, ... slots), so that a step costs the slots in use, not all of them.

Admission and decode take a grammar mask per row (`allowed`, all ones for an unconstrained request): a
constrained request's token is sampled among the tokens its grammar allows next (`constraints.py`). Its next
mask depends on that token: the decode loop asks the host for the next masks after each step (`io_callback`,
the host's grammar follower numbered `follower`), or, with no follower (0: a multi-host job, where each process
would answer for its own rows), runs a single step. Every program takes an
adapter index per row (0: the base model), for an engine serving LoRA adapters (`adapters.py`).

`compiled.EnginePrograms` lays out the state they work on and compiles them; `slots.SlotBackend` holds that
state and calls them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import io_callback

from llama_jax.inference.constraints import masks_after
from llama_jax.inference.sampling import RowSampling, only_allowed, sample_rows
from llama_jax.inference.settings import MAX_STEPS
from llama_jax.kv_cache import CACHE_AXES, KERNEL_CACHE_AXES, SCALE_AXES, KVCache, write_layers
from llama_jax.sharding import shard

# Stop ids each slot checks on the device (a request's first ones: the tokenizer's, then its own). The host
# checks all of them; a slot that runs past a stop id beyond these only does work that is thrown away.
DEVICE_STOP_IDS = 8
LOGITS_AXES = ("batch", "vocab")  # a prefill's logits, as they pass to the admission program


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Pool:
    """The pages every sequence's keys and values live in (`kv_cache.py`'s layout), and each slot's length."""

    kv: jax.Array  # (layers, pages, 2, kv_heads, page_size, head_dim)
    scales: jax.Array | None  # int8 pools: (layers, pages, 2, kv_heads, page_size)
    lengths: jax.Array  # (slots,) positions each slot's sequence holds

    def cache(self, tables: jax.Array, lengths: jax.Array) -> KVCache:
        """The model's view: rows with page tables `tables` and lengths `lengths`."""
        return KVCache(self.kv, tables, lengths, self.scales)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """What the device keeps per slot between calls, besides the pool."""

    last: jax.Array  # (slots,) the token generated last: the next step's input
    step: jax.Array  # (slots,) tokens generated so far: the sampling step
    keys: jax.Array  # (slots,) each request's random key
    sampling: RowSampling
    max_tokens: jax.Array  # (slots,) the request's token budget
    stop_ids: jax.Array  # (slots, DEVICE_STOP_IDS) ids that end the request; -1 pads
    logprobs: jax.Array  # (slots,) bool: the request wants its tokens' log-probabilities
    live: jax.Array  # (slots,) bool: still generating (a stop id or the budget clears it)
    adapter: jax.Array  # (slots,) int32: the LoRA adapter of the slot's request (0: the base model)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Prompts:
    """A prefill call's prompts: `rows` of them right-padded, each with its slot and page table. A row whose
    slot is the slot count is padding: nothing of it is kept."""

    ids: jax.Array  # (rows, bucket) int32
    lengths: jax.Array  # (rows,) int32
    slots: jax.Array  # (rows,) int32
    tables: jax.Array  # (rows, pages_per_seq) int32
    adapters: jax.Array  # (rows,) int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Admission:
    """What the slots of a prefill call's requests take on: their settings, per row."""

    slots: jax.Array  # (rows,) int32, as the prompts'
    seeds: jax.Array  # (rows,) uint32
    streams: jax.Array  # (rows,) int32
    first_steps: jax.Array  # (rows,) int32: tokens the request generated before (a preempted one resuming)
    sampling: RowSampling
    max_tokens: jax.Array  # (rows,) int32
    stop_ids: jax.Array  # (rows, DEVICE_STOP_IDS) int32
    logprobs: jax.Array  # (rows,) bool
    allowed: jax.Array  # (rows, ceil(vocab / 32)) int32: each row's grammar mask of its first token
    adapters: jax.Array  # (rows,) int32


def _chosen_logprob(logits, token, wanted):
    """log p(token) = logit - logsumexp(logits) where `wanted`, else 0, computed only when some row wants it:
    over a 32,000-word vocabulary the logsumexp costs a few percent of a small model's decode step."""

    def compute(_):
        logits32 = logits.astype(jnp.float32)
        chosen = jnp.take_along_axis(logits32, token[:, None], axis=-1)[:, 0]
        return jnp.where(wanted, chosen - jax.nn.logsumexp(logits32, axis=-1), 0.0)

    return jax.lax.cond(jnp.any(wanted), compute, lambda _: jnp.zeros(token.shape, jnp.float32), None)


def _ends(token, step, stop_ids, max_tokens) -> jax.Array:
    """(rows,) True where `token`, a row's step-th (0-based), ends its request: a stop id, or the budget spent."""
    return jnp.any(token[:, None] == stop_ids, axis=-1) | (step + 1 >= max_tokens)


def _on_every_host(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """What the host reads (tokens, log-probabilities), replicated: every process of a multi-host job reads
    them whole from its own devices, and all of them make the same decisions from them. A few bytes per slot."""
    return tuple(shard(a, *(None,) * a.ndim) for a in arrays)


def _laid_out(pool: Pool | None = None, slots: SlotState | None = None) -> tuple:
    """The pool and slot state constrained to the layout they were created in (`compiled.state_shapes`): each
    program's outputs are the next one's inputs, whose compiled layouts must agree."""
    if pool is not None:
        scales = None if pool.scales is None else shard(pool.scales, *SCALE_AXES)
        axes = KERNEL_CACHE_AXES if pool.kv.ndim == 5 else CACHE_AXES
        pool = Pool(shard(pool.kv, *axes), scales, shard(pool.lengths, "batch"))
    if slots is not None:
        slots = jax.tree.map(lambda a: shard(a, "batch", *(None,) * (a.ndim - 1)), slots)
    return pool, slots


def _prefill(graphdef, state, pool: Pool, prompts: Prompts):
    """Prefill `prompts` into their slots' pages; the logits (rows, vocab) after each one's last token."""
    model = nnx.merge(graphdef, state)
    logits, (k, v) = model.prefill(prompts.ids, logits_at=(prompts.lengths - 1)[:, None], adapter_ids=prompts.adapters)
    # Padding rows write nothing (length 0 keeps no position).
    lengths = jnp.where(prompts.slots < pool.lengths.shape[0], prompts.lengths, 0)
    kv, scales = write_layers(pool.kv, pool.scales, k, v, prompts.tables, lengths)
    pool, _ = _laid_out(Pool(kv, scales, pool.lengths.at[prompts.slots].set(prompts.lengths, mode="drop")))
    return pool, shard(logits[:, 0], *LOGITS_AXES)


def _text_only(logits, text_vocab: int):
    """Logits with the model's rows past the tokenizer's last id (`text_vocab`; 0: none) never chosen: a
    vocabulary padded to a round size has embeddings that decode to nothing."""
    if not 0 < text_vocab < logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < text_vocab, logits, -jnp.inf)


def _admit(slots: SlotState, logits, admission: Admission, text_vocab: int = 0):
    """Each prefilled request's first token (and its log-probability), and its slot's new state. A request
    resuming after preemption samples its next token at the step it had reached, with its own key."""
    a = admission
    keys = jax.vmap(lambda seed, stream: jax.random.fold_in(jax.random.key(seed), stream))(a.seeds, a.streams)
    token = sample_rows(only_allowed(_text_only(logits, text_vocab), a.allowed), keys, a.first_steps, a.sampling)
    live = ~_ends(token, a.first_steps, a.stop_ids, a.max_tokens)
    new = SlotState(token, a.first_steps + 1, keys, a.sampling, a.max_tokens, a.stop_ids, a.logprobs, live, a.adapters)
    _, slots = _laid_out(slots=jax.tree.map(lambda old, value: old.at[a.slots].set(value, mode="drop"), slots, new))
    return slots, *_on_every_host(token, _chosen_logprob(logits, token, a.logprobs))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Decoding:
    """The decode loop's carry."""

    step: jax.Array  # int32: steps run so far in this call
    pool: Pool
    slots: SlotState
    tokens: jax.Array  # (slots, MAX_STEPS)
    logprobs: jax.Array  # (slots, MAX_STEPS)
    finished: jax.Array  # bool: some slot ended in this call
    allowed: jax.Array  # (slots, mask words): each slot's grammar mask of its next token


def _decode(
    graphdef,
    state,
    pool: Pool,
    slots: SlotState,
    tables,
    active,
    steps,
    stop_early,
    allowed,
    follower,
    block: int,
    rows: int,
    text_vocab: int = 0,
    follows: bool = False,
):
    """Up to `steps` decode steps of the `active` slots among the first `rows` — fewer once none is live, or
    when `stop_early` and one ends: the (rows, MAX_STEPS) tokens and log-probabilities, of which the first
    `steps run` columns are real, and that count. A slot constrained by a grammar samples under its mask
    (`allowed`: its first token's; the next ones from the host's `follower` after each step, or with no
    follower the call ends after one step; `follows` False leaves the host callback out of the program, for a
    platform this process has no devices of: `--compile-for`). The slots from `rows` on are left as they are.
    `tables` (slots, pages_per_seq): the pages of each slot, enough for these steps (the host saw to it)."""
    model = nnx.merge(graphdef, state)
    own = jax.tree.map(lambda a: a[:rows], slots)
    own = dataclasses.replace(own, live=own.live & active[:rows])
    tables, allowed = tables[:rows], allowed[:rows]
    constrained = jnp.any(allowed != -1)
    asks_host = constrained & (follower > 0) if follows else jnp.bool_(False)

    def running(d: _Decoding):
        one_step = constrained & ~asks_host & (d.step > 0)  # no follower: the host computes the next mask
        return (d.step < steps) & jnp.any(d.slots.live) & ~(stop_early & d.finished) & ~one_step

    def advance(d: _Decoding) -> _Decoding:
        s, lengths = d.slots, d.pool.lengths
        # Slots not generating (free, finished, or holding half a prompt) decode at position -1: they write
        # nothing, keep their length, and the pool is read only as far as the live requests reach.
        reading = d.pool.cache(tables, jnp.where(s.live, lengths, -1))
        logits, written = model(s.last[:, None], cache=reading, cache_block=block, adapter_ids=s.adapter)
        pool = Pool(written.kv, written.scales, jnp.where(s.live, written.lengths, lengths))
        logits = logits[:, 0]
        token = sample_rows(only_allowed(_text_only(logits, text_vocab), d.allowed), s.keys, s.step, s.sampling)
        ended = s.live & _ends(token, s.step, s.stop_ids, s.max_tokens)
        logprob = _chosen_logprob(logits, token, s.live & s.logprobs)

        def next_masks(_):
            shape = jax.ShapeDtypeStruct(d.allowed.shape, jnp.int32)
            return io_callback(masks_after, shape, follower, token, s.live & ~ended, ordered=False)

        masks = jax.lax.cond(asks_host, next_masks, lambda _: d.allowed, None) if follows else d.allowed
        s = dataclasses.replace(s, last=token, step=s.step + 1, live=s.live & ~ended)
        return _Decoding(
            d.step + 1,
            pool,
            s,
            jax.lax.dynamic_update_index_in_dim(d.tokens, token, d.step, axis=1),
            jax.lax.dynamic_update_index_in_dim(d.logprobs, logprob, d.step, axis=1),
            d.finished | jnp.any(ended),
            masks,
        )

    start = _Decoding(
        jnp.int32(0),
        Pool(pool.kv, pool.scales, pool.lengths[:rows]),
        own,
        jnp.zeros((rows, MAX_STEPS), jnp.int32),
        jnp.zeros((rows, MAX_STEPS), jnp.float32),
        jnp.bool_(False),
        allowed,
    )
    with jax.named_scope("decode"):
        end = jax.lax.while_loop(running, advance, start)
    lengths = pool.lengths.at[:rows].set(end.pool.lengths)
    slots = jax.tree.map(lambda whole, part: whole.at[:rows].set(part), slots, end.slots)
    pool, slots = _laid_out(Pool(end.pool.kv, end.pool.scales, lengths), slots)
    return pool, slots, *_on_every_host(end.tokens, end.logprobs), end.step


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Chunk:
    """An extend call's piece of one prompt: tokens at positions start.. of its slot's sequence, through its page
    table. A row whose slot is the slot count is padding."""

    ids: jax.Array  # (rows, bucket) int32, right-padded
    slots: jax.Array  # (rows,) int32
    starts: jax.Array  # (rows,) int32: the prompt tokens the sequence holds already
    lengths: jax.Array  # (rows,) int32: the chunk's real tokens
    tables: jax.Array  # (rows, pages_per_seq) int32
    adapters: jax.Array  # (rows,) int32


def _extend(graphdef, state, pool: Pool, chunk: Chunk, block: int):
    """Put `chunk` into its sequences' pages: its queries attend to what each sequence holds and to the chunk
    itself (the model's cache path, read `block` positions at a time), its keys and values are written after
    it. The logits after each row's last real token."""
    at = (chunk.lengths - 1)[:, None]
    held = pool.cache(chunk.tables, chunk.starts)
    model = nnx.merge(graphdef, state)
    logits, held = model(chunk.ids, cache=held, logits_at=at, cache_block=block, adapter_ids=chunk.adapters)
    lengths = pool.lengths.at[chunk.slots].set(chunk.starts + chunk.lengths, mode="drop")
    pool, _ = _laid_out(Pool(held.kv, held.scales, lengths))
    return pool, shard(logits[:, 0], *LOGITS_AXES)


prefill_program = jax.jit(_prefill, static_argnames=("graphdef",), donate_argnames=("pool",))
extend_program = jax.jit(_extend, static_argnames=("graphdef", "block"), donate_argnames=("pool",))
admit_program = jax.jit(_admit, static_argnames=("text_vocab",), donate_argnames=("slots",))
decode_program = jax.jit(
    _decode, static_argnames=("graphdef", "block", "rows", "text_vocab", "follows"), donate_argnames=("pool", "slots")
)
