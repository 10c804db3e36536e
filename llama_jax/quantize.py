"""int8 weights for inference: each projection matrix (wq, wk, wv, wo, w_gate, w_up, w_down) stored as int8 with
one float32 scale per output channel, `W ≈ q · scale`, q = round(W / scale), scale = max|W| / 127 over the
input axes (symmetric, per channel, as LLM.int8 and AQT's weight-only mode).

The matmul reads the int8 weights (half of bf16's bytes, a quarter of float32's: decoding is bound by
reading them) and applies the scale to its output, `x·q·scale = (x·q)·scale`, which is exact. Embeddings,
norms and the output layer stay as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.config import LORA_TARGETS

# weight -> (module, number of leading input axes): the same projections LoRA can adapt
WEIGHTS = {weight: (module, n_in) for module, weight, n_in in LORA_TARGETS.values()}
SCALE_SUFFIX = "_scale"


def quantize_weight(w: jax.Array, in_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(int8 q, float32 scale) of a weight whose `in_axes` are its inputs: scale has the other axes."""
    w = w.astype(jnp.float32)
    axes = in_axes
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return q, jnp.squeeze(scale, axis=axes)


def round_trip(w: jax.Array, in_axes: tuple[int, ...]) -> jax.Array:
    """The float32 weight that int8 quantization of `w` stands for (q · scale): what a QLoRA run's adapters
    were trained on."""
    q, scale = quantize_weight(w, in_axes)
    return q.astype(jnp.float32) * jnp.expand_dims(scale, in_axes)


def quantize_params(params: dict) -> dict:
    """A float parameter dict (nnx.to_pure_dict layout) with every projection replaced by int8 + scale."""
    layers = {name: dict(module) for name, module in params["layers"].items()}
    for weight, (module, n_in) in WEIGHTS.items():
        q, scale = quantize_weight(layers[module][weight], tuple(range(1, 1 + n_in)))  # axis 0: layers
        layers[module][weight], layers[module][weight + SCALE_SUFFIX] = q, scale
    return {**params, "layers": layers}


def dequantize_params(params: dict) -> dict:
    """The float32 weights an int8 parameter dict stands for (q · scale), scales dropped."""
    layers = {name: dict(module) for name, module in params["layers"].items()}
    for weight, (module, n_in) in WEIGHTS.items():
        scale = layers[module].pop(weight + SCALE_SUFFIX)
        q = layers[module][weight]
        layers[module][weight] = q.astype(jnp.float32) * jnp.expand_dims(scale, tuple(range(1, 1 + n_in)))
    return {**params, "layers": layers}
