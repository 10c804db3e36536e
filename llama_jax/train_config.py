"""Training configuration: one frozen dataclass, read from YAML and `key=value` overrides.

    python train.py --config configs/X.yaml steps=2000 mesh.fsdp=4 model.remat=full

Every value is checked against the type of its field, and an unknown key is an error that names the
closest known one: a typo must never silently train with the default. Nested keys address the mesh
(`mesh.fsdp`), the multi-host runtime (`distributed.coordinator`) and fields of the model config
(`model.remat`); `model` itself is a preset name or a model YAML file. In a YAML file the same keys may be
written nested (`mesh: {fsdp: 4}`, `model: {preset: small, remat: full}`).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from llama_jax.config import ModelConfig, load_model_config
from llama_jax.sharding import MeshConfig

TRAINED_TOKENIZER_PREFIX = "train:"
CHAT_TEMPLATES = ("llama2", "llama3", "auto")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-host job. On Cloud TPU VMs (and SLURM / Open MPI jobs) JAX finds
    everything itself; GPU clusters without a scheduler name the coordinator and each process's id."""

    coordinator: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # What to train, on what.
    model: str | None = None  # preset or model YAML; None: "small", or init_from's own model
    model_overrides: tuple[tuple[str, Any], ...] = ()  # (field, value) of ModelConfig, from `model.FIELD=`
    init_from: str | None = None  # a model directory (converted or trained) to start from
    data: str = "data/tinyshakespeare.txt"  # files, globs, comma-separated; .jsonl: one record per line
    doc_separator: str | None = None  # split text files into documents at this string
    # A tokenizer file, or train:VOCAB to train a SentencePiece tokenizer on the corpus. Unset: init_from's
    # tokenizer, or from scratch train:VOCAB with the model's vocab_size.
    tokenizer: str | None = None
    sft: bool = False  # JSONL prompt/response records; the loss is on response tokens only
    chat_template: str | None = None  # SFT prompts in "llama2" / "llama3" form; "auto": init_from's
    val_fraction: float = 0.05
    data_cache: str = "~/.cache/llama_jax"
    # How.
    steps: int = 600
    batch_size: int = 16  # sequences per step, over all devices and micro-batches
    seq_len: int = 128
    grad_accum: int = 1  # micro-batches per step (batch_size must divide)
    seed: int = 0
    lr: float = 1e-3  # peak learning rate
    warmup: int = 50  # linear warmup steps (at most `steps`)
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio (LLaMA: 10%)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-5
    grad_clip: float = 1.0
    z_loss: float = 0.0
    dtype: str = "auto"  # compute dtype: auto = bfloat16 on accelerators, float32 on CPU
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    # Outputs.
    run_dir: str = "runs/default"
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    samples: int = 3  # sample generations printed at the end
    sample_tokens: int = 100
    sample_prompts: tuple[str, ...] = ()  # default: BOS only
    peak_tflops: float = 0.0  # per device, for MFU; 0: known accelerators' bf16 peak

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "eval_every",
                    "eval_batches", "log_every", "sample_tokens")
        for name in positive:
            _check(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        _check(self.seq_len >= 2, f"seq_len must be at least 2, got {self.seq_len}")
        _check(self.batch_size % self.grad_accum == 0,
               f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        _check(self.warmup >= 0, f"warmup must not be negative, got {self.warmup}")
        _check(self.lr > 0, f"lr must be positive, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        for name in ("weight_decay", "grad_clip", "z_loss", "samples", "seed", "peak_tflops"):
            _check(getattr(self, name) >= 0, f"{name} must not be negative, got {getattr(self, name)}")
        _check(self.adam_eps > 0, f"adam_eps must be positive, got {self.adam_eps}")
        _check(self.dtype in COMPUTE_DTYPES, f"dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")
        _check(self.chat_template is None or self.chat_template in CHAT_TEMPLATES,
               f"chat_template must be one of {CHAT_TEMPLATES} or null, got {self.chat_template!r}")
        _check(self.chat_template is None or self.sft, "chat_template applies to SFT data: set sft=true")
        _check(self.chat_template != "auto" or self.init_from is not None,
               "chat_template=auto takes the template of init_from's checkpoint: set init_from")
        if self.tokenizer is not None:
            _check(self.tokenizer != "", "tokenizer must be a tokenizer file or train:VOCAB")
            _trained_vocab(self.tokenizer)
        _check(bool(self.data.strip()), "data must name at least one file")
        sizes = dataclasses.astuple(self.mesh)
        _check(all(s >= 1 or s == -1 for s in sizes) and sizes.count(-1) <= 1,
               f"mesh sizes must be positive (one may be -1: all remaining devices), got {self.mesh}")

    @property
    def trained_vocab_size(self) -> int | None:
        """VOCAB of `tokenizer=train:VOCAB`, None for a tokenizer file or none."""
        return _trained_vocab(self.tokenizer) if self.tokenizer is not None else None

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["model_overrides"] = dict(self.model_overrides)
        values["sample_prompts"] = list(self.sample_prompts)
        return values


def _trained_vocab(tokenizer: str) -> int | None:
    if not tokenizer.startswith(TRAINED_TOKENIZER_PREFIX):
        return None
    text = tokenizer[len(TRAINED_TOKENIZER_PREFIX):]
    if not text.isdigit() or not 260 <= int(text) <= 1_000_000:
        raise ValueError(f"tokenizer={tokenizer!r}: VOCAB must be an integer from 260 (3 special pieces, "
                         "256 bytes and at least one merge) to 1000000")
    return int(text)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


_NESTED = {"mesh": MeshConfig, "distributed": DistributedConfig}
_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"rope_scaling"}
_TOP_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"model_overrides", *_NESTED}


def known_keys() -> list[str]:
    nested = [f"{prefix}.{f.name}" for prefix, cls in _NESTED.items() for f in dataclasses.fields(cls)]
    return sorted(_TOP_FIELDS) + nested + sorted(f"model.{name}" for name in _MODEL_FIELDS)


def load_train_config(config_file: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file's values, then `key=value` overrides (command-line strings)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        for key, value in _read_yaml(Path(config_file)).items():
            values[key] = _typed(key, value, from_text=False)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"bad argument {item!r}: expected key=value (e.g. steps=100)")
        key = _canonical(key.strip())
        values[key] = _typed(key, text, from_text=True)
    return _build(values)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"cannot parse config file {path}: {' '.join(str(e).split())}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {path} must be a mapping of keys to values")
    flat: dict[str, Any] = {}
    for key, value in loaded.items():
        key = str(key)
        if key in (*_NESTED, "model") and isinstance(value, dict):
            for inner, inner_value in value.items():
                flat[_canonical(f"{key}.{inner}")] = inner_value
        else:
            flat[_canonical(key)] = value
    return flat


