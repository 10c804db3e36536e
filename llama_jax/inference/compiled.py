"""Which device programs an engine of given settings runs, each lowered from shapes alone and compiled once.

    programs = EnginePrograms.abstract(config, mesh, settings)     # shapes only: any devices, a TPU slice's too
    programs.all()                          # [Program("prefill", 4, 16), ..., Program("decode", 8), ...]
    programs.lower(Program("decode", 8))    # what --compile-for compiles for a slice
    programs.executable(Program("decode", 8))   # what the engine calls (compiled on first use, then kept)

The engine's device state — the page pool and the slots' sampling state — is laid out here (`state_shapes`),
so the engine's arrays and the lowering of its programs agree by construction.

Compiled programs are kept for the process in one bounded table (`KEPT_PROGRAMS`, least recently used out),
keyed by the model and the shapes, dtypes and shardings of everything a program takes: a second engine over
the same model and settings — `llama_jax.generate` called again in a notebook, evaluation after training —
compiles nothing.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig
from llama_jax.inference.packing import Packer
from llama_jax.inference.programs import (
    DEVICE_STOP_IDS,
    LOGITS_AXES,
    Pool,
    SlotState,
    admit_program,
    decode_program,
    extend_program,
    prefill_program,
)
from llama_jax.inference.sampling import RowSampling
from llama_jax.inference.settings import MIN_PREFILL_CHUNK, READ_BLOCK, EngineSettings
from llama_jax.inference.types import Program
from llama_jax.kv_cache import CACHE_AXES, KERNEL_CACHE_AXES, SCALE_AXES
from llama_jax.model import abstract_state
from llama_jax.ragged_paged import uses_kernel
from llama_jax.sharding import mesh_platform, named_sharding

KEPT_PROGRAMS = 256  # compiled programs the process keeps for later engines


def bucket_length(n: int, limit: int) -> int:
    """The padded length of n prompt tokens: a power of two ≥ MIN_PREFILL_CHUNK, at most `limit`."""
    return min(max(MIN_PREFILL_CHUNK, 1 << (n - 1).bit_length()), limit)


def abstract(tree):
    """ShapeDtypeStructs of a tree of arrays, keeping each one's sharding."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)


