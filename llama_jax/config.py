"""Model configuration: one frozen dataclass, the published presets, YAML loading.

A `ModelConfig` is hashable so it can be a static argument of `jax.jit`. It describes the network only;
the shape of the device mesh is `MeshConfig` (sharding.py builds the mesh) and training settings are in
`train/config.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import yaml

# Remat policy name -> the `jax.checkpoint_policies` policy of the layer scan's body (None: no remat).
REMAT_POLICIES = {
    "none": None,
    "full": "nothing_saveable",  # recompute the whole layer in the backward pass
    "save_dots": "dots_with_no_batch_dims_saveable",  # keep the weight matmuls' outputs, recompute the rest
}
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")
DTYPES = ("float32", "bfloat16", "float16")
# Fields of ModelConfig that say how the network is computed rather than what it is: they may change on a
# converted checkpoint, between an init_from model and its fine-tuning, and between the runs of one run_dir.
COMPUTE_FIELDS = (
    "dtype",
    "param_dtype",
    "scan_layers",
    "remat",
    "attention",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "lora_dropout",
    "quantize",
)
QUANTIZE_MODES = ("none", "int8")
# Positions whose float32 logits the loss computes at once (`loss.token_nll`). Per device a chunk is
# rows × 1024 × vocab float32 (0.5 GiB for one row of Llama 3's vocabulary): small beside the activations of
# such a sequence, large enough to keep the output matmul efficient.
LOSS_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling: long wavelengths are slowed by `factor`, short ones kept, a smooth
    ramp between `low_freq_factor` and `high_freq_factor` (in units of `original_max_position`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


# target name -> (module attribute path inside a DecoderLayer, number of leading input axes of the weight)
LORA_TARGETS: dict[str, tuple[str, str, int]] = {
    "q": ("attention", "wq", 1),
    "k": ("attention", "wk", 1),
    "v": ("attention", "wv", 1),
    "o": ("attention", "wo", 2),
    "gate": ("mlp", "w_gate", 1),
    "up": ("mlp", "w_up", 1),
    "down": ("mlp", "w_down", 1),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (lora.py). rank 0: none. targets: any of q, k, v, o, gate, up, down. dropout: the
    probability of dropping each input of an adapter while training (PEFT's lora_dropout)."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"lora.rank must be a non-negative integer, got {self.rank!r}")
        if self.rank and not self.targets:
            raise ValueError("lora.targets is empty: name some of " + ", ".join(LORA_TARGETS))
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"unknown lora target {', '.join(unknown)}: choose from {', '.join(LORA_TARGETS)}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def weights(self, module: str) -> list[tuple[str, int]]:
        """(weight attribute, input axes) of the targets inside `module` ("attention" or "mlp")."""
        return [(LORA_TARGETS[t][1], LORA_TARGETS[t][2]) for t in self.targets if LORA_TARGETS[t][0] == module]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    max_seq_len: int
    head_dim: int = 0  # 0: dim // n_heads (every published LLaMA)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    # How the network is computed, not what it is (COMPUTE_FIELDS).
    dtype: str = "float32"  # compute dtype of matmuls and activations
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    attention: str = "auto"
    # LoRA adapters on the targeted projections (lora.py): a fine-tuning setup, not part of the model.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()
    lora_dropout: float = 0.0  # applied only when the forward pass is given a dropout key (training)
    # "int8": the projection weights are stored int8 with a float32 scale per output channel (quantize.py).
    quantize: str = "none"

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // max(self.n_heads, 1))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"model config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model config: remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"model config: attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model config: {name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        self.lora  # noqa: B018  (validates the LoRA fields)
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"model config: quantize must be one of {QUANTIZE_MODES}, got {self.quantize!r}")

    @property
    def lora(self) -> LoraConfig:
        return LoraConfig(self.lora_rank, self.lora_alpha, self.lora_targets, self.lora_dropout)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def without_adapters(self) -> ModelConfig:
        """The plain network a LoRA run's adapters merge into: no adapters, the base unquantized."""
        return self.replace(lora_rank=0, lora_targets=(), lora_dropout=0.0, quantize="none")

    def param_count(self) -> int:
        """Number of parameters, from the shapes alone (what Meta and Hugging Face publish)."""
        d, h = self.dim, self.head_dim
        attention = d * h * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * d * self.ffn_dim
        per_layer = attention + mlp + 2 * d  # two RMSNorm scales
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + embeddings + d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        return cls(**_checked(values))


