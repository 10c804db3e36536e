"""`infer.py --compile-for TARGET` and `serve --compile-for TARGET`: the engine's own programs — the prefill of
each prompt bucket given, the chunk extension of longer prompts, the decode loop, as `compiled.EnginePrograms`
lowers them for a running engine — compiled for a TPU slice or GPUs on any host, with no weights or
tokenizer."""

from __future__ import annotations

import math

import jax.numpy as jnp

from llama_jax import flops
from llama_jax.aot import FunctionReport, Workload, compile_function
from llama_jax.attention import choose_implementation
from llama_jax.config import ModelConfig
from llama_jax.hardware import GpuTarget, TpuSlice, target_devices
from llama_jax.inference.compiled import EnginePrograms
from llama_jax.inference.settings import MAX_STEPS, EngineSettings
from llama_jax.inference.types import Program
from llama_jax.loading import spread_kv_heads
from llama_jax.sharding import MeshConfig, make_mesh, mesh_platform


def compile_inference(
    model: ModelConfig,
    target: TpuSlice | GpuTarget,
    mesh_config: MeshConfig,
    settings: EngineSettings,
    prompt_lens: list[int],
) -> tuple[list[FunctionReport], dict]:
    """The prefill of the bucket of each prompt length (up to a chunk; all `prefill_rows` rows at once: the
    most a prefill call holds), the extension by a whole chunk when a prompt is longer, and the decode loop of
    all the slots, for an engine of `settings` (their max_model_len: the cache of one sequence); and what its
    KV cache's page pool holds (`kv_cache_report`)."""
    mesh = make_mesh(mesh_config, target_devices(target))
    model = spread_kv_heads(model, mesh)  # as `load` would place the weights on this mesh
    return compile_engine(model, mesh, settings, prompt_lens)


def compile_engine(
    model: ModelConfig,
    mesh,
    settings: EngineSettings,
    prompt_lens: list[int],
    resident_bytes: int = 0,
    prefix: str = "",
) -> tuple[list[FunctionReport], dict]:
    """`compile_inference`'s programs for a model already shaped for `mesh` (a training job's, whose GRPO rollouts
    run the engine on the train state's weights): each report named `prefix` + the program's name, its peak
    counting `resident_bytes` per chip held beside it (the optimizer state)."""
    programs = EnginePrograms.abstract(model, mesh, settings)
    prefill_attention = choose_implementation(model.attention, model.dtype, mesh_platform(mesh), differentiable=False)
    rows = programs.prefill_rows_for(programs.prefill_rows)
    wanted = [Program("prefill", rows, bucket) for bucket in sorted({programs.bucket(n) for n in prompt_lens})]
    # A chunk after the first, and decoding, read the paged cache: the TPU kernel, or blocks through einsums
    # (`attention.attend_live_cache`).
    paged = "ragged_paged" if programs.shapes[0].kv.ndim == 5 else "xla"
    if max(prompt_lens) > programs.chunk:
        wanted.append(Program("extend", 1, programs.chunk))
    # The decode program of all the slots: the largest of those of fewer rows the engine also runs.
    wanted.append(Program("decode", programs.slots))
    reports = []
    for program in wanted:
        if program.kind == "prefill":
            workload, attention = prefill_workload(model, mesh, rows, program.bucket), prefill_attention
        elif program.kind == "extend":
            workload, attention = prefill_workload(model, mesh, 1, program.bucket), paged
        else:
            workload, attention = decode_workload(model, mesh, programs.slots, programs.cache_len), paged
        lower = lambda program=program: programs.lower(program)  # noqa: E731
        name = prefix + program.name
        reports.append(compile_function(name, lower, mesh, workload, attention, resident_bytes=resident_bytes))
    return reports, kv_cache_report(programs)


def kv_cache_report(programs: EnginePrograms) -> dict:
    """The page pool of an engine: its pages and their size, its dtype, its bytes on one chip, and how many
    sequences of max_model_len positions it holds at once — all of them with pages; with fixed slots, as many
    as the same bytes hold of slots of the model's whole context."""
    settings = programs.settings
    pool = programs.shapes[0]
    arrays = [a for a in (pool.kv, pool.scales) if a is not None]
    per_chip = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in arrays)
    pages_per_seq = -(-settings.max_model_len // settings.block_size)
    context = programs.config.max_seq_len
    return {
        "pages": settings.num_pages,
        "block_size": settings.block_size,
        "tokens": settings.kv_cache_tokens,
        "dtype": "int8" if pool.scales is not None else str(pool.kv.dtype),
        "gib_per_chip": round(per_chip / 2**30, 3),
        "max_model_len": settings.max_model_len,
        "sequences": min(settings.max_num_seqs, settings.num_pages // pages_per_seq),
        "fixed_slots_of_the_context": settings.kv_cache_tokens // context,
    }


def _weight_bytes(model: ModelConfig, mesh) -> float:
    """Bytes of weights each chip reads per forward pass: all of them, split only by tensor parallelism."""
    return model.param_count() * jnp.dtype(model.param_dtype).itemsize / mesh.shape["tensor"]


def _cache_bytes(model: ModelConfig, batch: int, length: int) -> float:
    return 2 * model.n_layers * batch * length * model.n_kv_heads * model.head_dim * jnp.dtype(model.dtype).itemsize


def prefill_workload(model: ModelConfig, mesh, rows: int, bucket: int) -> Workload:
    chips = mesh.devices.size
    work = flops.forward_flops_per_token(model, bucket) * rows * bucket / chips
    traffic = _weight_bytes(model, mesh) + _cache_bytes(model, rows, bucket) / chips
    return Workload(work, work, traffic, rows * bucket)


def decode_workload(model: ModelConfig, mesh, slots: int, cache_len: int) -> Workload:
    """One call: MAX_STEPS steps of one token per slot over a full cache, the weights and the whole cache
    read once per step."""
    chips = mesh.devices.size
    work = flops.forward_flops_per_token(model, cache_len) * slots * MAX_STEPS / chips
    traffic = (_weight_bytes(model, mesh) + _cache_bytes(model, slots, cache_len) / chips) * MAX_STEPS
    return Workload(work, work, traffic, slots * MAX_STEPS)
