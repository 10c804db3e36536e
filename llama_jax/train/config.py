"""Training settings: one frozen dataclass, filled by OmegaConf from its defaults, a YAML file and `key=value`.

    python train.py --config configs/X.yaml steps=2000 mesh.fsdp=4 model.remat=full

`TrainConfig` is an OmegaConf structured config: OmegaConf merges the layers and converts and checks every
value against the type of its field; the dataclass's own `validate` checks what types cannot say (ranges,
choices). This module only turns OmegaConf's errors into one line that names the key, with a did-you-mean
for an unknown key: a typo must never silently train with the default.

Nested keys address the mesh (`mesh.fsdp`), the multi-host runtime (`distributed.coordinator`) and the
model: `model.preset` (a preset name or a model YAML file) and any field of `ModelConfig` (`model.remat`).
`model=NAME` is short for `model.preset=NAME`, on the command line and in YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from llama_jax.chat import TEMPLATES
from llama_jax.config import DTYPES, LOSS_CHUNK, LoraConfig, MeshConfig, ModelConfig
from llama_jax.train.base_fixed import without_pretraining_model
from llama_jax.train.objective_settings import DpoSettings, GrpoSettings, check_rewards

TRAINED_TOKENIZER_PREFIX = "train:"
BUNDLED_CORPUS = "tinyshakespeare.txt"  # llama_jax/data/: the default job's corpus, found from any directory
CHAT_TEMPLATE_AUTO = "auto"  # SFT prompts in init_from's own chat template
COMPUTE_DTYPE_AUTO = "auto"  # bfloat16 on accelerators, float32 on CPU


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-host job. On Cloud TPU VMs (and SLURM / Open MPI jobs) JAX finds
    everything itself; GPU clusters without a scheduler name the coordinator and each process's id."""

    coordinator: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """LoRA fine-tuning (llama_jax/lora.py): rank 0 trains every parameter."""

    rank: int = 0
    alpha: float = 16.0
    targets: str = "q,k,v,o"  # comma-separated: q, k, v, o, gate, up, down
    dropout: float = 0.0  # dropping each adapter input with this probability while training (PEFT's lora_dropout)
    int8_base: bool = False  # QLoRA: the frozen projections held int8 (quantize.py) while the adapters train

    def config(self) -> LoraConfig:
        return LoraConfig(
            self.rank, self.alpha, tuple(t.strip() for t in self.targets.split(",") if t.strip()), self.dropout
        )


OBJECTIVES = ("lm", "dpo", "grpo")


def _model_settings_class() -> type:
    """`model.*`: a preset (or model YAML) plus an optional override of every ModelConfig field. Built from
    ModelConfig's own fields, so a field added there is a settable key here with nothing else to change.
    (`rope_scaling` is a nested config of its own; it comes with a preset, a model YAML or init_from. The
    lora_* fields are set by the `lora.*` settings.)"""
    hints = typing.get_type_hints(ModelConfig)
    fields = [("preset", str | None, dataclasses.field(default=None))]
    fields += [
        (f.name, hints[f.name] | None, dataclasses.field(default=None))
        for f in dataclasses.fields(ModelConfig)
        if f.name not in ("rope_scaling", "quantize") and not f.name.startswith("lora_")
    ]

    def overrides(self) -> dict[str, Any]:
        """The ModelConfig fields this run sets."""
        return {
            name: value for name, value in dataclasses.asdict(self).items() if value is not None and name != "preset"
        }

    return dataclasses.make_dataclass("ModelSettings", fields, frozen=True, namespace={"overrides": overrides})


ModelSettings = _model_settings_class()


def setting(default: Any, help: str) -> Any:
    """A TrainConfig field with its meaning, which `train.py --help` lists."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # What to train, on what.
    model: ModelSettings = setting(
        ModelSettings(),
        "model.preset: a preset (config.py PRESETS) or a model YAML; "
        "default small, or init_from's model. model.FIELD: any ModelConfig field",
    )
    init_from: str | None = setting(None, "a model directory (converted or trained) to start from: fine-tuning")
    data: str = setting(
        BUNDLED_CORPUS,
        'text files, globs, comma-separated; .jsonl: {"text": ...} per line '
        "(SFT: prompt/response); a token store (gs://..., a directory); or a bundled file's name",
    )
    doc_separator: str | None = setting(None, "split text files into documents at this string")
    tokenizer: str | None = setting(
        None,
        "a tokenizer file, or train:VOCAB to train one on the corpus; default: "
        "init_from's, else train:<the model's vocab_size>",
    )
    sft: bool = setting(False, "JSONL prompt/response records; the loss is on response tokens only")
    objective: str = setting(
        "lm",
        "lm: next-token loss (pretraining, or SFT with sft=true); dpo: Direct Preference Optimization on JSONL "
        "prompt/chosen/rejected records against init_from as the frozen reference; grpo: GRPO on JSONL prompt "
        "records, completions sampled by the engine and scored by reward=",
    )
    dpo: DpoSettings = setting(
        DpoSettings(),
        "dpo.beta (default 0.1), dpo.loss (sigmoid or ipo), dpo.label_smoothing (default 0): objective=dpo",
    )
    grpo: GrpoSettings = setting(
        GrpoSettings(),
        "grpo.num_generations (default 8), .max_completion_length (256), .temperature (1.0), .beta (KL weight, 0), "
        ".epsilon (0.2), .epsilon_high (null: epsilon), .loss_type (grpo, dr_grpo or dapo, the default), "
        ".scale_rewards (group, batch or none), .num_iterations (1), .share_prompt (true): objective=grpo",
    )
    reward: str | None = setting(None, "objective=grpo: comma-separated FILE.py:FUNCTION or built-ins (rewards.py)")
    reward_weights: str | None = setting(None, "objective=grpo: a weight per reward= entry, comma-separated (1.0)")
    chat_template: str | None = setting(None, "SFT prompts as a chat: llama2, llama3, or auto (init_from's)")
    val_fraction: float = setting(0.05, "the last rows of the packed corpus held out for validation")
    data_cache: str = setting("~/.cache/llama_jax", "tokenized corpora and trained tokenizers, by content")
    # How.
    steps: int = setting(600, "optimizer steps")
    batch_size: int = setting(16, "sequences per step, over all devices and micro-batches")
    seq_len: int = setting(128, "tokens per sequence")
    grad_accum: int = setting(1, "micro-batches per step (they divide batch_size)")
    seed: int = setting(0, "initialisation and data order")
    lr: float = setting(1e-3, "peak learning rate")
    warmup: int = setting(50, "linear warmup steps")
    min_lr_ratio: float = setting(0.1, "the cosine decay ends at lr * min_lr_ratio (LLaMA: 10%)")
    weight_decay: float = setting(0.1, "AdamW weight decay, on matrices only (not norm gains)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    adam_eps: float = setting(1e-5, "AdamW epsilon")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this; 0 turns clipping off")
    z_loss: float = setting(0.0, "PaLM's z-loss weight (1e-4 is usual for bf16 runs)")
    loss_chunk: int = setting(LOSS_CHUNK, "positions whose float32 logits exist at once in the loss; 0: all")
    dtype: str = setting(COMPUTE_DTYPE_AUTO, "compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU")
    mesh: MeshConfig = setting(MeshConfig(), "mesh.data, mesh.fsdp, mesh.tensor: the device mesh (-1: the rest)")
    lora: LoraSettings = setting(
        LoraSettings(),
        "lora.rank (0: train every parameter; else LoRA adapters of that "
        "rank on a frozen init_from), lora.alpha (default 16), lora.targets (q,k,v,o; also "
        "gate, up, down), lora.dropout (default 0), lora.int8_base (QLoRA: the frozen "
        "weights held int8)",
    )
    distributed: DistributedConfig = setting(
        DistributedConfig(),
        "distributed.coordinator, .num_processes, .process_id: multi-host on GPU clusters (TPU VMs find each other)",
    )
    hardware: str | None = setting(
        None,
        "where the recipe is meant to run: cpu, a TPU slice (v5p-128), slices over DCN (2xv5p-256) or GPUs "
        "(8xH100); check it with --compile-for; nothing is chosen by it",
    )
    # Outputs.
    run_dir: str = setting("runs/default", "outputs; rerunning with the same run_dir resumes it")
    checkpoint_every: int = setting(200, "steps between checkpoints")
    keep_checkpoints: int = setting(3, "checkpoints kept")
    eval_every: int = setting(100, "steps between evaluations")
    eval_batches: int = setting(8, "validation batches per evaluation")
    log_every: int = setting(10, "steps between logged metrics")
    samples: int = setting(3, "sample generations printed at the end")
    sample_tokens: int = setting(100, "tokens per sample")
    sample_prompts: tuple[str, ...] = setting((), "the samples' prompts (default: BOS only)")
    peak_tflops: float = setting(0.0, "per-device peak TFLOP/s for MFU; 0: the data sheet's for known chips")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        positive = (
            "steps",
            "batch_size",
            "grad_accum",
            "checkpoint_every",
            "keep_checkpoints",
            "eval_every",
            "eval_batches",
            "log_every",
            "sample_tokens",
        )
        for name in positive:
            _check(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        _check(self.seq_len >= 2, f"seq_len must be at least 2, got {self.seq_len}")
        _check(
            self.batch_size % self.grad_accum == 0,
            f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})",
        )
        _check(self.warmup >= 0, f"warmup must not be negative, got {self.warmup}")
        _check(self.lr > 0, f"lr must be positive, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        for name in ("weight_decay", "grad_clip", "z_loss", "samples", "seed", "peak_tflops", "loss_chunk"):
            _check(getattr(self, name) >= 0, f"{name} must not be negative, got {getattr(self, name)}")
        _check(self.adam_eps > 0, f"adam_eps must be positive, got {self.adam_eps}")
        dtypes = (COMPUTE_DTYPE_AUTO, *DTYPES)
        _check(self.dtype in dtypes, f"dtype must be one of {dtypes}, got {self.dtype!r}")
        templates = (*TEMPLATES, CHAT_TEMPLATE_AUTO)
        _check(
            self.chat_template is None or self.chat_template in templates,
            f"chat_template must be one of {templates} or null, got {self.chat_template!r}",
        )
        _check(
            self.chat_template is None or self.sft or self.objective != "lm",
            "chat_template applies to SFT, DPO and GRPO data: set sft=true or objective=dpo|grpo",
        )
        self._validate_objective()
        _check(
            self.chat_template != CHAT_TEMPLATE_AUTO or self.init_from is not None,
            "chat_template=auto takes the template of init_from's checkpoint: set init_from",
        )
        if self.tokenizer is not None:
            _check(self.tokenizer != "", "tokenizer must be a tokenizer file or train:VOCAB")
            _trained_vocab(self.tokenizer)
        _check(bool(self.data.strip()), "data must name at least one file")
        lora = self.lora.config()  # validates rank, alpha and targets
        _check(
            not lora.enabled or self.init_from is not None,
            "LoRA adapts a trained model: set init_from to a model directory (or lora.rank=0)",
        )
        _check(
            lora.enabled or not self.lora.int8_base, "lora.int8_base freezes an int8 base under adapters: set lora.rank"
        )
        sizes = dataclasses.astuple(self.mesh)
        _check(
            all(s >= 1 or s == -1 for s in sizes) and sizes.count(-1) <= 1,
            f"mesh sizes must be positive (one may be -1: all remaining devices), got {self.mesh}",
        )

    def _validate_objective(self) -> None:
        """The objective's own settings, and the run's other settings against them."""
        _check(self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "dpo":
            _check(not self.sft, "objective=dpo reads prompt/chosen/rejected records: drop sft=true")
            _check(self.init_from is not None, "DPO trains against a reference model: set init_from")
            self.dpo.validate(self.micro_batch)
            _check(self.z_loss == 0, "z_loss applies to the next-token loss, not to DPO: set z_loss=0")
        if self.objective == "grpo":
            _check(not self.sft, "objective=grpo samples completions to prompt records: drop sft=true")
            _check(self.dpo == DpoSettings(), "dpo.* settings apply to objective=dpo: drop them")
            _check(self.init_from is not None, "GRPO fine-tunes a model by its rewards: set init_from")
            _check(self.z_loss == 0, "z_loss applies to the next-token loss, not to GRPO: set z_loss=0")
            _check(self.trained_vocab_size is None, "GRPO samples with init_from's tokenizer: drop tokenizer=train:")
            self.grpo.validate(self.batch_size, self.seq_len)
            check_rewards(self.reward, self.reward_weights)

    @property
    def trained_vocab_size(self) -> int | None:
        """VOCAB of `tokenizer=train:VOCAB`, None for a tokenizer file or none."""
        return _trained_vocab(self.tokenizer) if self.tokenizer is not None else None

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def describe_settings() -> str:
    """Every key with its default and meaning: `train.py --help`."""
    lines = []
    for field in dataclasses.fields(TrainConfig):
        default = field.default
        shown = "" if dataclasses.is_dataclass(default) else f" (default {default!r})"
        lines.append(f"  {field.name}{shown}\n      {field.metadata['help']}")
    return "\n".join(lines)


def _trained_vocab(tokenizer: str) -> int | None:
    if not tokenizer.startswith(TRAINED_TOKENIZER_PREFIX):
        return None
    text = tokenizer[len(TRAINED_TOKENIZER_PREFIX) :]
    if not text.isdigit() or not 260 <= int(text) <= 1_000_000:
        raise ValueError(
            f"tokenizer={tokenizer!r}: VOCAB must be an integer from 260 (3 special pieces, "
            "256 bytes and at least one merge) to 1000000"
        )
    return int(text)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _key_types(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every settable key (`mesh.fsdp`, `model.preset`, ...) and its declared type."""
    keys = {}
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys.update(_key_types(hint, f"{prefix}{name}."))
        else:
            keys[f"{prefix}{name}"] = hint
    return keys


