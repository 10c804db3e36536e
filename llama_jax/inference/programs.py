"""The engine's device programs, each a plain `jax.jit` over the model's split state with the cache (and slot
state, and prefix pool) donated, so every call updates them in place:

* prefill: right-padded prompts through the model as one forward pass with the platform's flash attention
  (`Llama.prefill`), their keys and values copied into their slots; the logits after each prompt.
* extend: a chunk of one prompt at positions start.. of its slot, attending to what the slot holds and to
  itself (the model's cache path, read block by block): the rest of a long prompt, or what follows a cached
  prefix.
* admit: each prefilled request's first token sampled; its slot takes the request's settings.
* decode: up to `MAX_STEPS` decode steps of the live slots in one device loop, each slot sampling with its own
  settings, key and step and stopping at its own stop ids or token budget; one program per row count (the
  first 1, 2, 4, ... slots), so that a step costs the slots in use, not all of them.
* restore / save: whole chunks of prompt keys and values copied from the prefix pool into a slot, and from a
  slot into the pool.

`compiled.EnginePrograms` lays out the state they work on and compiles them; `slots.SlotBackend` holds that
state and calls them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.inference.sampling import RowSampling, sample_rows
from llama_jax.inference.settings import MAX_STEPS
from llama_jax.kv_cache import CACHE_AXES, KVCache
from llama_jax.sharding import shard

CACHE_BLOCK = 128  # cache slots read per block in decoding; the cache length is a multiple of it
# Stop ids each slot checks on the device (a request's first ones: the tokenizer's, then its own). The host
# checks all of them; a slot that runs past a stop id beyond these only does work that is thrown away.
DEVICE_STOP_IDS = 8
LOGITS_AXES = ("batch", "vocab")  # a prefill's logits, as they pass to the admission program


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """What the device keeps per slot between calls, besides the cache."""

    last: jax.Array  # (slots,) the token generated last: the next step's input
    step: jax.Array  # (slots,) tokens generated so far: the sampling step
    keys: jax.Array  # (slots,) each request's random key
    sampling: RowSampling
    max_tokens: jax.Array  # (slots,) the request's token budget
    stop_ids: jax.Array  # (slots, DEVICE_STOP_IDS) ids that end the request; -1 pads
    logprobs: jax.Array  # (slots,) bool: the request wants its tokens' log-probabilities
    live: jax.Array  # (slots,) bool: still generating (a stop id or the budget clears it)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Prompts:
    """A prefill call's prompts: `rows` of them right-padded. A row whose slot is the slot count is padding:
    nothing of it is kept."""

    ids: jax.Array  # (rows, bucket) int32
    lengths: jax.Array  # (rows,) int32
    slots: jax.Array  # (rows,) int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Admission:
    """What the slots of a prefill call's requests take on: their settings, per row."""

    slots: jax.Array  # (rows,) int32, as the prompts'
    seeds: jax.Array  # (rows,) uint32
    streams: jax.Array  # (rows,) int32
    sampling: RowSampling
    max_tokens: jax.Array  # (rows,) int32
    stop_ids: jax.Array  # (rows, DEVICE_STOP_IDS) int32
    logprobs: jax.Array  # (rows,) bool


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


def _laid_out(cache: KVCache | None = None, slots: SlotState | None = None) -> tuple:
    """The cache and slot state constrained to the layout they were created in (`compiled.state_shapes`): each
    program's outputs are the next one's inputs, whose compiled layouts must agree."""
    if cache is not None:
        cache = KVCache(shard(cache.k, *CACHE_AXES), shard(cache.v, *CACHE_AXES), shard(cache.lengths, "batch"))
    if slots is not None:
        slots = jax.tree.map(lambda a: shard(a, "batch", *(None,) * (a.ndim - 1)), slots)
    return cache, slots


def _prefill(graphdef, state, cache: KVCache, prompts: Prompts):
    """Prefill `prompts` into their slots (cache rows); the logits (rows, vocab) after each one's last token."""
    rows = prompts.slots
    logits, (k, v) = nnx.merge(graphdef, state).prefill(prompts.ids, logits_at=(prompts.lengths - 1)[:, None])
    bucket = prompts.ids.shape[1]
    # (layers, rows, bucket, kv_heads, head_dim) -> the cache's (layers, slots, kv_heads, length, head_dim)
    k = cache.k.at[:, rows, :, :bucket].set(k.transpose(0, 1, 3, 2, 4).astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, rows, :, :bucket].set(v.transpose(0, 1, 3, 2, 4).astype(cache.v.dtype), mode="drop")
    cache, _ = _laid_out(KVCache(k, v, cache.lengths.at[rows].set(prompts.lengths, mode="drop")))
    return cache, shard(logits[:, 0], *LOGITS_AXES)


