"""`infer.py --compile-for TARGET` and `serve --compile-for TARGET`: the engine's own programs — the prefill of
each prompt bucket given, the chunk extension of longer prompts, the decode loop, as `compiled.EnginePrograms`
lowers them for a running engine — compiled for a TPU slice or GPUs on any host, with no weights or
tokenizer."""

from __future__ import annotations

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
) -> list[FunctionReport]:
    """The prefill of the bucket of each prompt length (up to a chunk; all `prefill_rows` rows at once: the
    most a prefill call holds), the extension by a whole chunk when a prompt is longer, and the decode loop of
    all the slots, for an engine of `settings` (their max_model_len: the cache of one sequence)."""
    mesh = make_mesh(mesh_config, target_devices(target))
    model = spread_kv_heads(model, mesh)  # as `load` would place the weights on this mesh
    programs = EnginePrograms.abstract(model, mesh, settings)
    prefill_attention = choose_implementation(model.attention, model.dtype, mesh_platform(mesh), differentiable=False)
    rows = programs.prefill_rows_for(programs.prefill_rows)
    wanted = [Program("prefill", rows, bucket) for bucket in sorted({programs.bucket(n) for n in prompt_lens})]
    # A chunk after the first, and decoding, read the cache block by block through einsums
    # (`attention.attend_live_cache`).
    if max(prompt_lens) > programs.chunk:
        wanted.append(Program("extend", 1, programs.chunk))
    # The decode program of all the slots: the largest of those of fewer rows the engine also runs.
    wanted.append(Program("decode", programs.slots))
    reports = []
    for program in wanted:
        if program.kind == "prefill":
            workload, attention = prefill_workload(model, mesh, rows, program.bucket), prefill_attention
        elif program.kind == "extend":
            workload, attention = prefill_workload(model, mesh, 1, program.bucket), "xla"
        else:
            workload, attention = decode_workload(model, mesh, programs.slots, programs.cache_len), "xla"
        lower = lambda program=program: programs.lower(program)  # noqa: E731
        reports.append(compile_function(program.name, lower, mesh, workload, attention))
    return reports


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