KEY_TYPES = _key_types(TrainConfig)
_NULLS = {True: ("null", "~", "none", ""), False: ("null", "~")}  # by whether the key may be null (see below)
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def load_train_config(config_file: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults, the YAML file's values (less the model of one reused to fine-tune: `base_fixed.py`), `key=value`."""
    command_line, file = _parse_overrides(overrides), Path(config_file) if config_file is not None else None
    from_file = without_pretraining_model(_read_yaml(file), command_line, file) if file is not None else {}
    layers = [OmegaConf.structured(TrainConfig), OmegaConf.create(from_file), OmegaConf.create(command_line)]
    try:
        return OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as e:
        raise ValueError(_explain(e)) from None


def train_config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from its `to_dict()` form (what a run directory records)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(values)))
    except OmegaConfBaseException as e:
        raise ValueError(_explain(e)) from None


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
    if not isinstance(loaded.get("model", {}), dict):  # `model: llama2-7b`, or `model: null` for the default
        loaded["model"] = {"preset": loaded["model"]}
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings as a nested dict. Values stay text for OmegaConf to convert to the field's type,
    except null (null or ~; none or nothing too where the key may be null, so that a string key may be set to
    none, grpo.scale_rewards=none) and, for list fields, a YAML list (a plain string is a one-item list)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"bad argument {item!r}: expected key=value (e.g. steps=100)")
        key = "model.preset" if key == "model" else key
        if key not in KEY_TYPES:
            raise ValueError(_unknown_key(key))
        value: Any = text
        if text.strip().lower() in _NULLS[type(None) in typing.get_args(KEY_TYPES[key])]:
            value = None
        elif typing.get_origin(KEY_TYPES[key]) is tuple:
            value = yaml.safe_load(text) if text.lstrip().startswith("[") else [text]
        *parents, leaf = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


def _unknown_key(key: str) -> str:
    close = difflib.get_close_matches(key, KEY_TYPES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {key!r}{hint} (configs/default.yaml lists every key)"


def _explain(error: OmegaConfBaseException) -> str:
    """OmegaConf's multi-line error as one line naming the key."""
    key = str(error.full_key)
    if isinstance(error, ConfigKeyError) or key not in KEY_TYPES:
        return _unknown_key(key)
    if error.value is None:
        return f"bad value for {key}: it cannot be null"
    expected = KEY_TYPES[key]
    base = next((a for a in typing.get_args(expected) if a is not type(None)), expected)
    name = "a list of strings" if typing.get_origin(base) is tuple else _TYPE_NAMES.get(base, str(base))
    return f"bad value for {key}: expected {name}, got {error.value!r}"