# Outermost first: tensor parallelism talks most, so its devices are nearest neighbours; then context's.
MESH_AXES = ("data", "fsdp", "context", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; -1 on one axis takes all remaining devices. `context` splits training sequences
    (context parallelism, `context_parallel.py`)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    context: int = 1

    def shape(self, n_devices: int) -> tuple[int, ...]:
        sizes = [self.data, self.fsdp, self.context, self.tensor]
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise ValueError(f"mesh sizes must be positive, with at most one -1; got {self}")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % known:
                raise ValueError(f"mesh {self} does not divide the {n_devices} devices")
            sizes[sizes.index(-1)] = n_devices // known
        if math.prod(sizes) != n_devices:
            raise ValueError(f"mesh {self} needs {math.prod(sizes)} devices, but {n_devices} are available")
        return tuple(sizes)

    @classmethod
    def parse(cls, spec: str) -> MeshConfig:
        """`"fsdp=2,tensor=4"` → MeshConfig(data=-1, fsdp=2, tensor=4): unnamed axes keep their defaults."""
        sizes = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, value = part.partition("=")
            if name not in MESH_AXES or not value.lstrip("-").isdigit():
                raise ValueError(f"bad mesh {spec!r}: expected comma-separated AXIS=SIZE with AXIS in {MESH_AXES}")
            sizes[name] = int(value)
        return cls(**sizes)


def ffn_dim_for(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's rule for the SwiGLU width: 2/3 of 4·dim, scaled, rounded up to a multiple."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _llama(
    dim,
    n_layers,
    n_heads,
    vocab_size=32000,
    max_seq_len=2048,
    n_kv_heads=None,
    multiple_of=256,
    ffn_dim_multiplier=None,
    **rest,
) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads or n_heads,
        max_seq_len=max_seq_len,
        ffn_dim=ffn_dim_for(dim, multiple_of, ffn_dim_multiplier),
        **rest,
    )


_LLAMA2 = dict(max_seq_len=4096, norm_eps=1e-5)
_LLAMA3 = dict(vocab_size=128256, max_seq_len=8192, rope_theta=500000.0, norm_eps=1e-5)
_LLAMA31 = dict(_LLAMA3, max_seq_len=131072, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192))
_LLAMA32 = dict(_LLAMA3, max_seq_len=131072, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tie_embeddings=True)

# Shapes from Meta's params.json files (dim, n_layers, n_heads, n_kv_heads, multiple_of, ffn_dim_multiplier).
PRESETS: dict[str, ModelConfig] = {
    "llama1-7b": _llama(4096, 32, 32, norm_eps=1e-6),
    "llama1-13b": _llama(5120, 40, 40, norm_eps=1e-6),
    "llama1-33b": _llama(6656, 60, 52, norm_eps=1e-6),
    "llama1-65b": _llama(8192, 80, 64, norm_eps=1e-5),
    "llama2-7b": _llama(4096, 32, 32, **_LLAMA2),
    "llama2-13b": _llama(5120, 40, 40, **_LLAMA2),
    "llama2-70b": _llama(8192, 80, 64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3, **_LLAMA2),
    "llama3-8b": _llama(4096, 32, 32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3, **_LLAMA3),
    "llama3-70b": _llama(8192, 80, 64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3, **_LLAMA3),
    "llama3.1-8b": _llama(4096, 32, 32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3, **_LLAMA31),
    "llama3.1-70b": _llama(8192, 80, 64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3, **_LLAMA31),
    "llama3.1-405b": _llama(16384, 126, 128, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.2, **_LLAMA31),
    "llama3.2-1b": _llama(2048, 16, 32, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.5, **_LLAMA32),
    "llama3.2-3b": _llama(3072, 28, 24, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0, **_LLAMA32),
    # TinyLlama-1.1B's shape: the benchmark model.
    "tinyllama-1.1b": ModelConfig(
        vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, max_seq_len=2048
    ),
    # The CPU-sized shape of the benchmarks (`--small`): TinyLlama's vocabulary around a 20M model.
    "bench-cpu": ModelConfig(
        vocab_size=32000, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=704, max_seq_len=2048
    ),
    # karpathy's stories260K (llama2.c tinyllamas), the real weights the tests decode with.
    "stories260k": ModelConfig(
        vocab_size=512, dim=64, n_layers=5, n_heads=8, n_kv_heads=4, ffn_dim=172, max_seq_len=512, tie_embeddings=True
    ),
    # The default model of `python train.py`: trains on 2 CPU cores in minutes.
    "small": ModelConfig(vocab_size=1024, dim=192, n_layers=4, n_heads=6, n_kv_heads=2, ffn_dim=512, max_seq_len=256),
    # Test model: odd sizes so transposed axes cannot line up by accident.
    "tiny": ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=80, max_seq_len=64),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def load_model_config(spec: str | Path | dict) -> ModelConfig:
    """A preset name, a YAML/JSON file (`preset: NAME` plus overrides, or every field), or a dict."""
    if isinstance(spec, dict):
        values = dict(spec)
    elif isinstance(spec, str) and spec in PRESETS:
        return PRESETS[spec]
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(
                f"unknown model preset or missing config file {str(spec)!r}; presets: {', '.join(PRESETS)}"
            )
        text = path.read_text()
        try:
            values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"cannot parse model config {path}: {e}") from None
        if not isinstance(values, dict):
            raise ValueError(f"model config {path} must be a mapping of keys to values")
    base = values.pop("preset", None)
    if base is not None:
        return dataclasses.replace(preset(base), **_checked(values))
    return ModelConfig.from_dict(values)


def _checked(values: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"model config: unknown keys {unknown}; known keys: {sorted(known)}")
    return values
