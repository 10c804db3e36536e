"""What a run starts from: its model config, tokenizer and chat template, decided from the settings and, when
fine-tuning, the `init_from` model directory (whose model shape a run may not change)."""

from __future__ import annotations

import dataclasses
from typing import Any

from llama_jax.config import COMPUTE_FIELDS, ModelConfig, load_model_config
from llama_jax.model_dir import ModelDir
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
        if chosen is not None:
            overrides = {**{k: v for k, v in chosen.to_dict().items() if k not in COMPUTE_FIELDS}, **overrides}
        changed = {
            k: (getattr(base, k), v)
            for k, v in overrides.items()
            if k not in COMPUTE_FIELDS and _normal(getattr(base, k)) != _normal(v)
        }
        if changed:
            diffs = ", ".join(f"{k}={old!r} there but {new!r} here" for k, (old, new) in sorted(changed.items()))
            raise ValueError(f"init_from {config.init_from} holds a different model: {diffs}")
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
    """The config with its tokenizer named: init_from's file, or train:VOCAB with the model's vocab_size.
    A token store brings its own (`data.prepare_data`)."""
    if config.tokenizer is not None:
        return config
    if source is not None:
        if source.tokenizer_path is None:
            raise ValueError(f"init_from {config.init_from} has no tokenizer; set tokenizer=FILE")
        return dataclasses.replace(config, tokenizer=str(source.tokenizer_path))
    if store_url(config.data) is not None:
        return config
    vocab = config.model.vocab_size or load_model_config(config.model.preset or DEFAULT_PRESET).vocab_size
    return dataclasses.replace(config, tokenizer=f"{TRAINED_TOKENIZER_PREFIX}{vocab}")


def chat_template(config: TrainConfig, source: ModelDir | None) -> str | None:
    """The chat template SFT prompts are built with: the configured one, or init_from's for "auto"."""
    if config.chat_template != CHAT_TEMPLATE_AUTO:
        return config.chat_template
    if source.chat_template is None:
        raise ValueError(f"init_from {config.init_from} has no chat template; set chat_template=llama2 or llama3")
    return source.chat_template


def _normal(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
