"""`infer.py --compile-for TARGET` and `serve --compile-for TARGET`: the engine's own programs — the prefill of
each prompt bucket given, the chunk extension of longer prompts, the decode loop, and the prefix pool's copies,
as `slots.SlotBackend` lowers them for itself before it serves — compiled for a TPU slice or GPUs on any host, with no
weights or tokenizer."""

from __future__ import annotations

import jax.numpy as jnp

from llama_jax import flops
from llama_jax.aot import FunctionReport, Workload, compile_function
from llama_jax.attention import choose_implementation
from llama_jax.config import ModelConfig
from llama_jax.hardware import GpuTarget, TpuSlice, target_devices
from llama_jax.inference.slots import MAX_STEPS, PREFILL_CHUNK, SlotBackend
from llama_jax.sharding import MeshConfig, make_mesh, mesh_platform


def engine_backend(
    model: ModelConfig, mesh, slots: int, cache_len: int, chunk: int = PREFILL_CHUNK, pool_entries: int = 0
) -> SlotBackend:
    """The engine's device side for `slots` slots of `cache_len` positions on `mesh`, as shapes."""
    if cache_len > model.max_seq_len:
        raise ValueError(f"prompt + new tokens = {cache_len} exceeds the model's max_seq_len {model.max_seq_len}")
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if slots % rows:
        raise ValueError(f"--batch-size {slots} (decode slots) must be a multiple of the mesh's data × fsdp = {rows}")
    return SlotBackend.abstract(model, mesh, slots, cache_len, chunk=chunk, pool_entries=pool_entries)


def compile_inference(
    model: ModelConfig,
    target: TpuSlice | GpuTarget,
    mesh_config: MeshConfig,
    slots: int,
    prompt_lens: list[int],
    max_new_tokens: int,
    chunk: int = PREFILL_CHUNK,
    pool_entries: int = 0,
) -> list[FunctionReport]:
    """The prefill of the bucket of each prompt length (up to a chunk; all `prefill_rows` rows at once: the
    most a prefill call holds), the extension by a whole chunk when a prompt is longer, and the decode loop of
    `slots` slots over a cache of the longest prompt + max_new_tokens (and a pool of `pool_entries` chunks)."""
    mesh = make_mesh(mesh_config, target_devices(target))
    backend = engine_backend(model, mesh, slots, max(prompt_lens) + max_new_tokens, chunk, pool_entries)
    prefill_attention = choose_implementation(model.attention, model.dtype, mesh_platform(mesh), differentiable=False)
    rows = backend.prefill_rows_for(backend.prefill_rows)
    reports = []
    for bucket in sorted({backend.bucket(n) for n in prompt_lens}):
        program = ("prefill", rows, bucket)
        reports.append(
            compile_function(
                f"prefill_{bucket}",
                lambda program=program: backend.lower(program),
                mesh,
                prefill_workload(model, mesh, rows, bucket),
                prefill_attention,
            )
        )
    # A chunk after the first, and decoding, read the cache block by block through einsums
    # (`attention.attend_live_cache`).
    if max(prompt_lens) > backend.chunk:
        program = ("extend", backend.chunk)
        workload = prefill_workload(model, mesh, 1, backend.chunk)
        reports.append(
            compile_function(f"extend_{backend.chunk}", lambda: backend.lower(program), mesh, workload, "xla")
        )
    decode = decode_workload(model, mesh, slots, backend.cache_len)
    # The decode program of all the slots: the largest of those of fewer rows the engine also runs.
    program = ("decode", backend.slots)
    reports.append(compile_function("decode", lambda: backend.lower(program), mesh, decode, "xla"))
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
