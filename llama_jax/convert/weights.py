"""What every weight format shares: the table of weights, their layouts, and the streaming tree builder.

Meta, llama2.c and Hugging Face all store a weight as PyTorch does, (out_features, in_features), with
one tensor per layer. Our tree (see `llama_jax.model`) stores head-explicit, input-major weights stacked
over layers. `WEIGHTS` names every weight in each convention; `to_model_layout` and `to_torch_layout`
move one tensor between the two.

`build_params` fills the tree one source tensor at a time into arrays allocated once, so a conversion
holds the output model plus a single source tensor, never two copies of the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from flax import nnx

from llama_jax.config import ModelConfig
from llama_jax.model import abstract_state


@dataclasses.dataclass(frozen=True)
class Weight:
    key: str  # path in our parameter tree
    meta: str  # Meta (and llama2.c) name; per-layer names are under "layers.{i}."
    hf: str  # Hugging Face name; per-layer names are under "model.layers.{i}."
    per_layer: bool
    torch_shape: Callable[[ModelConfig], tuple[int, ...]]  # (out, in), as the files store it


def _q(c: ModelConfig) -> int:
    return c.n_heads * c.head_dim


def _kv(c: ModelConfig) -> int:
    return c.n_kv_heads * c.head_dim


WEIGHTS: tuple[Weight, ...] = (
    Weight("embed", "tok_embeddings", "model.embed_tokens", False, lambda c: (c.vocab_size, c.dim)),
    Weight("layers/attention_norm/scale", "attention_norm", "input_layernorm", True, lambda c: (c.dim,)),
    Weight("layers/attention/wq", "attention.wq", "self_attn.q_proj", True, lambda c: (_q(c), c.dim)),
    Weight("layers/attention/wk", "attention.wk", "self_attn.k_proj", True, lambda c: (_kv(c), c.dim)),
    Weight("layers/attention/wv", "attention.wv", "self_attn.v_proj", True, lambda c: (_kv(c), c.dim)),
    Weight("layers/attention/wo", "attention.wo", "self_attn.o_proj", True, lambda c: (c.dim, _q(c))),
    Weight("layers/mlp_norm/scale", "ffn_norm", "post_attention_layernorm", True, lambda c: (c.dim,)),
    Weight("layers/mlp/w_gate", "feed_forward.w1", "mlp.gate_proj", True, lambda c: (c.ffn_dim, c.dim)),
    Weight("layers/mlp/w_down", "feed_forward.w2", "mlp.down_proj", True, lambda c: (c.dim, c.ffn_dim)),
    Weight("layers/mlp/w_up", "feed_forward.w3", "mlp.up_proj", True, lambda c: (c.ffn_dim, c.dim)),
    Weight("norm/scale", "norm", "model.norm", False, lambda c: (c.dim,)),
    Weight("lm_head", "output", "lm_head", False, lambda c: (c.vocab_size, c.dim)),
)
WEIGHT_BY_META = {w.meta: w for w in WEIGHTS}
# The weights whose output rows are RoPE dimensions: Meta and llama2.c order them differently.
ROTARY_KEYS = {"layers/attention/wq": "n_heads", "layers/attention/wk": "n_kv_heads"}


def weights_for(config: ModelConfig) -> tuple[Weight, ...]:
    return tuple(w for w in WEIGHTS if not (w.key == "lm_head" and config.tie_embeddings))


def meta_name(weight: Weight, layer: int | None) -> str:
    return f"{weight.meta}.weight" if layer is None else f"layers.{layer}.{weight.meta}.weight"


def hf_name(weight: Weight, layer: int | None) -> str:
    return f"{weight.hf}.weight" if layer is None else f"model.layers.{layer}.{weight.hf}.weight"


def half_split_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a Meta/llama2.c wq or wk, (n_heads·head_dim, dim), from RoPE's interleaved
    pairs (2i, 2i+1) to the half-split pairs (i, i + head_dim/2) of Hugging Face and this model.
    (transformers' convert_llama_weights_to_hf.py `permute`.)"""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def to_model_layout(weight: Weight, w: np.ndarray, config: ModelConfig) -> np.ndarray:
    """One layer's tensor, (out, in), in our layout (a view where numpy can make one)."""
    c = config
    if weight.key in ("layers/attention/wq", "layers/attention/wk", "layers/attention/wv"):
        return w.T.reshape(c.dim, -1, c.head_dim)
    if weight.key == "layers/attention/wo":
        return w.T.reshape(-1, c.head_dim, c.dim)
    if w.ndim == 2 and weight.key != "embed":
        return w.T
    return w


def to_torch_layout(weight: Weight, w: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Inverse of `to_model_layout`: one layer's tensor as PyTorch stores it, (out, in)."""
    if weight.key in ("layers/attention/wq", "layers/attention/wk", "layers/attention/wv"):
        return w.reshape(config.dim, -1).T
    if weight.key == "layers/attention/wo":
        return w.reshape(-1, config.dim).T
    if w.ndim == 2 and weight.key != "embed":
        return w.T
    return w


class ParamTreeBuilder:
    """The model's parameter tree as numpy arrays allocated once (np.empty: pages are only touched as
    they are filled), filled tensor by tensor, with a record of what is still missing."""

    def __init__(self, config: ModelConfig):
        _, abstract = abstract_state(config)
        self._arrays = {key: np.empty(a.shape, a.dtype) for key, a in _flatten(nnx.to_pure_dict(abstract)).items()}
        self._missing = {
            (key, layer)
            for key, a in self._arrays.items()
            for layer in (range(a.shape[0]) if key.startswith("layers/") else [None])
        }

    def put(self, key: str, value: np.ndarray, layer: int | None) -> None:
        target = self._arrays[key] if layer is None else self._arrays[key][layer]
        if value.shape != target.shape:
            raise ValueError(f"parameter {key}: got shape {value.shape}, the model needs {target.shape}")
        target[...] = value  # casts to the parameter dtype
        self._missing.discard((key, layer))

    def tree(self) -> dict:
        if self._missing:
            key, layer = sorted(self._missing, key=str)[0]
            raise ValueError(f"parameter {key} (layer {layer}) was never filled")
        return _unflatten(self._arrays)


def build_params(
    config: ModelConfig, read: Callable[[Weight, int | None], tuple[str, np.ndarray]], interleaved_rope: bool
) -> dict:
    """The parameter tree from `read(weight, layer) -> (source name, tensor in torch layout)`, checking
    every tensor's shape against the config and permuting wq/wk rows when the source uses Meta's
    interleaved RoPE layout."""
    builder = ParamTreeBuilder(config)
    for weight in weights_for(config):
        for layer in range(config.n_layers) if weight.per_layer else [None]:
            name, tensor = read(weight, layer)
            expected = weight.torch_shape(config)
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"tensor {name} has shape {tuple(tensor.shape)}, but the model config needs {expected}"
                )
            if interleaved_rope and weight.key in ROTARY_KEYS:
                tensor = half_split_rows(tensor, getattr(config, ROTARY_KEYS[weight.key]))
            builder.put(weight.key, to_model_layout(weight, tensor, config), layer)
    return builder.tree()


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        flat.update(_flatten(value, key + "/") if isinstance(value, dict) else {key: value})
    return flat


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree
