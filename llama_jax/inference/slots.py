"""Continuous batching, the device side: a fixed number of decode slots over one KV cache, and its programs.

    backend = SlotBackend.of(loaded, slots=8, cache_len=1024)
    first, logprobs = backend.insert([3, 5], [request_a, request_b], bucket=64)   # prefill into slots 3, 5
    tokens, logprobs, steps = backend.decode(32, active=[s in (3, 5) for s in range(8)], stop_early=False)

* prefill: `rows` prompts of one length bucket, right-padded, go through the model as one forward pass with
  the platform's flash attention (`Llama.prefill`: splash on TPU, cuDNN on GPU, blockwise XLA otherwise);
  their keys and values are copied into their slots. One program per (rows, bucket): rows 1 or
  `prefill_rows`, buckets powers of two from 16 up to the cache length.
* admit: each prefilled prompt samples its first token and its slot takes the request's settings (sampling,
  key, budget, stop ids). One program per row count: sampling is most of a small program's compile time, so
  it is compiled once per row count rather than once per bucket.
* decode: up to `MAX_STEPS` decode steps of every slot in one device loop (`lax.while_loop`), each slot
  sampling with its own settings, key and step and stopping at its own stop ids or token budget; the loop
  ends after `steps`, when no slot is live, or early when `stop_early` and a slot has finished (a request is
  waiting for it). The
  cache is read in blocks, only as far as the longest live slot (`attention.attend_live_cache`).

A slot's tokens are those it would get alone: a prompt is its row's only content, and decoding's cache blocks
a slot cannot see add exactly nothing to it. The programs are plain `jax.jit` over the model's split state
with the cache and slot state donated (updated in place); `lower()` builds each one from shapes alone, which
is how the engine compiles them before serving and how `--compile-for` compiles them for a TPU slice.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.config import ModelConfig
from llama_jax.inference.sampling import RowSampling, SamplingParams, sample_rows
from llama_jax.inference.scheduler import Request
from llama_jax.kv_cache import CACHE_AXES, KVCache
from llama_jax.loading import LoadedModel
from llama_jax.model import abstract_state
from llama_jax.sharding import named_sharding, shard

CACHE_BLOCK = 128  # cache slots read per block in decoding; the cache length is a multiple of it
MIN_BUCKET = 16
MAX_STEPS = 64  # decode steps one call may run: the size of its token buffer
# Stop ids each slot checks on the device (the tokenizer's and a request's own, first ones first). The host
# checks all of them; a slot that runs past a stop id beyond these only does work that is thrown away.
DEVICE_STOP_IDS = 8
LOGITS_AXES = ("batch", "vocab")  # a prefill's logits, as they pass to the admission program
KEPT_PROGRAMS = 256  # compiled programs kept for reuse by later engines of the process
_COMPILED: collections.OrderedDict[tuple, jax.stages.Compiled] = collections.OrderedDict()


def bucket_length(n: int, cache_len: int) -> int:
    """The padded length of an n-token prompt: a power of two ≥ MIN_BUCKET, or the whole cache length."""
    return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), cache_len)


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


def _laid_out(cache: KVCache | None = None, slots: SlotState | None = None) -> tuple:
    """The cache and slot state constrained to the layout they were created in (`_slot_shapes`): each
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
    return slots, token, _chosen_logprob(logits, token, a.logprobs)


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


def _decode(graphdef, state, cache: KVCache, slots: SlotState, active, steps, stop_early, block: int):
    """Up to `steps` decode steps of the `active` slots — fewer once none is live, or when `stop_early` and one
    ends: the (slots, MAX_STEPS) tokens and log-probabilities, of which the first `steps run` columns are real,
    and that count.
    Slots that are not live sit at length 0, so the live part of the cache is that of the requests."""
    model = nnx.merge(graphdef, state)
    slots = dataclasses.replace(slots, live=slots.live & active)

    def running(d: _Decoding):
        return (d.step < steps) & jnp.any(d.slots.live) & ~(stop_early & d.finished)

    def advance(d: _Decoding) -> _Decoding:
        s = d.slots
        cache = KVCache(d.cache.k, d.cache.v, jnp.where(s.live, d.cache.lengths, 0))
        logits, cache = model(s.last[:, None], cache=cache, cache_block=block)
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

    n = slots.last.shape[0]
    start = _Decoding(
        jnp.int32(0),
        cache,
        slots,
        jnp.zeros((n, MAX_STEPS), jnp.int32),
        jnp.zeros((n, MAX_STEPS), jnp.float32),
        jnp.bool_(False),
    )
    with jax.named_scope("decode"):
        end = jax.lax.while_loop(running, advance, start)
    cache, slots = _laid_out(
        KVCache(end.cache.k, end.cache.v, jnp.where(end.slots.live, end.cache.lengths, 0)), end.slots
    )
    return cache, slots, end.tokens, end.logprobs, end.step


prefill_program = jax.jit(_prefill, static_argnames=("graphdef",), donate_argnames=("cache",))
admit_program = jax.jit(_admit, donate_argnames=("slots",))
decode_program = jax.jit(_decode, static_argnames=("graphdef", "block"), donate_argnames=("cache", "slots"))


