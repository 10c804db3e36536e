"""Self-describing model directories: write them, read them back onto any mesh.

    DIR/config.json      {"format": "llama_jax", "model": {ModelConfig}, "tokenizer": "tokenizer.model",
                          "chat_template": "llama3" | "llama2" | null}
    DIR/tokenizer.*      the tokenizer file, copied
    DIR/params/          an orbax checkpoint of the parameter tree (nested dict of arrays)

A training run directory has the same config.json and tokenizer, and its orbax `CheckpointManager`
steps under DIR/checkpoints/<step>/params; `load` takes either and uses the newest step.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from llama_jax.config import ModelConfig
from llama_jax.model import Llama, abstract_state
from llama_jax.param_io import restore_params, save_params
from llama_jax.sharding import make_mesh
from llama_jax.staging import staged_output_dir
from llama_jax.tokenizers import load_tokenizer

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"
FORMAT = "llama_jax"


def write_model_dir(out_dir: str | Path, config: ModelConfig, params: dict, tokenizer_file: str | Path | None = None,
                    chat_template: str | None = None) -> Path:
    """Write a model directory (config.json, tokenizer file, params/) atomically."""
    with staged_output_dir(out_dir) as staging:
        tokenizer_name = None
        if tokenizer_file is not None:
            tokenizer_name = _tokenizer_file_name(tokenizer_file)
            shutil.copyfile(tokenizer_file, staging / tokenizer_name)
        write_config(staging, config, tokenizer_name, chat_template)
        save_params(staging / PARAMS_DIR, params)
    return Path(out_dir).absolute()


def write_config(directory: Path, config: ModelConfig, tokenizer_name: str | None, chat_template: str | None) -> None:
    payload = {"format": FORMAT, "model": config.to_dict(), "tokenizer": tokenizer_name, "chat_template": chat_template}
    (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def _tokenizer_file_name(path: str | Path) -> str:
    return load_tokenizer(path).file_name


@dataclasses.dataclass(frozen=True)
class ModelDir:
    """What a model directory's config.json says."""

    path: Path
    config: ModelConfig
    tokenizer_path: Path | None
    chat_template: str | None

    @property
    def params_path(self) -> Path:
        direct = self.path / PARAMS_DIR
        if direct.is_dir():
            return direct
        steps = sorted((int(p.name) for p in (self.path / CHECKPOINTS_DIR).glob("*") if p.name.isdigit()),
                       reverse=True)
        for step in steps:
            candidate = self.path / CHECKPOINTS_DIR / str(step) / PARAMS_DIR
            if candidate.is_dir():
                return candidate
        raise ValueError(f"{self.path} holds no parameters (no {PARAMS_DIR}/ and no {CHECKPOINTS_DIR}/<step>/)")


def read_model_dir(path: str | Path) -> ModelDir:
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"{path} is not a llama_jax model directory (no {CONFIG_FILE}); "
                         "convert weights with `python -m llama_jax.convert`")
    try:
        payload = json.loads(config_file.read_text())
        config = ModelConfig.from_dict(payload["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{config_file} is corrupt: {e}") from None
    tokenizer = payload.get("tokenizer")
    return ModelDir(path, config, path / tokenizer if tokenizer else None, payload.get("chat_template"))


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: the NNX module (parameters placed on `mesh`), its tokenizer and chat template."""

    model: Llama
    config: ModelConfig
    mesh: jax.sharding.Mesh
    tokenizer: Any = None
    chat_template: str | None = None


def load(path: str | Path, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None) -> LoadedModel:
    """Load a model directory (converted or trained) onto `mesh` (default: all devices, data-parallel).

    `dtype` sets both the parameter and the compute dtype (e.g. "bfloat16" to serve a float32 checkpoint).
    """
    model_dir = read_model_dir(path)
    config = model_dir.config
    if dtype is not None:
        config = config.replace(dtype=dtype, param_dtype=dtype)
    mesh = mesh or make_mesh()
    graphdef, state = abstract_state(config, mesh)
    nnx.replace_by_pure_dict(state, restore_params(model_dir.params_path, nnx.to_pure_dict(state)))
    tokenizer = load_tokenizer(model_dir.tokenizer_path) if model_dir.tokenizer_path else None
    return LoadedModel(nnx.merge(graphdef, state), config, mesh, tokenizer, model_dir.chat_template)


