"""Continuous batching, the device side: a fixed number of decode slots over one KV cache, a pool of cached
prompt chunks, and the compiled programs that work on them (`programs.py`).

    backend = SlotBackend.of(loaded, slots=8, cache_len=1024, chunk=256, pool_entries=16)
    first, logprobs = backend.insert([3, 5], [request_a, request_b], bucket=64)   # short prompts into slots 3, 5
    backend.restore(2, [7, 1])                     # pool entries 7 and 1: chunks 0 and 1 of slot 2's prompt
    result = backend.extend(2, long_request, 512)   # its next chunk; at the prompt's end, its first token
    tokens, logprobs, steps = backend.decode(32, active=[s in (2, 3, 5) for s in range(8)], stop_early=False)

A prompt of at most `chunk` tokens is prefilled whole, with prompts of its length bucket (1 or `prefill_rows`
rows); a longer one chunk by chunk (`chunk` tokens each, at fixed positions 0, chunk, 2·chunk, ...): its first
chunk like a short prompt, the rest through the model's cache path, so that the engine can decode the other
slots between them. Whole chunks are what the prefix pool keeps. Programs: a prefill per (rows, bucket up to
`chunk`), an extend per chunk bucket, an admission per row count, the decode loop, and with a pool a restore
and a save; `lower()` builds each from shapes alone — how the engine compiles them before serving and how
`--compile-for` compiles them for a TPU slice — and `executable()` compiles it once per process.

A slot's tokens are those it would get alone: a prompt is its row's only content, chunk boundaries do not move,
no block size depends on the rows beside it, and decoding's cache blocks a slot cannot see add nothing to it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.config import ModelConfig
from llama_jax.inference.programs import (
    CACHE_BLOCK,
    DEVICE_STOP_IDS,
    LOGITS_AXES,
    MAX_STEPS,
    POOL_AXES,
    Admission,
    Chunk,
    PrefixPool,
    Prompts,
    SlotState,
    admit_program,
    decode_program,
    extend_program,
    prefill_program,
    restore_program,
    save_program,
)
from llama_jax.inference.sampling import RowSampling, SamplingParams
from llama_jax.inference.scheduler import Request
from llama_jax.kv_cache import CACHE_AXES, KVCache
from llama_jax.loading import LoadedModel
from llama_jax.model import abstract_state
from llama_jax.sharding import named_sharding

MIN_BUCKET = 16
PREFILL_CHUNK = 256  # prompt tokens per prefill call, and per cached prefix chunk
KEPT_PROGRAMS = 256  # compiled programs kept for reuse by later engines of the process
_COMPILED: collections.OrderedDict[tuple, jax.stages.Compiled] = collections.OrderedDict()


def bucket_length(n: int, limit: int) -> int:
    """The padded length of n prompt tokens: a power of two ≥ MIN_BUCKET, at most `limit`."""
    return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), limit)


def _abstract(tree):
    """ShapeDtypeStructs of a tree of arrays, keeping each one's sharding."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)