def _abstract(tree):
    """ShapeDtypeStructs of a tree of arrays, keeping each one's sharding."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)


class SlotBackend:
    """The model behind a `scheduler.Scheduler`: `slots` requests decode together over one cache of
    `cache_len` positions per slot (rounded up to CACHE_BLOCK). `SlotBackend.of` runs a loaded model;
    `SlotBackend.abstract` holds only shapes, for compiling the same programs for other devices."""

    def __init__(self, graphdef, state, config: ModelConfig, mesh, cache, slot_state, pad_id: int, prefill_rows: int):
        self.graphdef, self.state, self.config, self.mesh = graphdef, state, config, mesh
        self.cache, self.slot_state = cache, slot_state
        self.slots, self.cache_len = slot_state.last.shape[0], cache.k.shape[3]
        self.pad_id, self.prefill_rows = pad_id, prefill_rows
        # What the compiled programs are keyed by beside their name: the model and the shapes, dtypes and
        # shardings of its parameters, cache and slot state. Another backend of the same key reuses them.
        leaves, tree = jax.tree.flatten(_abstract((state, cache, slot_state)))
        self._signature = (graphdef, tree, tuple(leaves))
        # The programs this backend holds compiled: ("prefill", rows, bucket), ("admit", rows), ("decode",).
        # Before one compiles, `on_compile(program)` is told (infer.py says what the wait is for).
        self.compiled: set[tuple] = set()
        self.on_compile: Callable[[tuple], None] | None = None

    @classmethod
    def of(cls, loaded: LoadedModel, slots: int, cache_len: int, prefill_rows: int | None = None) -> SlotBackend:
        """A backend over `loaded`'s parameters with an empty cache of `slots` × `cache_len` positions."""
        graphdef, state = nnx.split(loaded.model)

        def zeros(a):
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                return jax.device_put(jax.random.split(jax.random.key(0), a.shape[0]), a.sharding)
            return jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding)

        cache, slot_state = jax.tree.map(zeros, _slot_shapes(loaded.config, loaded.mesh, slots, cache_len))
        pad_id = loaded.tokenizer.pad_id if loaded.tokenizer is not None else 0
        return cls(
            graphdef, state, loaded.config, loaded.mesh, cache, slot_state, pad_id, prefill_rows or min(slots, 4)
        )

    @classmethod
    def abstract(cls, config: ModelConfig, mesh, slots: int, cache_len: int, prefill_rows: int | None = None):
        """Shapes only, on `mesh` (a TPU slice's devices, say): nothing is allocated, nothing can run."""
        graphdef, state = abstract_state(config, mesh)
        cache, slot_state = _slot_shapes(config, mesh, slots, cache_len)
        return cls(graphdef, state, config, mesh, cache, slot_state, 0, prefill_rows or min(slots, 4))

    def bucket(self, n: int) -> int:
        return bucket_length(n, self.cache_len)

    def prefill_rows_for(self, n: int) -> int:
        """Rows of the prefill program that takes n prompts: one, or all `prefill_rows` (few compiled shapes)."""
        return 1 if n == 1 else self.prefill_rows

    def programs(self) -> list[tuple]:
        """Every program the backend may call: a prefill per (rows, bucket), an admission per rows, the decode
        loop."""
        rows = sorted({self.prefill_rows_for(n) for n in range(1, self.prefill_rows + 1)})
        buckets = sorted({bucket_length(n, self.cache_len) for n in range(1, self.cache_len)})
        prefills = [("prefill", r, b) for r in rows for b in buckets]
        return prefills + [("admit", r) for r in rows] + [("decode",)]

    def lower(self, program: tuple) -> jax.stages.Lowered:
        """`program` lowered from shapes alone, exactly as a call with real arguments would build it."""
        with jax.set_mesh(self.mesh):
            if program[0] == "prefill":
                _, rows, bucket = program
                prompts, _ = self._requests([], rows, bucket)
                return prefill_program.lower(self.graphdef, self.state, self.cache, _abstract(prompts))
            if program[0] == "admit":
                _, admission = self._requests([], program[1], MIN_BUCKET)
                shape = (program[1], self.config.vocab_size)
                logits = jax.ShapeDtypeStruct(
                    shape, jnp.float32, sharding=named_sharding(self.mesh, LOGITS_AXES, shape)
                )
                return admit_program.lower(self.slot_state, logits, _abstract(admission))
            inputs = _abstract(self._decode_inputs([], 0, False))
            return decode_program.lower(self.graphdef, self.state, self.cache, self.slot_state, *inputs, CACHE_BLOCK)

    def executable(self, program: tuple) -> jax.stages.Compiled:
        """`program` compiled: what every call of the engine runs. Compiled programs are kept for the process
        (the most recent `KEPT_PROGRAMS`), so a new engine over the same model and shapes compiles nothing."""
        key = (program, self._signature)
        compiled = _COMPILED.get(key)
        if compiled is None:
            if self.on_compile is not None:
                self.on_compile(program)
            compiled = self.lower(program).compile()
            _COMPILED[key] = compiled
            while len(_COMPILED) > KEPT_PROGRAMS:
                _COMPILED.popitem(last=False)
        else:
            _COMPILED.move_to_end(key)
        self.compiled.add(program)
        return compiled

    def insert(self, slots: Sequence[int], requests: Sequence[Request], bucket: int) -> tuple[list[int], list[float]]:
        firsts, logprobs = [], []
        for start in range(0, len(requests), self.prefill_rows):
            group, group_slots = requests[start : start + self.prefill_rows], slots[start : start + self.prefill_rows]
            rows = self.prefill_rows_for(len(group))
            prompts, admission = self._requests(list(zip(group_slots, group)), rows, bucket)
            prefill, admit = self.executable(("prefill", rows, bucket)), self.executable(("admit", rows))
            self.cache, logits = prefill(self.state, self.cache, prompts)
            self.slot_state, token, logprob = admit(self.slot_state, logits, admission)
            firsts += np.asarray(token)[: len(group)].tolist()
            logprobs += np.asarray(logprob)[: len(group)].tolist()
        return firsts, logprobs

    def decode(
        self, steps: int, active: Sequence[bool], stop_early: bool
    ) -> tuple[list[list[int]], list[list[float]], int]:
        """Up to `steps` (≤ MAX_STEPS) decode steps of the `active` slots; fewer when `stop_early` and a slot
        ends. Returns each slot's tokens and log-probabilities and the number of steps run."""
        decode = self.executable(("decode",))
        inputs = self._decode_inputs(active, steps, stop_early)
        self.cache, self.slot_state, tokens, logprobs, ran = decode(self.state, self.cache, self.slot_state, *inputs)
        ran = int(ran)
        return np.asarray(tokens)[:, :ran].tolist(), np.asarray(logprobs)[:, :ran].tolist(), ran

    def _decode_inputs(self, active: Sequence[bool], steps: int, stop_early: bool):
        if not 0 <= steps <= MAX_STEPS:
            raise ValueError(f"a decode call runs 0..{MAX_STEPS} steps, not {steps}")
        mask = np.zeros((self.slots,), bool)
        mask[: len(active)] = active
        return mask, np.int32(steps), np.bool_(stop_early)

    def _requests(self, placed: list[tuple[int, Request]], rows: int, bucket: int) -> tuple[Prompts, Admission]:
        """The host arrays of a prefill of `placed` (slot, request) pairs in `rows` rows of `bucket` tokens."""
        ids = np.full((rows, bucket), self.pad_id, np.int32)
        lengths = np.ones((rows,), np.int32)
        slots = np.full((rows,), self.slots, np.int32)  # out of range: padding rows are dropped
        seeds, streams = np.zeros((rows,), np.uint32), np.zeros((rows,), np.int32)
        max_tokens = np.ones((rows,), np.int32)
        stop_ids = np.full((rows, DEVICE_STOP_IDS), -1, np.int32)
        logprobs = np.zeros((rows,), bool)
        for i, (slot, request) in enumerate(placed):
            ids[i, : len(request.prompt_ids)] = request.prompt_ids
            lengths[i], slots[i], seeds[i], streams[i] = len(request.prompt_ids), slot, request.seed, request.stream
            max_tokens[i], logprobs[i] = request.max_tokens, request.logprobs
            own = request.stop_ids[:DEVICE_STOP_IDS]
            stop_ids[i, : len(own)] = own
        sampling = RowSampling.of([r.sampling for _, r in placed] + [SamplingParams()] * (rows - len(placed)))
        admission = Admission(slots, seeds, streams, sampling, max_tokens, stop_ids, logprobs)
        return Prompts(ids, lengths, slots), admission


