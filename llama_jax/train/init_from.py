"""What a run starts from: its model config, tokenizer and chat template, decided from the settings and, when
fine-tuning, the `init_from` model directory.

The base fixes the network's shape and the tokenizer. A fine-tuning run takes both from it; a setting given for
them (the command line, or a config file that names init_from: `base_fixed.py`) must agree with the base, and one
that does not is refused in one line that names it and what the base has. A preset's vocab_size never counts: a
run from scratch replaces it with its tokenizer's, so `model=tiny` agrees with any base of tiny's shape.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from llama_jax.config import ModelConfig, load_model_config
from llama_jax.model_dir import PADDING_ROWS, ModelDir
from llama_jax.train.base_fixed import fixed_by_init_from
from llama_jax.train.config import CHAT_TEMPLATE_AUTO, COMPUTE_DTYPE_AUTO, TRAINED_TOKENIZER_PREFIX, TrainConfig
from llama_jax.train.token_store import store_url

DEFAULT_PRESET = "small"


def build_model_config(
    config: TrainConfig, platform: str, base: ModelConfig | None = None, vocab_size: int | None = None
) -> ModelConfig:
    """The model to train on `platform` (the mesh's: "cpu", "gpu", "tpu"). `base`: the init_from checkpoint's
    model (its shape must not change); `vocab_size`: the tokenizer's, which a model trained from scratch adopts."""
    chosen = load_model_config(config.model.preset) if config.model.preset is not None else None
    overrides = config.model.overrides()
    if base is None:
        model = chosen or load_model_config(DEFAULT_PRESET)
        if vocab_size is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size
    else:
        model = base
        overrides = _checked_against_base(config, base, chosen, overrides)
    overrides.setdefault("param_dtype", "float32")  # mixed precision keeps float32 master weights
    if config.dtype != COMPUTE_DTYPE_AUTO:
        overrides["dtype"] = config.dtype
    elif "dtype" not in overrides:
        overrides["dtype"] = "float32" if platform == "cpu" else "bfloat16"
    try:
        model = model.replace(**overrides)
    except TypeError as e:
        raise ValueError(f"bad model override: {e}") from None
    if vocab_size is not None and vocab_size > model.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} tokens but the model only {model.vocab_size}")
    if vocab_size is not None and model.vocab_size - vocab_size >= PADDING_ROWS:
        raise ValueError(
            f"the model has {model.vocab_size} embeddings but the tokenizer only {vocab_size} tokens: "
            f"{model.vocab_size - vocab_size} rows past its last id, where padding adds fewer than {PADDING_ROWS}, "
            "would be ids with no text; leave model.vocab_size to the tokenizer"
        )
    if model.attention == "blockwise":
        raise ValueError(
            "model.attention=blockwise has no gradient (prefill and scoring use it): train with auto, "
            "xla, cudnn or splash"
        )
    if config.seq_len > model.max_seq_len:
        raise ValueError(
            f"seq_len {config.seq_len} exceeds the model's max_seq_len {model.max_seq_len}; "
            f"lower seq_len or set model.max_seq_len"
        )
    lora = config.lora.config()
    if lora.enabled:
        # The frozen base needs no float32 master copy: it is held in the compute dtype (int8 for QLoRA);
        # the adapters, the only trained values, are float32.
        model = model.replace(
            lora_rank=lora.rank,
            lora_alpha=lora.alpha,
            lora_targets=lora.targets,
            lora_dropout=lora.dropout,
            param_dtype=model.dtype,
            quantize="int8" if config.lora.int8_base else "none",
        )
    return model


def resolve_tokenizer(config: TrainConfig, source: ModelDir | None) -> TrainConfig:
    """The config with its tokenizer named. From scratch: the configured one, or train:VOCAB with the model's
    vocab_size (a token store brings its own, `data.prepare_data`). Fine-tuning: init_from's file, which fixes
    the ids its embeddings belong to — a tokenizer file given as well must be that file (the same bytes), and
    train:VOCAB, a new tokenizer, is refused (`base_fixed.py` says when a setting counts as given)."""
    if source is not None:
        return _base_tokenizer(config, source)
    if config.tokenizer is not None:
        return config
    if store_url(config.data) is not None:
        return config
    vocab = config.model.vocab_size or load_model_config(config.model.preset or DEFAULT_PRESET).vocab_size
    return dataclasses.replace(config, tokenizer=f"{TRAINED_TOKENIZER_PREFIX}{vocab}")


def _base_tokenizer(config: TrainConfig, source: ModelDir) -> TrainConfig:
    if config.trained_vocab_size is not None:
        raise ValueError(
            f"tokenizer={config.tokenizer} would train a new tokenizer, but init_from {config.init_from} keeps its "
            "own (its embeddings belong to its ids): drop tokenizer="
        )
    if source.tokenizer_path is None:
        if config.tokenizer is None:
            raise ValueError(f"init_from {config.init_from} has no tokenizer; set tokenizer=FILE")
        return config
    if config.tokenizer is None:
        return dataclasses.replace(config, tokenizer=str(source.tokenizer_path))
    given = Path(config.tokenizer)
    if not given.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {given}")
    if given.read_bytes() != source.tokenizer_path.read_bytes():
        raise ValueError(
            f"tokenizer={config.tokenizer} is not init_from {config.init_from}'s tokenizer "
            f"({source.tokenizer_path.name}): a fine-tuned model keeps its base's ids; drop tokenizer="
        )
    return config


def chat_template(config: TrainConfig, source: ModelDir | None) -> str | None:
    """The chat template SFT prompts are built with: the configured one, or init_from's for "auto"."""
    if config.chat_template != CHAT_TEMPLATE_AUTO:
        return config.chat_template
    if source.chat_template is None:
        raise ValueError(f"init_from {config.init_from} has no chat template; set chat_template=llama2 or llama3")
    return source.chat_template


def _checked_against_base(
    config: TrainConfig, base: ModelConfig, preset: ModelConfig | None, given: dict[str, Any]
) -> dict[str, Any]:
    """The model overrides of a fine-tuning run: `given` (model.FIELD) and the fields of the `preset` named
    (model=NAME) but its vocab_size — a placeholder a run from scratch replaces with its tokenizer's, which the
    base fixes here. One that would change the base's network is refused, naming the setting that asked for it
    (a from-scratch config file reused to fine-tune has lost its model settings by now: `base_fixed.py`)."""
    implied = {}
    if preset is not None:
        implied = {k: v for k, v in preset.to_dict().items() if fixed_by_init_from(k) and k != "vocab_size"}
    overrides = {**implied, **given}
    changed = {
        k: (getattr(base, k), v)
        for k, v in overrides.items()
        if fixed_by_init_from(k) and _normal(getattr(base, k)) != _normal(v)
    }
    if changed:
        diffs = ", ".join(f"{k}={old!r} there but {new!r} here" for k, (old, new) in sorted(changed.items()))
        settings = sorted({f"model.{k}={given[k]}" if k in given else f"model={config.model.preset}" for k in changed})
        raise ValueError(
            f"init_from {config.init_from} holds a different model: {diffs} (set by {', '.join(settings)}); "
            "fine-tuning keeps the base's model: drop the setting, or train from scratch without init_from"
        )
    return overrides


def _normal(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
