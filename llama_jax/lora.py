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

An adapter BANK serves several adapters on one base in one batch (`{weight}_bank_a` (layers, n, *in, R) and
`{weight}_bank_b` (layers, n, R, *out) beside W, built by `adapters.attach_bank`): entry 0 is zeros (the base),
ranks below R are padded with zeros (exact), and each adapter's scale is folded into its B, so one pair of
batched einsums adds every row's own delta, chosen by its `adapter_ids` entry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.config import LORA_TARGETS, LoraConfig
from llama_jax.sharding import global_array, named_sharding

RANK_AXIS = "lora_rank"  # a logical axis the rules table never shards
SUFFIXES = ("_lora_a", "_lora_b")
BANK_SUFFIXES = ("_bank_a", "_bank_b")
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
    module: nnx.Module,
    weight: str,
    equation: str,
    x: jax.Array,
    lora: LoraConfig,
    dropout_key: jax.Array | None = None,
    adapter_ids: jax.Array | None = None,
) -> jax.Array:
    """`einsum(equation, x, W)` plus, when `module` has adapters for W, scale · (dropout(x)·A)·B. An int8 W
    (quantize.py) has a per-output-channel scale, applied to the product. Dropout (PEFT's: inverted, on the
    adapter's input only, a mask of its own per weight) acts only when a `dropout_key` is given: training.
    With `adapter_ids` (batch,) and a bank for W, each row adds the delta of its own bank entry (0: none)."""
    out = jnp.einsum(equation, x, getattr(module, weight)[...].astype(x.dtype))
    channel_scale = getattr(module, weight + "_scale", None)
    if channel_scale is not None:
        out = out * channel_scale[...].astype(out.dtype)
    if adapter_ids is not None and hasattr(module, weight + "_bank_a"):
        out = out + _bank_delta(module, weight, equation, x, adapter_ids).astype(out.dtype)
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


def _bank_delta(module: nnx.Module, weight: str, equation: str, x: jax.Array, adapter_ids: jax.Array) -> jax.Array:
    """Each row's (x·A)·B with its own bank entry's A (n, *in, R) and B (n, R, *out), scale already in B: every
    entry's A applied to every row, each row's own kept (a one-hot over the bank, exact zeros elsewhere), then
    the B's. No per-row copy of an adapter is made: gathering them moved more memory than the arithmetic it
    saves at serving's ranks (n·R columns beside a projection's thousands; `benchmarks/serve_structured.py`).
    An id outside the bank, negative ones too, keeps nothing: the base."""
    bank_a, bank_b = getattr(module, weight + "_bank_a")[...], getattr(module, weight + "_bank_b")[...]
    inputs, result = equation.split("->")
    x_axes, w_axes = inputs.split(",")
    n_in = bank_a.ndim - 2
    in_axes, out_axes = w_axes[:n_in], w_axes[n_in:]
    kept = "".join(c for c in x_axes if c not in in_axes)  # batch, then length
    low = jnp.einsum(f"{x_axes},n{in_axes}r->{kept}nr", x, bank_a.astype(x.dtype))
    own = adapter_ids[:, None] == jnp.arange(bank_a.shape[0])  # (batch, n)
    low = low * own.reshape(own.shape[0], *(1,) * (len(kept) - 1), own.shape[1], 1).astype(low.dtype)
    return jnp.einsum(f"{kept}nr,nr{out_axes}->{result}", low, bank_b.astype(x.dtype))


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


def bank_arrays(
    adapters: Sequence[tuple[np.ndarray, np.ndarray, float] | None], weight_shape: tuple[int, ...], n_in: int, dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Host arrays of a bank for one stacked weight (layers, *in, *out): A (layers, 1 + n, *in, R) and B (layers,
    1 + n, R, *out) from each adapter's (A (layers, *in, r), B (layers, r, *out), scale), or None where an
    adapter leaves the weight alone. Entry 0 and the padding beyond an adapter's rank are zeros, so they add
    exactly nothing; the scale is folded into B in float32 before rounding to `dtype`."""
    layers, in_shape, out_shape = weight_shape[0], weight_shape[1 : 1 + n_in], weight_shape[1 + n_in :]
    rank = max((a.shape[-1] for a, _, _ in filter(None, adapters)), default=1)
    bank_a = np.zeros((layers, 1 + len(adapters), *in_shape, rank), np.float32)
    bank_b = np.zeros((layers, 1 + len(adapters), rank, *out_shape), np.float32)
    for i, adapter in enumerate(adapters, start=1):
        if adapter is not None:
            a, b, scale = adapter
            bank_a[:, i, ..., : a.shape[-1]] = a
            bank_b[:, i, : b.shape[1]] = scale * np.asarray(b, np.float32)
    return bank_a.astype(dtype), bank_b.astype(dtype)


def set_bank(module: nnx.Module, weight: str, bank_a: np.ndarray, bank_b: np.ndarray) -> None:
    """Put a bank (`bank_arrays`) beside the stacked weight of `module`, named by the weight's own logical axes
    (the adapter axis replicated, the rank axis never sharded) and placed as they say on the weight's mesh."""
    param = getattr(module, weight)
    names = param.get_metadata()["out_sharding"]
    n_in = bank_a.ndim - 3
    axes_a = (names[0], None, *names[1 : 1 + n_in], RANK_AXIS)
    axes_b = (names[0], None, RANK_AXIS, *names[1 + n_in :])
    placement = param[...].sharding
    for suffix, value, axes in (("_bank_a", bank_a, axes_a), ("_bank_b", bank_b, axes_b)):
        if isinstance(placement, jax.sharding.NamedSharding):
            value = global_array(value, named_sharding(placement.mesh, axes, value.shape))
        else:  # a model outside any mesh (one device): beside its weight
            value = jax.device_put(value, placement)
        setattr(module, weight + suffix, nnx.Param(value, out_sharding=axes, eager_sharding=False))


def remove_bank(module: nnx.Module) -> None:
    """Drop every bank of `module`: the plain weights again."""
    for name in [name for name in vars(module) if name.endswith(BANK_SUFFIXES)]:
        delattr(module, name)