def _slot_shapes(config: ModelConfig, mesh, slots: int, cache_len: int) -> tuple[KVCache, SlotState]:
    """The cache and slot state of `slots` slots as ShapeDtypeStructs placed on `mesh`: the cache is
    (layers, slots, kv_heads, cache_len rounded up to CACHE_BLOCK, head_dim), its rows sharded like a batch."""
    cache_len = -(-cache_len // CACHE_BLOCK) * CACHE_BLOCK
    shape = (config.n_layers, slots, config.n_kv_heads, cache_len, config.head_dim)

    def placed(shape, dtype, names):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=named_sharding(mesh, names, shape))

    def per_slot(dtype, *rest):
        return placed((slots, *rest), dtype, ("batch",) + (None,) * len(rest))

    key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
    cache = KVCache(
        placed(shape, config.dtype, CACHE_AXES), placed(shape, config.dtype, CACHE_AXES), per_slot(jnp.int32)
    )
    sampling = RowSampling(per_slot(jnp.float32), per_slot(jnp.int32), per_slot(jnp.float32))
    slot_state = SlotState(
        per_slot(jnp.int32),
        per_slot(jnp.int32),
        per_slot(key_dtype),
        sampling,
        per_slot(jnp.int32),
        per_slot(jnp.int32, DEVICE_STOP_IDS),
        per_slot(jnp.bool_),
        per_slot(jnp.bool_),
    )
    return cache, slot_state