class _ProcessTable:
    """Compiled programs by (program, signature), least recently used first; compiles run outside the lock
    (two programs compile at once during a warm-up)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._programs: collections.OrderedDict[tuple, jax.stages.Compiled] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> jax.stages.Compiled | None:
        with self._lock:
            compiled = self._programs.get(key)
            if compiled is not None:
                self._programs.move_to_end(key)
            return compiled

    def put(self, key: tuple, compiled: jax.stages.Compiled) -> None:
        with self._lock:
            self._programs[key] = compiled
            while len(self._programs) > self.limit:
                self._programs.popitem(last=False)


_TABLE = _ProcessTable(KEPT_PROGRAMS)


class EnginePrograms:
    """The programs of one engine: a model (graph and parameter shapes) on a mesh, with `settings` (resolved)
    deciding the slots, cache length, chunk and pool. `on_compile(program)` hears of each program before its
    first compile."""

    def __init__(
        self,
        graphdef,
        params,
        config: ModelConfig,
        mesh,
        settings: EngineSettings,
        on_compile: Callable[[Program], None] | None = None,
        adapters: tuple[str, ...] = (),
        text_vocab: int = 0,
        follows_in_loop: bool = False,
    ):
        """`text_vocab`: the tokenizer's ids, when fewer than the model's rows (0: as many): the rest are never
        sampled. `follows_in_loop`: the decode loop calls this process back for grammar masks between steps (a
        host callback: only on devices this process runs, and not on a multi-host job)."""
        self.follows_in_loop = follows_in_loop
        self.graphdef, self.config, self.mesh, self.settings = graphdef, config, mesh, settings
        self.text_vocab = text_vocab if 0 < text_vocab < config.vocab_size else 0
        self.shapes = state_shapes(config, mesh, settings)  # (pool, slot state)
        self.slots, self.chunk = settings.max_num_seqs, settings.prefill_chunk
        self.cache_len = settings.positions_per_seq
        self.prefill_rows = settings.prefill_rows
        self.decode_rows = _decode_rows(self.slots, self.shapes[1].last.sharding)
        pages_per_seq = self.cache_len // settings.block_size
        mask_words = (config.vocab_size + 31) // 32
        self.packer = Packer(self.slots, pages_per_seq, settings.num_pages, self.chunk, mask_words, adapters)
        self.on_compile = on_compile
        self.compiled: set[Program] = set()  # held compiled by this engine
        # This engine's executables by program: hashing the signature for the process table costs ~0.5 ms on a
        # CPU (the graph definition's hash), a share of a one-step decode call (a constrained request's).
        self._held: dict[Program, jax.stages.Compiled] = {}
        self._params = abstract(params)
        # What compiled programs are keyed by beside their name: the model and the shapes, dtypes and
        # shardings of its parameters, cache, slot state and pool. Another engine of the same key reuses them.
        leaves, tree = jax.tree.flatten((self._params, self.shapes))
        self._signature = (graphdef, tree, tuple(leaves), self.text_vocab, self.follows_in_loop)

    @classmethod
    def abstract(
        cls, config: ModelConfig, mesh, settings: EngineSettings, follows_in_loop: bool = False
    ) -> EnginePrograms:
        """Shapes only, on `mesh` (a TPU slice's devices, say): nothing is allocated, nothing can run. The decode
        loop's grammar callback is left out unless asked for: a host callback lowers only for a platform this
        process has devices of (it moves no device memory)."""
        graphdef, params = abstract_state(config, mesh)
        resolved = settings.resolve(config, _batch_shards(mesh))
        return cls(graphdef, params, config, mesh, resolved, follows_in_loop=follows_in_loop)

    def bucket(self, n: int) -> int:
        """The prefill bucket of an n-token prompt (n ≤ chunk: longer ones go chunk by chunk)."""
        return bucket_length(n, self.chunk)

    def prefill_rows_for(self, n: int) -> int:
        """Rows of the prefill program that takes n prompts: one, or all `prefill_rows` (few compiled shapes)."""
        return 1 if n == 1 else self.prefill_rows

    def all(self) -> list[Program]:
        """Every program the engine may call: a prefill per (rows, bucket), an extend per bucket when prompts
        can be longer than a chunk, an admission per row count, a decode loop per row count."""
        rows = sorted({self.prefill_rows_for(n) for n in range(1, self.prefill_rows + 1)})
        longest = min(self.chunk, self.settings.max_model_len)
        buckets = sorted({bucket_length(n, self.chunk) for n in range(1, longest + 1)})
        programs = [Program("prefill", r, b) for r in rows for b in buckets]
        if self.settings.max_model_len > self.chunk:
            programs += [Program("extend", 1, b) for b in buckets]
        return programs + [Program("admit", r) for r in rows] + [Program("decode", r) for r in self.decode_rows]

    def lower(self, program: Program) -> jax.stages.Lowered:
        """`program` lowered from shapes alone, exactly as a call with real arguments would build it."""
        pool, slot_state = self.shapes
        pack, params, graphdef = self.packer, self._params, self.graphdef
        with jax.set_mesh(self.mesh):
            if program.kind == "prefill":
                prompts = abstract(pack.prompts([], program.rows, program.bucket))
                return prefill_program.lower(graphdef, params, pool, prompts)
            if program.kind == "extend":
                chunk = abstract(pack.chunk_of(self.slots, None, 0, program.bucket))
                return extend_program.lower(graphdef, params, pool, chunk, self.block)
            if program.kind == "admit":
                shape = (program.rows, self.config.vocab_size)
                logits = jax.ShapeDtypeStruct(
                    shape, jnp.float32, sharding=named_sharding(self.mesh, LOGITS_AXES, shape)
                )
                admission = abstract(pack.admission([], program.rows))
                return admit_program.lower(slot_state, logits, admission, text_vocab=self.text_vocab)
            inputs = abstract((pack.tables(), *pack.decode_inputs([], 0, False)))
            return decode_program.lower(
                graphdef,
                params,
                pool,
                slot_state,
                *inputs,
                READ_BLOCK,
                program.rows,
                text_vocab=self.text_vocab,
                follows=self.follows_in_loop,
            )

    @property
    def block(self) -> int:
        """Positions an extend call's queries read at a time (a sequence's positions are a multiple of it):
        blocks of 128 took a quarter longer per 2,048-token prompt on the CPU (256 queries each)."""
        return max(READ_BLOCK, self.chunk)

    def executable(self, program: Program) -> jax.stages.Compiled:
        """`program` compiled: what every call of the engine runs, compiled the first time the process needs
        it."""
        compiled = self._held.get(program)
        if compiled is not None:
            return compiled
        key = (program, self._signature)
        compiled = _TABLE.get(key)
        if compiled is None:
            if self.on_compile is not None:
                self.on_compile(program)
            compiled = self.lower(program).compile()
            _TABLE.put(key, compiled)
        self.compiled.add(program)
        self._held[program] = compiled
        return compiled


def _batch_shards(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def _decode_rows(slots: int, slot_sharding) -> list[int]:
    """The row counts decode programs are compiled for: 1, 2, 4, ... and `slots`, so that a step costs the
    slots in use; only `slots` when the slots are split over devices (the first few rows would sit on some of
    them only). A row's logits can differ between row counts at float rounding (a matrix-vector product sums
    in another order than a matrix product), as between one device and several."""
    spec = getattr(slot_sharding, "spec", None)
    if spec is not None and len(spec) > 0 and spec[0] is not None:
        return [slots]
    return sorted({1 << i for i in range(slots.bit_length()) if 1 << i < slots} | {slots})


def state_shapes(config: ModelConfig, mesh, settings: EngineSettings) -> tuple[Pool, SlotState]:
    """The page pool and the slot state as ShapeDtypeStructs placed on `mesh`. The pool is (layers, pages, 2,
    kv_heads, block_size, head_dim) in the compute dtype, or int8 with a float32 scale per position and head
    (`kv_cache.py`), or where the TPU kernel reads it (`ragged_paged.uses_kernel`) its layout; its heads split
    like the model's. The slots' lengths and state split like a batch."""
    slots = settings.max_num_seqs

    def placed(shape, dtype, names):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=named_sharding(mesh, names, shape))

    def per_slot(dtype, *rest):
        return placed((slots, *rest), dtype, ("batch",) + (None,) * len(rest))

    layers, pages, block = config.n_layers, settings.num_pages, settings.block_size
    int8 = settings.kv_cache_dtype == "int8"
    if uses_kernel(config.attention, mesh_platform(mesh), settings.kv_cache_dtype, config.head_dim):
        shape = (layers, pages, block, 2 * config.n_kv_heads, config.head_dim)
        return Pool(placed(shape, config.dtype, KERNEL_CACHE_AXES), None, per_slot(jnp.int32)), _slot_state(per_slot)
    shape = (layers, pages, 2, config.n_kv_heads, block, config.head_dim)
    kv = placed(shape, jnp.int8 if int8 else config.dtype, CACHE_AXES)
    scales = placed(shape[:-1], jnp.float32, SCALE_AXES) if int8 else None
    return Pool(kv, scales, per_slot(jnp.int32)), _slot_state(per_slot)


def _slot_state(per_slot) -> SlotState:
    key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
    sampling = RowSampling(per_slot(jnp.float32), per_slot(jnp.int32), per_slot(jnp.float32))
    return SlotState(
        per_slot(jnp.int32),
        per_slot(jnp.int32),
        per_slot(key_dtype),
        sampling,
        per_slot(jnp.int32),
        per_slot(jnp.int32, DEVICE_STOP_IDS),
        per_slot(jnp.bool_),
        per_slot(jnp.bool_),
        per_slot(jnp.int32),
    )