def _admit(slots: SlotState, logits, admission: Admission):
    """Each prefilled request's first token (and its log-probability), and its slot's new state."""
    a = admission
    keys = jax.vmap(lambda seed, stream: jax.random.fold_in(jax.random.key(seed), stream))(a.seeds, a.streams)
    first = jnp.zeros_like(a.streams)
    token = sample_rows(logits, keys, first, a.sampling)
    live = ~_ends(token, first, a.stop_ids, a.max_tokens)
    new = SlotState(token, first + 1, keys, a.sampling, a.max_tokens, a.stop_ids, a.logprobs, live)
    _, slots = _laid_out(slots=jax.tree.map(lambda old, value: old.at[a.slots].set(value, mode="drop"), slots, new))
    return slots, *_on_every_host(token, _chosen_logprob(logits, token, a.logprobs))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Decoding:
    """The decode loop's carry."""

    step: jax.Array  # int32: steps run so far in this call
    cache: KVCache
    slots: SlotState
    tokens: jax.Array  # (slots, MAX_STEPS)
    logprobs: jax.Array  # (slots, MAX_STEPS)
    finished: jax.Array  # bool: some slot ended in this call


def _decode(graphdef, state, cache: KVCache, slots: SlotState, active, steps, stop_early, block: int, rows: int):
    """Up to `steps` decode steps of the `active` slots among the first `rows` — fewer once none is live, or
    when `stop_early` and one ends: the (rows, MAX_STEPS) tokens and log-probabilities, of which the first
    `steps run` columns are real, and that count. The slots from `rows` on are left as they are."""
    model = nnx.merge(graphdef, state)
    own = jax.tree.map(lambda a: a[:rows], slots)
    own = dataclasses.replace(own, live=own.live & active[:rows])

    def running(d: _Decoding):
        return (d.step < steps) & jnp.any(d.slots.live) & ~(stop_early & d.finished)

    def advance(d: _Decoding) -> _Decoding:
        s = d.slots
        # Slots not generating (free, finished, or holding half a prompt) decode at slot -1: they write nothing,
        # keep their length, and the cache is read only as far as the live requests reach.
        reading = KVCache(d.cache.k, d.cache.v, jnp.where(s.live, d.cache.lengths, -1))
        logits, written = model(s.last[:, None], cache=reading, cache_block=block)
        cache = KVCache(written.k, written.v, jnp.where(s.live, written.lengths, d.cache.lengths))
        logits = logits[:, 0]
        token = sample_rows(logits, s.keys, s.step, s.sampling)
        ended = s.live & _ends(token, s.step, s.stop_ids, s.max_tokens)
        logprob = _chosen_logprob(logits, token, s.live & s.logprobs)
        s = dataclasses.replace(s, last=token, step=s.step + 1, live=s.live & ~ended)
        return _Decoding(
            d.step + 1,
            cache,
            s,
            jax.lax.dynamic_update_index_in_dim(d.tokens, token, d.step, axis=1),
            jax.lax.dynamic_update_index_in_dim(d.logprobs, logprob, d.step, axis=1),
            d.finished | jnp.any(ended),
        )

    start = _Decoding(
        jnp.int32(0),
        KVCache(cache.k, cache.v, cache.lengths[:rows]),
        own,
        jnp.zeros((rows, MAX_STEPS), jnp.int32),
        jnp.zeros((rows, MAX_STEPS), jnp.float32),
        jnp.bool_(False),
    )
    with jax.named_scope("decode"):
        end = jax.lax.while_loop(running, advance, start)
    lengths = cache.lengths.at[:rows].set(end.cache.lengths)
    slots = jax.tree.map(lambda whole, part: whole.at[:rows].set(part), slots, end.slots)
    cache, slots = _laid_out(KVCache(end.cache.k, end.cache.v, lengths), slots)
    return cache, slots, *_on_every_host(end.tokens, end.logprobs), end.step


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Chunk:
    """An extend call's piece of one prompt per row: tokens at slot positions start.. of the row's slot. A row
    whose slot is the slot count is padding."""

    ids: jax.Array  # (rows, bucket) int32, right-padded
    slots: jax.Array  # (rows,) int32
    starts: jax.Array  # (rows,) int32: the prompt tokens the slot holds already
    lengths: jax.Array  # (rows,) int32: the chunk's real tokens


