"""LoRA: low-rank adapters on the attention and MLP projections (Hu et al. 2021).

A targeted weight W (in → out) gets two small matrices, A (in × rank) and B (rank × out); the layer computes

    y = x·W + (alpha / rank) · (x·A)·B

with W frozen and A, B trained. B starts at zero, so a fresh adapter changes nothing; A starts as PEFT's
(Kaiming-uniform, a = √5), so an adapter trained here and one trained by PEFT are the same kind of thing.
The adapters live in the decoder layers beside the weights they adapt (`wq_lora_a`, `wq_lora_b`, ... with
the stacked `layers` axis), so the scanned stack, remat and the mesh work on them as on any parameter; A is
sharded like W's input axes, B like its output axes, and the rank axis is never sharded.

Why not qwix (Google's LoRA/QLoRA library for NNX): `qwix.apply_lora_to_model` creates the adapters by
intercepting each einsum during one traced call and attaching parameters to the module that made it. Our
layers are one `nnx.vmap`-created DecoderLayer whose state is split and merged inside `jax.lax.scan`, so
the module it would attach to is a per-step clone; with qwix 0.1.8 the call fails inside the scan
(`IndexError: tuple index out of range`, qwix having replaced the parameters it intercepts). A hand-written
adapter is two einsums per target.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.config import LORA_TARGETS, LoraConfig

RANK_AXIS = "lora_rank"  # a logical axis the rules table never shards
SUFFIXES = ("_lora_a", "_lora_b")
_DROPOUT_STREAM = {weight: i for i, (_, weight, _) in enumerate(LORA_TARGETS.values())}  # one mask per weight


def add_adapters(module: nnx.Module, lora: LoraConfig, module_name: str, rngs: nnx.Rngs) -> None:
    """Give `module` an A and a B for each of its targeted weights, sharded by the weight's own logical axes."""
    for weight, n_in in lora.weights(module_name):
        param = getattr(module, weight)
        names = param.get_metadata()["out_sharding"]
        in_shape, out_shape = param.shape[:n_in], param.shape[n_in:]
        fan_in = math.prod(in_shape)
        # PEFT's A: kaiming_uniform(a=sqrt(5)) over fan_in, i.e. uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(rngs.params(), (*in_shape, lora.rank), jnp.float32, -bound, bound)
        b = jnp.zeros((lora.rank, *out_shape), jnp.float32)
        setattr(module, weight + "_lora_a", nnx.Param(a, out_sharding=(*names[:n_in], RANK_AXIS), eager_sharding=False))
        setattr(module, weight + "_lora_b", nnx.Param(b, out_sharding=(RANK_AXIS, *names[n_in:]), eager_sharding=False))


def project(
    module: nnx.Module, weight: str, equation: str, x: jax.Array, lora: LoraConfig, dropout_key: jax.Array | None = None
) -> jax.Array:
    """`einsum(equation, x, W)` plus, when `module` has adapters for W, scale · (dropout(x)·A)·B. An int8 W
    (quantize.py) has a per-output-channel scale, applied to the product. Dropout (PEFT's: inverted, on the
    adapter's input only, a mask of its own per weight) acts only when a `dropout_key` is given: training."""
    out = jnp.einsum(equation, x, getattr(module, weight)[...].astype(x.dtype))
    channel_scale = getattr(module, weight + "_scale", None)
    if channel_scale is not None:
        out = out * channel_scale[...].astype(out.dtype)
    adapter_a = getattr(module, weight + "_lora_a", None)
    if adapter_a is None:
        return out
    if dropout_key is not None and lora.dropout > 0:
        keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, _DROPOUT_STREAM[weight]), 1 - lora.dropout, x.shape)
        x = jnp.where(keep, x / (1 - lora.dropout), 0).astype(x.dtype)
    inputs, result = equation.split("->")
    x_axes, w_axes = inputs.split(",")
    n_in = adapter_a.ndim - 1
    in_axes, out_axes = w_axes[:n_in], w_axes[n_in:]
    kept = "".join(c for c in x_axes if c not in in_axes)
    low = jnp.einsum(f"{x_axes},{in_axes}r->{kept}r", x, adapter_a[...].astype(x.dtype))
    delta = jnp.einsum(f"{kept}r,r{out_axes}->{result}", low, getattr(module, weight + "_lora_b")[...].astype(x.dtype))
    return out + (lora.scale * delta).astype(out.dtype)


def split_adapters(params: dict) -> tuple[dict, dict]:
    """(adapters, everything else) of a nested parameter dict (`nnx.to_pure_dict` layout)."""
    adapters, base = {}, {}
    for key, value in params.items():
        if isinstance(value, dict):
            sub_adapters, sub_base = split_adapters(value)
            if sub_adapters:
                adapters[key] = sub_adapters
            if sub_base:
                base[key] = sub_base
        elif str(key).endswith(SUFFIXES):
            adapters[key] = value
        else:
            base[key] = value
    return adapters, base


def join(base: dict, adapters: dict) -> dict:
    """The nested union of two disjoint parameter dicts (the inverse of `split_adapters`)."""
    joined = dict(base)
    for key, value in adapters.items():
        joined[key] = join(base.get(key, {}), value) if isinstance(value, dict) else value
    return joined


def merged_weight(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W + scale·A·B, computed in float32 and returned in W's dtype. W is (*lead, *in, *out), A (*lead, *in, r)
    and B (*lead, r, *out): `lead` is the stacked layers axis, or nothing for one layer's weight."""
    lead = a.ndim + b.ndim - w.ndim - 2
    rank = a.shape[-1]
    a = jnp.asarray(a, jnp.float32).reshape(*w.shape[:lead], -1, rank)
    b = jnp.asarray(b, jnp.float32).reshape(*w.shape[:lead], rank, -1)
    return (jnp.asarray(w, jnp.float32) + scale * jnp.matmul(a, b).reshape(w.shape)).astype(w.dtype)


def merged(params: dict, lora: LoraConfig) -> dict:
    """The plain model's parameters: each targeted W replaced by W + scale·A·B (all layers), adapters dropped."""
    adapters, base = split_adapters(params)
    out = join(base, {})
    for module in ("attention", "mlp"):
        for weight, _ in lora.weights(module):
            layer_adapters = adapters["layers"][module]
            out["layers"] = dict(out["layers"])
            out["layers"][module] = dict(out["layers"][module])
            out["layers"][module][weight] = merged_weight(
                base["layers"][module][weight],
                layer_adapters[weight + "_lora_a"],
                layer_adapters[weight + "_lora_b"],
                lora.scale,
            )
    return out
