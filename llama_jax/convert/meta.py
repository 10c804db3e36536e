"""Import Meta's own checkpoints: params.json, consolidated.NN.pth model-parallel shards, tokenizer.model.

Meta's model-parallel layers split each weight along one dimension: column-parallel wq, wk, wv, w1, w3
and output along dim 0 (rows); row-parallel wo and w2 along dim 1; the embedding along dim 1 in LLaMA 1
and 2 (ParallelEmbedding) and along dim 0 in Llama 3 (VocabParallelEmbedding); norms are replicated.
The split dimension is read off the shard shapes. RoPE rotates interleaved pairs, so wq/wk rows are
permuted to the half-split layout (transformers' convert_llama_weights_to_hf.py does the same).

Shards are memory-mapped (`torch.load(mmap=True)`) and merged one tensor at a time. PyTorch is needed
for this format only and is imported when it is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from llama_jax.chat import detect_chat_template
from llama_jax.config import ModelConfig, RopeScaling, ffn_dim_for
from llama_jax.convert.common import (
    chat_template_choice,
    dtype_name,
    find_tokenizer,
    source_description,
    with_dtype,
    write_converted,
)
from llama_jax.convert.weights import Weight, build_params, meta_name
from llama_jax.staging import ensure_new_output_dir

# Llama 3.1 scaling as Meta ships it; the factor is 32 for the tied-embedding Llama 3.2 1B and 3B
# (meta-llama/llama-models issue #241; transformers' converter does the same), 8 otherwise.
_SCALED_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)


def _torch():
    try:
        import torch
    except ImportError:
        raise ValueError(
            "converting Meta checkpoints needs PyTorch: pip install torch (the CPU build is enough)"
        ) from None
    return torch


class _Shards:
    """The consolidated.NN.pth files of one checkpoint, memory-mapped, merged tensor by tensor."""

    def __init__(self, meta_dir: Path):
        torch = _torch()
        self.paths = sorted(meta_dir.glob("consolidated.*.pth"))
        if not self.paths:
            raise ValueError(f"{meta_dir} has no consolidated.NN.pth files: not a Meta checkpoint directory")
        self.shards = []
        for path in self.paths:
            try:
                shard = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # torch raises many types for damaged files
                raise ValueError(
                    f"{path}: cannot read this PyTorch checkpoint ({type(e).__name__}: "
                    f"{' '.join(str(e).split())[:200]})"
                ) from None
            if not isinstance(shard, dict):
                raise ValueError(f"{path}: not a Meta checkpoint (expected a dict of tensors)")
            self.shards.append(shard)

    def has(self, name: str) -> bool:
        return name in self.shards[0]

    def shapes(self, name: str) -> list[tuple[int, ...]]:
        for path, shard in zip(self.paths, self.shards):
            if name not in shard:
                raise ValueError(f"{path}: tensor {name} is missing")
        return [tuple(shard[name].shape) for shard in self.shards]

    def first(self, name: str):
        self.shapes(name)
        return self.shards[0][name]

    def merged(self, name: str, expected: tuple[int, ...]):
        """The full tensor: replicated shards give themselves, split shards are concatenated along the
        one dimension whose sizes add up to the expected shape."""
        shapes = self.shapes(name)
        parts = [shard[name] for shard in self.shards]
        if all(shape == expected for shape in shapes):
            return parts[0]
        for dim in range(len(expected)):
            others_match = all(s[:dim] + s[dim + 1 :] == expected[:dim] + expected[dim + 1 :] for s in shapes)
            if len(expected) == len(shapes[0]) and others_match and sum(s[dim] for s in shapes) == expected[dim]:
                return _torch().cat(parts, dim=dim)
        raise ValueError(f"tensor {name}: shard shapes {shapes} do not make the shape {expected} the config needs")


def _numpy(tensor) -> np.ndarray:
    torch = _torch()
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16 of its own: reinterpret the bits
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _vocab_size(params: dict[str, Any], shards: _Shards, dim: int) -> int:
    """params.json's vocab_size, or (LLaMA 1 and 2 say -1) the embedding's, however it is split."""
    if params.get("vocab_size", -1) > 0:
        return int(params["vocab_size"])
    shapes = shards.shapes("tok_embeddings.weight")
    if all(len(s) == 2 and s[1] == dim for s in shapes):
        return sum(s[0] for s in shapes)
    if all(len(s) == 2 and s[0] == shapes[0][0] for s in shapes) and sum(s[1] for s in shapes) == dim:
        return shapes[0][0]
    raise ValueError(f"tok_embeddings.weight: shard shapes {shapes} do not fit dim {dim}")


def _default_max_seq_len(params: dict[str, Any]) -> int:
    """The context length of each generation, which params.json does not record: transformers'
    converter's table, except that LLaMA 1 (indistinguishable from LLaMA 2 here) gets 4096, not 2048."""
    if params.get("max_seq_len"):
        return int(params["max_seq_len"])
    theta = float(params.get("rope_theta", 10000.0))
    if params.get("use_scaled_rope"):
        return 131072  # Llama 3.1 / 3.2
    if theta == 500000.0:
        return 8192  # Llama 3
    return 16384 if theta > 10000.0 else 4096  # Code Llama; LLaMA 1 and 2