def _extend(graphdef, state, cache: KVCache, chunk: Chunk, block: int):
    """Put `chunk` into its slots: its queries attend to what each slot holds and to the chunk itself (the
    model's cache path, read `block` positions at a time), its keys and values are written after it. The
    logits after each row's last real token. The rows' slots are gathered, extended and written back whole."""
    rows = chunk.slots
    held = KVCache(cache.k[:, rows], cache.v[:, rows], chunk.starts)
    at = (chunk.lengths - 1)[:, None]
    logits, held = nnx.merge(graphdef, state)(chunk.ids, cache=held, logits_at=at, cache_block=block)
    k = cache.k.at[:, rows].set(held.k, mode="drop")
    v = cache.v.at[:, rows].set(held.v, mode="drop")
    lengths = cache.lengths.at[rows].set(chunk.starts + chunk.lengths, mode="drop")
    cache, _ = _laid_out(KVCache(k, v, lengths))
    return cache, shard(logits[:, 0], *LOGITS_AXES)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefixPool:
    """Keys and values of whole chunks of prompt tokens, (layers, entries, kv_heads, chunk, head_dim) each:
    what requests sharing a prefix copy into their slots instead of computing it again."""

    k: jax.Array
    v: jax.Array


POOL_AXES = ("layers", "batch", "kv_heads", None, "head_dim")


def _chunked(a: jax.Array, chunk: int) -> jax.Array:
    """One slot's (layers, kv_heads, length, head_dim) as (layers, chunks, kv_heads, chunk, head_dim)."""
    layers, kv_heads, length, head_dim = a.shape
    return a.reshape(layers, kv_heads, length // chunk, chunk, head_dim).transpose(0, 2, 1, 3, 4)


def _restore(cache: KVCache, pool: PrefixPool, slot, entries):
    """Copy pool entries[i] into chunk i of `slot` (positions i·chunk ..) for every entries[i] >= 0, the leading
    chunks; the slot then holds that many chunks of its prompt."""
    chunk = pool.k.shape[3]
    kept = entries >= 0

    def copy(slot_cache, pool_part):
        held = _chunked(slot_cache[:, slot], chunk)  # (layers, chunks, kv_heads, chunk, head_dim)
        restored = jnp.where(kept[None, :, None, None, None], pool_part[:, jnp.maximum(entries, 0)], held)
        layers, chunks, kv_heads, _, head_dim = restored.shape
        restored = restored.transpose(0, 2, 1, 3, 4).reshape(layers, kv_heads, chunks * chunk, head_dim)
        return slot_cache.at[:, slot].set(restored.astype(slot_cache.dtype))

    lengths = cache.lengths.at[slot].set(jnp.sum(kept) * chunk)
    cache, _ = _laid_out(KVCache(copy(cache.k, pool.k), copy(cache.v, pool.v), lengths))
    return cache


def _save(pool: PrefixPool, cache: KVCache, slot, entries):
    """Copy chunk i of `slot` into pool entries[i] for every entries[i] >= 0."""
    chunk = pool.k.shape[3]
    target = jnp.where(entries >= 0, entries, pool.k.shape[1])  # out of range: not saved

    def copy(pool_part, slot_cache):
        held = _chunked(slot_cache[:, slot], chunk)
        return pool_part.at[:, target].set(held.astype(pool_part.dtype), mode="drop")

    k, v = copy(pool.k, cache.k), copy(pool.v, cache.v)
    return PrefixPool(shard(k, *POOL_AXES), shard(v, *POOL_AXES))


prefill_program = jax.jit(_prefill, static_argnames=("graphdef",), donate_argnames=("cache",))
extend_program = jax.jit(_extend, static_argnames=("graphdef", "block"), donate_argnames=("cache",))
restore_program = jax.jit(_restore, donate_argnames=("cache",))
save_program = jax.jit(_save, donate_argnames=("pool",))
admit_program = jax.jit(_admit, donate_argnames=("slots",))
decode_program = jax.jit(_decode, static_argnames=("graphdef", "block", "rows"), donate_argnames=("cache", "slots"))
