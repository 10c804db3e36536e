"""Steps every importer takes around the weights: the source's description file, dtypes, the tokenizer, and
writing the model directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from llama_jax.chat import CHAT_TEMPLATE_CHOICES, encode_dialog
from llama_jax.config import DTYPES, ModelConfig
from llama_jax.model_dir import check_tokenizer_fits, write_model_dir
from llama_jax.tokenizers import Tokenizer, load_tokenizer


def source_description(directory: str | Path, file_name: str, kind: str) -> tuple[Path, Any]:
    """(path, parsed JSON) of the file describing a source checkpoint (`config.json`, `params.json`), with one
    clear error when the directory is missing, is no `kind` directory, or the file is not JSON."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(2, f"{kind} directory not found", str(directory))
    path = directory / file_name
    if not path.is_file():
        raise ValueError(f"{directory} has no {file_name}: not a {kind} directory")
    return path, read_json(path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def dtype_name(source: np.dtype, requested: str | None) -> str:
    """The checkpoint's dtype: `requested`, else the source's own (float64 sources become float32)."""
    if requested is not None:
        if requested not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {requested!r}")
        return requested
    name = np.dtype(source).name
    if name == "float64":
        return "float32"
    if name not in DTYPES:
        raise ValueError(f"unsupported weight dtype {name}; pass --dtype to convert to one of {DTYPES}")
    return name


def with_dtype(config: ModelConfig, name: str) -> ModelConfig:
    """Parameters stored and computed in `name` (the model as published; `load(dtype=...)` can change it)."""
    return config.replace(param_dtype=name, dtype=name)


def find_tokenizer(explicit: str | Path | None, candidates: list[Path], source: Path) -> Tokenizer:
    if explicit is not None:
        return load_tokenizer(explicit)
    for candidate in candidates:
        if candidate.is_file():
            return load_tokenizer(candidate)
    looked = ", ".join(str(c) for c in candidates)
    raise ValueError(f"no tokenizer found for {source} (looked for {looked}); pass --tokenizer FILE")


def chat_template_choice(requested: str, detected: str | None) -> str | None:
    if requested not in CHAT_TEMPLATE_CHOICES:
        raise ValueError(f"--chat-template must be one of {CHAT_TEMPLATE_CHOICES}, got {requested!r}")
    if requested == "auto":
        return detected
    return None if requested == "none" else requested


def write_converted(
    out: str | Path,
    config: ModelConfig,
    params: dict,
    tokenizer: Tokenizer,
    chat_template: str | None,
    hf_repo: str | None = None,
) -> Path:
    check_tokenizer_fits(tokenizer, config)
    if chat_template is not None:  # refused now, not at the first chat request: the template fits the tokenizer
        encode_dialog(tokenizer, chat_template, [{"role": "user", "content": "Hi"}])
    return write_model_dir(
        out, config, params, tokenizer_file=tokenizer.path, chat_template=chat_template, hf_repo=hf_repo
    )