def config_from_meta(
    params: dict[str, Any],
    shards: _Shards,
    source: Path,
    max_seq_len: int | None = None,
    rope_scaling_factor: float | None = None,
) -> ModelConfig:
    params = params.get("model", params)
    missing = [key for key in ("dim", "n_layers", "n_heads") if key not in params]
    if missing:
        raise ValueError(f"{source}: missing field {missing[0]!r}")
    dim = int(params["dim"])
    vocab_size = _vocab_size(params, shards, dim)
    tied = not shards.has("output.weight") or bool(
        _torch().equal(
            shards.merged("tok_embeddings.weight", (vocab_size, dim)), shards.merged("output.weight", (vocab_size, dim))
        )
    )
    scaling = None
    if params.get("use_scaled_rope"):
        factor = rope_scaling_factor or params.get("rope_scaling_factor") or (32.0 if tied else 8.0)
        scaling = RopeScaling(factor=float(factor), **_SCALED_ROPE)
    try:
        return ModelConfig(
            vocab_size=vocab_size,
            dim=dim,
            n_layers=int(params["n_layers"]),
            n_heads=int(params["n_heads"]),
            n_kv_heads=int(params.get("n_kv_heads") or params["n_heads"]),
            ffn_dim=ffn_dim_for(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")),
            max_seq_len=max_seq_len or _default_max_seq_len(params),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            tie_embeddings=tied,
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def load_meta(
    meta_dir: str | Path,
    dtype: str | None = None,
    max_seq_len: int | None = None,
    rope_scaling_factor: float | None = None,
) -> tuple[ModelConfig, dict]:
    """The model config and parameter tree (numpy) of a Meta checkpoint directory."""
    meta_dir = Path(meta_dir)
    params_path, params = source_description(meta_dir, "params.json", "Meta checkpoint")
    shards = _Shards(meta_dir)
    config = config_from_meta(params, shards, params_path, max_seq_len, rope_scaling_factor)
    source_dtype = _numpy(shards.first("tok_embeddings.weight")[:1]).dtype
    config = with_dtype(config, dtype_name(source_dtype, dtype))

    def read(weight: Weight, layer: int | None):
        name = meta_name(weight, layer)
        return name, _numpy(shards.merged(name, weight.torch_shape(config)))

    return config, build_params(config, read, interleaved_rope=True)


def convert_meta(
    meta_dir: str | Path,
    out: str | Path,
    tokenizer: str | Path | None = None,
    chat_template: str = "auto",
    dtype: str | None = None,
    max_seq_len: int | None = None,
    rope_scaling_factor: float | None = None,
) -> Path:
    ensure_new_output_dir(out)
    meta_dir = Path(meta_dir)
    # LLaMA 1 and 2 downloads keep one tokenizer.model beside the per-size directories.
    tok = find_tokenizer(tokenizer, [meta_dir / "tokenizer.model", meta_dir.parent / "tokenizer.model"], meta_dir)
    template = chat_template_choice(chat_template, detect_chat_template(tok))
    config, params = load_meta(meta_dir, dtype, max_seq_len, rope_scaling_factor)
    return write_converted(out, config, params, tok, template)
