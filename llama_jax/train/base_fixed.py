"""The settings a fine-tuning run's base fixes, and whose word counts when a recipe names them.

A run with `init_from` takes its model and its tokenizer from that model directory: the network's shape (every
ModelConfig field but how it is computed, `config.COMPUTE_FIELDS`) and the token ids it was trained on. A setting
of those is "given" — the user's word about the base, checked against it by `init_from.py`, a contradiction
refused in one line that names the setting and what the base has — when it comes from the command line or from a
config file that names init_from itself (a file written for fine-tuning).

A config file that names no init_from was written to train from scratch (`configs/tiny_test.yaml`: `model: tiny`,
`tokenizer: train:512`). Reused to fine-tune (`train.py --config configs/tiny_test.yaml init_from=RUN`), its model
and tokenizer settings describe the model it would have made, not the base: they give way to the base's, and one
warning line says which were set aside. Its other settings (steps, batch, seq_len, and how the network is
computed: `model.remat`, `model.attention`, ...) are kept.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from llama_jax.config import COMPUTE_FIELDS, ModelConfig

log = logging.getLogger("llama_jax")
_MODEL_KEYS = {"preset", *(field.name for field in dataclasses.fields(ModelConfig))}


def fixed_by_init_from(model_key: str) -> bool:
    """Whether `model.<model_key>` (or `preset`) describes the network an init_from base fixes."""
    return model_key not in COMPUTE_FIELDS


def without_pretraining_model(file_values: dict[str, Any], command_line: dict[str, Any], file: Path) -> dict[str, Any]:
    """A config file's values, minus its model and tokenizer settings when the run fine-tunes (init_from set on
    the command line) and the file names no init_from of its own; a warning names what was set aside."""
    init_from = command_line.get("init_from")
    if init_from is None or file_values.get("init_from") is not None:
        return file_values
    model = dict(file_values.get("model") or {})
    set_aside = {f"model.{key}": value for key, value in model.items() if value is not None and _fixed(key)}
    if file_values.get("tokenizer") is not None:
        set_aside["tokenizer"] = file_values["tokenizer"]
    if not set_aside:
        return file_values
    values = {key: value for key, value in file_values.items() if key not in ("model", "tokenizer")}
    kept_model = {key: value for key, value in model.items() if not _fixed(key)}
    if kept_model:
        values["model"] = kept_model
    # What the command line sets itself would not have been the file's anyway: only the rest is worth a word.
    unsaid = {key: value for key, value in set_aside.items() if not _set_on(command_line, key)}
    if unsaid:
        settings = ", ".join(f"{key.replace('model.preset', 'model')}={value}" for key, value in unsaid.items())
        log.warning(
            "%s is a recipe to train from scratch (it names no init_from): its %s %s way to init_from %s's "
            "model and tokenizer",
            file,
            settings,
            "give" if len(unsaid) > 1 else "gives",
            init_from,
        )
    return values


def _fixed(model_key: str) -> bool:
    """A file's `model.<model_key>` that init_from fixes (an unknown key stays, to be refused by name)."""
    return model_key in _MODEL_KEYS and fixed_by_init_from(model_key)


def _set_on(command_line: dict[str, Any], key: str) -> bool:
    """Whether the command line's nested settings hold dotted `key`."""
    node: Any = command_line
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True
