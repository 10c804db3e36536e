"""Import karpathy/llama2.c model files (export.py versions 0, 1 and 2).

v0 ("legacy"): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a negative
    vocab_size means the classifier is not shared with the embedding), then float32 tensors: tok_emb,
    then each per-layer weight for all layers (rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3), rms_final,
    two unused RoPE tables (seq_len·head_size/2 floats each), and the classifier when unshared.
v1: uint32 magic "ak42", int32 version, the 7 ints, a uint8 shared-classifier flag, zeros to byte 256,
    then float32 norms (rms_att, rms_ffn, rms_final), tok_emb, wq, wk, wv, wo, w1, w2, w3, [classifier].
v2: as v1 plus an int32 group size after the flag; the norms stay float32, every other weight is Q8_0
    (int8 values for all weights in v1 order, then all their float32 scales, one per group).

Weights are (out, in) with RoPE on interleaved pairs, so wq/wk rows are permuted on import. The files
are read through memory maps, one layer's tensor at a time.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from pathlib import Path

import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.convert.common import chat_template_choice, dtype_name, with_dtype, write_converted
from llama_jax.convert.weights import WEIGHT_BY_META, Weight, build_params, meta_name
from llama_jax.staging import ensure_new_output_dir
from llama_jax.tokenizers import load_tokenizer

MAGIC = 0x616B3432  # "ak42"
V1_HEADER_BYTES = 256
_PER_LAYER_V0 = (
    "attention_norm",
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "ffn_norm",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)
_MATRICES_V1 = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)
_NORMS_V1 = ("attention_norm", "ffn_norm", "norm")


@dataclasses.dataclass(frozen=True)
class Header:
    version: int
    config: ModelConfig  # float32
    data_offset: int
    group_size: int = 0  # Q8_0 group (v2)


def read_header(path: Path) -> Header:
    with open(path, "rb") as f:
        head = f.read(V1_HEADER_BYTES)
    if len(head) < 28:
        raise ValueError(f"{path}: too short for a llama2.c model file")
    (magic,) = struct.unpack_from("<I", head)
    if magic != MAGIC:
        return Header(0, _config(path, struct.unpack_from("<7i", head), shared=None), 28)
    if len(head) < V1_HEADER_BYTES:
        raise ValueError(f"{path}: truncated llama2.c header")
    (version,) = struct.unpack_from("<i", head, 4)
    if version not in (1, 2):
        raise ValueError(f"{path}: unsupported llama2.c file version {version} (supported: 0, 1, 2)")
    fields = struct.unpack_from("<7i", head, 8)
    shared = head[36]
    config = _config(path, fields, shared=bool(shared))
    group_size = struct.unpack_from("<i", head, 37)[0] if version == 2 else 0
    if version == 2 and group_size <= 0:
        raise ValueError(f"{path}: corrupt llama2.c v2 header (group size {group_size})")
    return Header(version, config, V1_HEADER_BYTES, group_size)


def _config(path: Path, fields: tuple[int, ...], shared: bool | None) -> ModelConfig:
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = fields
    if shared is None:  # v0: the sign of vocab_size is the flag
        shared = vocab_size > 0
    vocab_size = abs(vocab_size)
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len) <= 0 or dim % n_heads:
        raise ValueError(f"{path}: not a llama2.c model file (header {fields} describes no model)")
    try:
        return ModelConfig(
            vocab_size=vocab_size,
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            ffn_dim=hidden_dim,
            max_seq_len=seq_len,
            norm_eps=1e-5,
            rope_theta=10000.0,
            tie_embeddings=shared,
        )
    except ValueError as e:
        raise ValueError(f"{path}: header describes an invalid model: {e}") from None


class _Regions:
    """Where each tensor lies in the file: name -> (array over all layers, or the single tensor)."""

    def __init__(self, path: Path, header: Header):
        self.path, self.header = path, header
        self.arrays: dict[str, np.ndarray] = {}
        self.scales: dict[str, np.ndarray] = {}
        self.offset = header.data_offset
        self.size = path.stat().st_size

    def take(self, name: str, shape: tuple[int, ...], dtype=np.float32, into: dict | None = None) -> None:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if self.offset + nbytes > self.size:
            raise ValueError(
                f"{self.path}: truncated llama2.c v{self.header.version} file: {self.size} bytes, "
                f"its header needs more (reading {name})"
            )
        region = np.memmap(self.path, dtype=dtype, mode="r", offset=self.offset, shape=shape)
        (self.arrays if into is None else into)[name] = region
        self.offset += nbytes

    def finish(self) -> None:
        if self.offset != self.size:
            raise ValueError(
                f"{self.path}: {self.size} bytes, but a llama2.c v{self.header.version} file with "
                f"this header has {self.offset}: corrupt or not a llama2.c file"
            )


def _shape(name: str, config: ModelConfig) -> tuple[int, ...]:
    weight = WEIGHT_BY_META[name]
    per_tensor = weight.torch_shape(config)
    return (config.n_layers, *per_tensor) if weight.per_layer else per_tensor


def _map_regions(path: Path, header: Header) -> _Regions:
    c = header.config
    regions = _Regions(path, header)
    classifier = () if c.tie_embeddings else ("output",)
    if header.version == 0:
        head_size = c.dim // c.n_heads
        for name in ("tok_embeddings", *_PER_LAYER_V0, "norm"):
            regions.take(name, _shape(name, c))
        regions.take("unused RoPE tables", (2 * c.max_seq_len * head_size // 2,))
        for name in classifier:
            regions.take(name, _shape(name, c))
    elif header.version == 1:
        for name in (*_NORMS_V1, "tok_embeddings", *_MATRICES_V1, *classifier):
            regions.take(name, _shape(name, c))
    else:
        quantized = ("tok_embeddings", *_MATRICES_V1, *classifier)
        for name in _NORMS_V1:
            regions.take(name, _shape(name, c))
        for name in quantized:
            regions.take(name, _shape(name, c), np.int8)
        for name in quantized:
            if math.prod(WEIGHT_BY_META[name].torch_shape(c)) % header.group_size:
                raise ValueError(f"{path}: corrupt v2 header: {name} does not split into groups of {header.group_size}")
            regions.take(name, (math.prod(_shape(name, c)) // header.group_size,), into=regions.scales)
    regions.finish()
    return regions


def load_llama2c(path: str | Path, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """The model config and parameter tree (numpy) of a llama2.c model file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "llama2.c model file not found", str(path))
    header = read_header(path)
    config = with_dtype(header.config, dtype_name(np.float32, dtype))
    regions = _map_regions(path, header)

    def read(weight: Weight, layer: int | None) -> tuple[str, np.ndarray]:
        values = regions.arrays[weight.meta]
        tensor = values if layer is None else values[layer]
        if weight.meta in regions.scales:
            groups = regions.scales[weight.meta]
            per_tensor = groups.shape[0] if layer is None else groups.shape[0] // config.n_layers
            scales = groups if layer is None else groups[layer * per_tensor : (layer + 1) * per_tensor]
            tensor = (tensor.reshape(-1, header.group_size).astype(np.float32) * scales[:, None]).reshape(tensor.shape)
        return meta_name(weight, layer), tensor

    return config, build_params(config, read, interleaved_rope=True)


def convert_llama2c(
    model_path: str | Path,
    tokenizer_path: str | Path,
    out: str | Path,
    dtype: str | None = None,
    chat_template: str = "none",
) -> Path:
    """llama2.c records no chat template: `chat_template` (llama2, llama3 or none) names the one to record."""
    ensure_new_output_dir(out)
    tokenizer = load_tokenizer(tokenizer_path)
    template = chat_template_choice(chat_template, None)
    config, params = load_llama2c(model_path, dtype)
    return write_converted(out, config, params, tokenizer, chat_template=template)