def _canonical(key: str) -> str:
    if key == "model.preset":
        return "model"
    if key in known_keys():
        return key
    close = difflib.get_close_matches(key, known_keys(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown config key {key!r}{hint} (see llama_jax/train_config.py for all keys)")


def _field_type(key: str) -> Any:
    if key.startswith("model."):
        return typing.get_type_hints(ModelConfig)[key.split(".", 1)[1]]
    prefix, _, name = key.partition(".")
    if name:
        return typing.get_type_hints(_NESTED[prefix])[name]
    return typing.get_type_hints(TrainConfig)[key]


def _typed(key: str, value: Any, from_text: bool) -> Any:
    """`value` converted to the declared type of `key`, or a ValueError naming both."""
    expected = _field_type(key)
    args = typing.get_args(expected)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), expected) if optional else expected
    if from_text and optional and value.strip().lower() in ("null", "none", ""):
        return None
    if value is None:
        if optional:
            return None
        raise ValueError(f"bad value for {key}: it cannot be null")
    if typing.get_origin(base) is tuple:  # a YAML list; on the command line also one plain string
        items = (yaml.safe_load(value) if value.lstrip().startswith("[") else [value]) if from_text else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"bad value for {key}: expected a list of strings, got {value!r}")
        return tuple(items)
    try:
        return _scalar(base, value, from_text)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"bad value for {key}: expected {_TYPE_NAMES[base]}, got {value!r}") from None


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _scalar(base: type, value: Any, from_text: bool) -> Any:
    if from_text:
        text = value.strip()
        if base is bool:
            return _BOOLS[text.lower()]  # KeyError: not a boolean
        return value if base is str else base(text)
    if isinstance(value, bool) != (base is bool):  # YAML's true is no integer, and 1 no boolean
        raise TypeError
    if base is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, base):
        raise TypeError
    return value


def _build(values: dict[str, Any]) -> TrainConfig:
    top = {k: v for k, v in values.items() if "." not in k}
    for prefix, cls in _NESTED.items():
        nested = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(prefix + ".")}
        top[prefix] = cls(**nested)
    overrides = sorted((k.split(".", 1)[1], v) for k, v in values.items() if k.startswith("model."))
    return TrainConfig(**top, model_overrides=tuple(overrides))


# Fields of ModelConfig that say how the network is computed rather than what it is: they may differ
# from an init_from checkpoint's and between the runs of one run_dir.
COMPUTE_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "attention")


def build_model_config(config: TrainConfig, platform: str, base: ModelConfig | None = None,
                       vocab_size: int | None = None) -> ModelConfig:
    """The model to train. `base`: the init_from checkpoint's model (its shape must not change);
    `vocab_size`: the tokenizer's, which a model trained from scratch adopts."""
    chosen = load_model_config(config.model) if config.model is not None else None
    overrides = dict(config.model_overrides)
    if base is None:
        model = chosen or load_model_config("small")
        if vocab_size is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size
    else:
        model = base
        if chosen is not None:
            overrides = {**{k: v for k, v in chosen.to_dict().items() if k not in COMPUTE_FIELDS}, **overrides}
        changed = {k: (getattr(base, k), v) for k, v in overrides.items()
                   if k not in COMPUTE_FIELDS and _normal(getattr(base, k)) != _normal(v)}
        if changed:
            diffs = ", ".join(f"{k}={old!r} there but {new!r} here" for k, (old, new) in sorted(changed.items()))
            raise ValueError(f"init_from {config.init_from} holds a different model: {diffs}")
    overrides.setdefault("param_dtype", "float32")  # mixed precision keeps float32 master weights
    if config.dtype != "auto":
        overrides["dtype"] = config.dtype
    elif "dtype" not in overrides:
        overrides["dtype"] = "float32" if platform == "cpu" else "bfloat16"
    try:
        model = model.replace(**overrides)
    except TypeError as e:
        raise ValueError(f"bad model override: {e}") from None
    if vocab_size is not None and vocab_size > model.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} tokens but the model only {model.vocab_size}")
    if config.seq_len > model.max_seq_len:
        raise ValueError(f"seq_len {config.seq_len} exceeds the model's max_seq_len {model.max_seq_len}; "
                         f"lower seq_len or set model.max_seq_len")
    return model


def _normal(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
