"""`infer.py --compile-for SLICE`: compile prefill and one decode step of a serving setting (model, batch,
prompt length, new tokens) for a TPU slice, on any host, with no weights or tokenizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax import flops
from llama_jax.aot import FunctionReport, Workload, compile_function
from llama_jax.attention import choose_implementation
from llama_jax.config import ModelConfig
from llama_jax.hardware import TpuSlice, slice_devices
from llama_jax.inference.decode import prefill_chunk, prefill_jit, step_jit
from llama_jax.inference.sampling import SamplingParams
from llama_jax.kv_cache import CACHE_AXES, KVCache
from llama_jax.model import abstract_state
from llama_jax.sharding import MeshConfig, make_mesh, mesh_platform, named_sharding


def compile_inference(
    model: ModelConfig, tpu: TpuSlice, mesh_config: MeshConfig, batch: int, prompt_len: int, max_new_tokens: int
) -> list[FunctionReport]:
    """Prefill of `batch` prompts of `prompt_len` tokens into a cache of prompt_len + max_new_tokens slots,
    then one decode step over the full cache (the slowest step of a generation)."""
    cache_len = prompt_len + max_new_tokens
    if cache_len > model.max_seq_len:
        raise ValueError(
            f"prompt_len + max_new_tokens = {cache_len} exceeds the model's max_seq_len {model.max_seq_len}"
        )
    key_dtype = jax.random.key(0).dtype  # made before any device of the slice is involved
    mesh = make_mesh(mesh_config, slice_devices(tpu))
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % rows:
        raise ValueError(f"batch {batch} must be a multiple of the mesh's data × fsdp = {rows}")
    graphdef, state = abstract_state(model, mesh)

    def placed(shape, dtype, names):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=named_sharding(mesh, names, shape))

    cache_shape = (model.n_layers, batch, model.n_kv_heads, cache_len, model.head_dim)
    cache = KVCache(
        placed(cache_shape, model.dtype, CACHE_AXES),
        placed(cache_shape, model.dtype, CACHE_AXES),
        placed((batch,), jnp.int32, ("batch",)),
    )
    keys = placed((batch,), key_dtype, ("batch",))
    greedy = SamplingParams()
    attention = choose_implementation(model.attention, model.dtype, mesh_platform(mesh))
    prompts = placed((batch, prompt_len), jnp.int32, ("batch", None))
    lengths = placed((batch,), jnp.int32, ("batch",))
    tokens = placed((batch,), jnp.int32, ("batch",))
    step = jax.ShapeDtypeStruct((), jnp.int32)

    def lower_prefill():
        return prefill_jit.lower(
            graphdef, state, prompts, lengths, keys, cache_len=cache_len, chunk=prefill_chunk(batch), sampling=greedy
        )

    def lower_decode():
        return step_jit.lower(graphdef, state, tokens, cache, keys, step, sampling=greedy)

    # Decoding attends to the cache through the reference einsums: a few queries over a long cache.
    return [
        compile_function("prefill", lower_prefill, mesh, prefill_workload(model, mesh, batch, prompt_len), attention),
        compile_function("decode_step", lower_decode, mesh, decode_workload(model, mesh, batch, cache_len), "xla"),
    ]


def _weight_bytes(model: ModelConfig, mesh) -> float:
    """Bytes of weights each chip reads per forward pass: all of them, split only by tensor parallelism."""
    return model.param_count() * jnp.dtype(model.param_dtype).itemsize / mesh.shape["tensor"]


def _cache_bytes(model: ModelConfig, batch: int, length: int) -> float:
    return 2 * model.n_layers * batch * length * model.n_kv_heads * model.head_dim * jnp.dtype(model.dtype).itemsize


def prefill_workload(model: ModelConfig, mesh, batch: int, prompt_len: int) -> Workload:
    chips = mesh.devices.size
    work = flops.forward_flops_per_token(model, prompt_len) * batch * prompt_len / chips
    traffic = _weight_bytes(model, mesh) + _cache_bytes(model, batch, prompt_len) / chips
    return Workload(work, work, traffic, batch * prompt_len)


def decode_workload(model: ModelConfig, mesh, batch: int, cache_len: int) -> Workload:
    """One token per row, attending to a full cache: weights and the whole cache read once."""
    chips = mesh.devices.size
    work = flops.forward_flops_per_token(model, cache_len) * batch / chips
    traffic = _weight_bytes(model, mesh) + _cache_bytes(model, batch, cache_len) / chips
    return Workload(work, work, traffic, batch)
