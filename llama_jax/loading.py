"""A model directory (or training run) turned into a model ready to run: placed on a mesh, in the dtype asked
for, a LoRA run's adapters merged into its base, projections quantized on request, and its key/value heads
repeated to fill a tensor-parallel axis wider than their count (`spread_kv_heads`).

    loaded = load("models/stories260K", mesh=make_mesh(MeshConfig(tensor=2)), dtype="bfloat16")
    logits, _ = loaded.model(ids)
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from llama_jax.config import ModelConfig
from llama_jax.lora import join, merged, split_adapters
from llama_jax.model import Llama, abstract_state
from llama_jax.model_dir import ModelDir, lora_base_dir, read_model_dir
from llama_jax.quantize import dequantize_params, quantize_params
from llama_jax.sharding import make_mesh


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: the NNX module (parameters placed on `mesh`), its tokenizer and chat template."""

    model: Llama
    config: ModelConfig
    mesh: jax.sharding.Mesh
    tokenizer: Any = None
    chat_template: str | None = None


def load(
    path: str | Path, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None, quantize: str | None = None
) -> LoadedModel:
    """Load a model directory (converted or trained) onto `mesh` (default: all devices, data-parallel).

    `dtype` sets both the parameter and the compute dtype (e.g. "bfloat16" to serve a float32 checkpoint).
    `quantize="int8"` stores the projection weights int8 with per-channel scales (quantize.py).
    """
    model_dir = read_model_dir(path)
    tokenizer = model_dir.tokenizer()
    mesh = mesh or make_mesh()
    if model_dir.config.lora.enabled:
        config, params = _merged_lora_run(model_dir, mesh)
    else:
        config, params = model_dir.config, None
    if dtype is not None:
        config = config.replace(dtype=dtype, param_dtype=dtype)
    graphdef, state = abstract_state(config, mesh)
    if params is None:
        params = model_dir.restore_params(nnx.to_pure_dict(state))
    else:
        params = jax.tree.map(lambda p, a: p.astype(a.dtype), params, nnx.to_pure_dict(state))
    spread = spread_kv_heads(config, mesh)
    if spread != config:
        repeats = spread.n_kv_heads // config.n_kv_heads
        config = spread
        graphdef, state = abstract_state(config, mesh)
        placed = jax.tree.map(lambda a: a.sharding, nnx.to_pure_dict(state))
        params = jax.jit(functools.partial(_repeat_kv_heads, repeats=repeats), out_shardings=placed)(params)
    if quantize not in (None, "none"):
        config = config.replace(quantize=quantize)
        params = jax.jit(quantize_params)(params)
        graphdef, state = abstract_state(config, mesh)
    nnx.replace_by_pure_dict(state, params)
    return LoadedModel(nnx.merge(graphdef, state), config, mesh, tokenizer, model_dir.chat_template)


def spread_kv_heads(config: ModelConfig, mesh) -> ModelConfig:
    """The config with its key/value heads repeated to the mesh's tensor axis when that axis is wider than
    their count and a multiple of it (Llama 3 70B's 8 on a tensor axis of 16): each chip then holds one head's
    share of the KV cache — as vLLM does — instead of the whole cache, which a head split that cannot divide
    would leave on every chip. Attention is unchanged: query head h still reads a copy of its own KV head."""
    tensor, kv = mesh.shape["tensor"], config.n_kv_heads
    if tensor <= kv or tensor % kv or config.n_heads % tensor:
        return config
    return config.replace(n_kv_heads=tensor)


def _repeat_kv_heads(params: dict, repeats: int) -> dict:
    """wk and wv (and their int8 scales) with each head repeated `repeats` times in place: (kv0, kv0, kv1, ...),
    so the query heads of a group read the copy next to them."""
    attention = dict(params["layers"]["attention"])
    for name in ("wk", "wv", "wk_scale", "wv_scale"):
        if name in attention:  # (layers, embed, kv_heads, head_dim); scales (layers, kv_heads, head_dim)
            axis = 2 if name in ("wk", "wv") else 1
            attention[name] = jax.numpy.repeat(attention[name], repeats, axis=axis)
    return {**params, "layers": {**params["layers"], "attention": attention}}


def _merged_lora_run(model_dir: ModelDir, mesh) -> tuple[ModelConfig, dict]:
    """A LoRA run's model as a plain one: its base directory's weights with the run's newest intact adapters
    merged in (W + alpha/rank · A·B)."""
    base_dir = lora_base_dir(model_dir)
    run_config = model_dir.config.replace(quantize="none")
    _, abstract = abstract_state(run_config, mesh)
    adapters_target, base_target = split_adapters(nnx.to_pure_dict(abstract))
    base = base_dir.restore_params(base_target)
    if model_dir.config.quantize == "int8":  # QLoRA trained on the int8 base: merge into what it saw
        seen = jax.jit(lambda p: dequantize_params(quantize_params(p)))(base)
        base = jax.tree.map(lambda w, t: w.astype(t.dtype), seen, base)
    params = join(base, model_dir.restore_params(adapters_target))
    plain = run_config.without_adapters()
    return plain, merged(params, model_dir.config.lora)