class SlotBackend:
    """The model behind a `scheduler.Scheduler`: `slots` requests decode together over one cache of
    `cache_len` positions per slot (rounded up to whole chunks and CACHE_BLOCKs). `SlotBackend.of` runs a
    loaded model; `SlotBackend.abstract` holds only shapes, for compiling the same programs for other devices."""

    def __init__(
        self,
        graphdef,
        state,
        config: ModelConfig,
        mesh,
        cache,
        slot_state,
        pool,
        *,
        pad_id: int,
        chunk: int,
        prefill_rows: int,
    ):
        self.graphdef, self.state, self.config, self.mesh = graphdef, state, config, mesh
        self.cache, self.slot_state, self.pool = cache, slot_state, pool
        self.slots, self.cache_len = slot_state.last.shape[0], cache.k.shape[3]
        self.pool_size = pool.k.shape[1] if pool is not None else 0
        self.pad_id, self.chunk, self.prefill_rows = pad_id, chunk, prefill_rows
        self.decode_rows = _decode_rows(self.slots, cache.k.sharding)
        # What the compiled programs are keyed by beside their name: the model and the shapes, dtypes and
        # shardings of its parameters, cache, slot state and pool. Another backend of the same key reuses them.
        leaves, tree = jax.tree.flatten(_abstract((state, cache, slot_state, pool)))
        self._signature = (graphdef, tree, tuple(leaves))
        # The programs this backend holds compiled (`programs()` names them). Before one compiles,
        # `on_compile(program)` is told (infer.py says what the wait is for).
        self.compiled: set[tuple] = set()
        self.on_compile: Callable[[tuple], None] | None = None

    @classmethod
    def of(
        cls,
        loaded: LoadedModel,
        slots: int,
        cache_len: int,
        *,
        chunk: int = PREFILL_CHUNK,
        pool_entries: int = 0,
        prefill_rows: int | None = None,
    ) -> SlotBackend:
        """A backend over `loaded`'s parameters with an empty cache of `slots` × `cache_len` positions and an
        empty pool of `pool_entries` chunks."""
        graphdef, state = nnx.split(loaded.model)

        def zeros(a):
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                return jax.device_put(jax.random.split(jax.random.key(0), a.shape[0]), a.sharding)
            return jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding)

        shapes = _state_shapes(loaded.config, loaded.mesh, slots, cache_len, chunk, pool_entries)
        cache, slot_state, pool = jax.tree.map(zeros, shapes)
        pad_id = loaded.tokenizer.pad_id if loaded.tokenizer is not None else 0
        return cls(
            graphdef,
            state,
            loaded.config,
            loaded.mesh,
            cache,
            slot_state,
            pool,
            pad_id=pad_id,
            chunk=chunk,
            prefill_rows=prefill_rows or min(slots, 4),
        )

    @classmethod
    def abstract(
        cls,
        config: ModelConfig,
        mesh,
        slots: int,
        cache_len: int,
        *,
        chunk: int = PREFILL_CHUNK,
        pool_entries: int = 0,
        prefill_rows: int | None = None,
    ) -> SlotBackend:
        """Shapes only, on `mesh` (a TPU slice's devices, say): nothing is allocated, nothing can run."""
        graphdef, state = abstract_state(config, mesh)
        cache, slot_state, pool = _state_shapes(config, mesh, slots, cache_len, chunk, pool_entries)
        return cls(
            graphdef,
            state,
            config,
            mesh,
            cache,
            slot_state,
            pool,
            pad_id=0,
            chunk=chunk,
            prefill_rows=prefill_rows or min(slots, 4),
        )

    def bucket(self, n: int) -> int:
        """The prefill bucket of an n-token prompt (n ≤ chunk: longer ones go chunk by chunk)."""
        return bucket_length(n, self.chunk)

    def prefill_rows_for(self, n: int) -> int:
        """Rows of the prefill program that takes n prompts: one, or all `prefill_rows` (few compiled shapes)."""
        return 1 if n == 1 else self.prefill_rows

    def programs(self) -> list[tuple]:
        """Every program the backend may call: ("prefill", rows, bucket), ("extend", bucket), ("admit", rows),
        ("decode", rows), and with a pool ("restore",) and ("save",)."""
        rows = sorted({self.prefill_rows_for(n) for n in range(1, self.prefill_rows + 1)})
        buckets = sorted({bucket_length(n, self.chunk) for n in range(1, min(self.chunk, self.cache_len) + 1)})
        programs = [("prefill", r, b) for r in rows for b in buckets]
        if self.cache_len > self.chunk:
            programs += [("extend", b) for b in buckets]
        programs += [("admit", r) for r in rows] + [("decode", r) for r in self.decode_rows]
        return programs + ([("restore",), ("save",)] if self.pool is not None else [])

    def lower(self, program: tuple) -> jax.stages.Lowered:
        """`program` lowered from shapes alone, exactly as a call with real arguments would build it."""
        kind = program[0]
        with jax.set_mesh(self.mesh):
            if kind == "prefill":
                prompts = self._prompts([], program[1], program[2])
                return prefill_program.lower(self.graphdef, self.state, self.cache, _abstract(prompts))
            if kind == "extend":
                chunk = _abstract(self._chunk(self.slots, Request((0,), 1), 0, program[1]))
                # A chunk's queries read the cache a chunk at a time (the cache length is a multiple of it):
                # blocks of 128 took a quarter longer per 2,048-token prompt on the CPU (256 queries each).
                block = max(CACHE_BLOCK, self.chunk)
                return extend_program.lower(self.graphdef, self.state, self.cache, chunk, block)
            if kind == "admit":
                admission = self._admission([], program[1])
                shape = (program[1], self.config.vocab_size)
                sharding = named_sharding(self.mesh, LOGITS_AXES, shape)
                logits = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
                return admit_program.lower(self.slot_state, logits, _abstract(admission))
            if kind == "restore":
                entries = _abstract(self._entries({}))
                return restore_program.lower(self.cache, self.pool, _abstract(np.int32(0)), entries)
            if kind == "save":
                entries = _abstract(self._entries({}))
                return save_program.lower(self.pool, self.cache, _abstract(np.int32(0)), entries)
            inputs = _abstract(self._decode_inputs([], 0, False))
            return decode_program.lower(
                self.graphdef, self.state, self.cache, self.slot_state, *inputs, CACHE_BLOCK, program[1]
            )

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
        """Prefill whole prompts of at most `chunk` tokens, all of `bucket`, into `slots`: their first tokens."""
        firsts, logprobs = [], []
        for start in range(0, len(requests), self.prefill_rows):
            group, group_slots = requests[start : start + self.prefill_rows], slots[start : start + self.prefill_rows]
            rows = self.prefill_rows_for(len(group))
            placed = list(zip(group_slots, group))
            logits = self._prefill(self._prompts([(s, r.prompt_ids) for s, r in placed], rows, bucket), rows, bucket)
            token, logprob = self._admit(logits, self._admission(placed, rows), rows)
            firsts += np.asarray(token)[: len(group)].tolist()
            logprobs += np.asarray(logprob)[: len(group)].tolist()
        return firsts, logprobs

    def extend(self, slot: int, request: Request, start: int) -> tuple[int, float] | None:
        """Put the chunk of `request`'s prompt from `start` (a multiple of `chunk`; the slot holds the tokens
        before it) into `slot`. At the prompt's end: its first token and that token's log-probability."""
        prompt = request.prompt_ids
        end = min(start + self.chunk, len(prompt))
        if start == 0:  # the first chunk: as a short prompt, with the platform's flash attention
            logits = self._prefill(self._prompts([(slot, prompt[:end])], 1, self.chunk), 1, self.chunk)
        else:
            bucket = bucket_length(end - start, self.chunk)
            extend = self.executable(("extend", bucket))
            self.cache, logits = extend(self.state, self.cache, self._chunk(slot, request, start, bucket))
        if end < len(prompt):
            return None
        token, logprob = self._admit(logits, self._admission([(slot, request)], 1), 1)
        return int(np.asarray(token)[0]), float(np.asarray(logprob)[0])

    def restore(self, slot: int, entries: Sequence[int]) -> None:
        """Copy pool `entries` into chunks 0, 1, ... of `slot`: it then holds that much of its prompt."""
        restore = self.executable(("restore",))
        self.cache = restore(self.cache, self.pool, np.int32(slot), self._entries(dict(enumerate(entries))))

    def save(self, slot: int, entries: dict[int, int]) -> None:
        """Copy chunk i of `slot` into pool entry entries[i]."""
        save = self.executable(("save",))
        self.pool = save(self.pool, self.cache, np.int32(slot), self._entries(entries))

    def decode(
        self, steps: int, active: Sequence[bool], stop_early: bool
    ) -> tuple[list[list[int]], list[list[float]], int]:
        """Up to `steps` (≤ MAX_STEPS) decode steps of the `active` slots; fewer when `stop_early` and a slot
        ends. Returns each slot's tokens and log-probabilities and the number of steps run. The step runs the
        first slots as far as the last active one (the scheduler fills the lowest free slots first)."""
        last = max((slot for slot, on in enumerate(active) if on), default=0)
        rows = next(r for r in self.decode_rows if r > last)
        decode = self.executable(("decode", rows))
        inputs = self._decode_inputs(active, steps, stop_early)
        self.cache, self.slot_state, tokens, logprobs, ran = decode(self.state, self.cache, self.slot_state, *inputs)
        ran = int(ran)
        idle = [[] for _ in range(self.slots - rows)]
        return np.asarray(tokens)[:, :ran].tolist() + idle, np.asarray(logprobs)[:, :ran].tolist() + idle, ran

    def _prefill(self, prompts: Prompts, rows: int, bucket: int):
        prefill = self.executable(("prefill", rows, bucket))
        self.cache, logits = prefill(self.state, self.cache, prompts)
        return logits

    def _admit(self, logits, admission: Admission, rows: int):
        admit = self.executable(("admit", rows))
        self.slot_state, token, logprob = admit(self.slot_state, logits, admission)
        return token, logprob

    def _decode_inputs(self, active: Sequence[bool], steps: int, stop_early: bool):
        if not 0 <= steps <= MAX_STEPS:
            raise ValueError(f"a decode call runs 0..{MAX_STEPS} steps, not {steps}")
        mask = np.zeros((self.slots,), bool)
        mask[: len(active)] = active
        return mask, np.int32(steps), np.bool_(stop_early)

    def _entries(self, entries: dict[int, int]) -> np.ndarray:
        """Pool entries by chunk index (-1: none), one per chunk of a slot."""
        array = np.full((self.cache_len // self.chunk,), -1, np.int32)
        for index, entry in entries.items():
            array[index] = entry
        return array

    def _chunk(self, slot: int, request: Request, start: int, bucket: int) -> Chunk:
        piece = request.prompt_ids[start : start + bucket]
        ids = np.full((1, bucket), self.pad_id, np.int32)
        ids[0, : len(piece)] = piece
        return Chunk(
            ids, np.asarray([slot], np.int32), np.asarray([start], np.int32), np.asarray([len(piece)], np.int32)
        )

    def _prompts(self, placed: list[tuple[int, Sequence[int]]], rows: int, bucket: int) -> Prompts:
        """A prefill's host arrays: `placed` (slot, prompt) pairs right-padded in `rows` rows of `bucket`."""
        ids = np.full((rows, bucket), self.pad_id, np.int32)
        lengths = np.ones((rows,), np.int32)
        slots = np.full((rows,), self.slots, np.int32)  # out of range: padding rows are dropped
        for i, (slot, prompt) in enumerate(placed):
            ids[i, : len(prompt)], lengths[i], slots[i] = prompt, len(prompt), slot
        return Prompts(ids, lengths, slots)

    def _admission(self, placed: list[tuple[int, Request]], rows: int) -> Admission:
        """An admission's host arrays: the settings of `placed` (slot, request) pairs in `rows` rows."""
        slots = np.full((rows,), self.slots, np.int32)
        seeds, streams = np.zeros((rows,), np.uint32), np.zeros((rows,), np.int32)
        max_tokens = np.ones((rows,), np.int32)
        stop_ids = np.full((rows, DEVICE_STOP_IDS), -1, np.int32)
        logprobs = np.zeros((rows,), bool)
        for i, (slot, request) in enumerate(placed):
            slots[i], seeds[i], streams[i] = slot, request.seed, request.stream
            max_tokens[i], logprobs[i] = request.max_tokens, request.logprobs
            own = request.stop_ids[:DEVICE_STOP_IDS]
            stop_ids[i, : len(own)] = own
        sampling = RowSampling.of([r.sampling for _, r in placed] + [SamplingParams()] * (rows - len(placed)))
        return Admission(slots, seeds, streams, sampling, max_tokens, stop_ids, logprobs)


def _decode_rows(slots: int, cache_sharding) -> list[int]:
    """The row counts decode programs are compiled for: 1, 2, 4, ... and `slots`, so that a step costs the
    slots in use; only `slots` when the slots are split over devices (the first few rows would sit on some of
    them only). A row's logits can differ between row counts at float rounding (a matrix-vector product sums
    in another order than a matrix product), as between one device and several."""
    spec = getattr(cache_sharding, "spec", None)
    if spec is not None and len(spec) > 1 and spec[1] is not None:
        return [slots]
    return sorted({1 << i for i in range(slots.bit_length()) if 1 << i < slots} | {slots})


def _state_shapes(config: ModelConfig, mesh, slots: int, cache_len: int, chunk: int, pool_entries: int):
    """The cache, slot state and prefix pool (None without entries) as ShapeDtypeStructs placed on `mesh`. The
    cache is (layers, slots, kv_heads, cache_len rounded up to whole chunks and CACHE_BLOCKs, head_dim), its
    rows sharded like a batch; the pool (layers, entries, kv_heads, chunk, head_dim)."""
    unit = max(CACHE_BLOCK, chunk)
    if unit % CACHE_BLOCK or unit % chunk:
        raise ValueError(f"the prefill chunk must be a power of two, got {chunk}")
    cache_len = -(-cache_len // unit) * unit
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
    pool = None
    if pool_entries:
        pool_shape = (config.n_layers, pool_entries, config.n_kv_heads, chunk, config.head_dim)
        pool = PrefixPool(placed(pool_shape, config.dtype, POOL_AXES), placed(pool_shape, config.dtype, POOL_AXES))
    return cache, slot_state, pool
