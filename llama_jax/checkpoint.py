"""Self-describing model directories: write them, read them back onto any mesh.

    DIR/config.json      {"format": "llama_jax", "model": {ModelConfig}, "tokenizer": "tokenizer.model",
                          "chat_template": "llama3" | "llama2" | null}
    DIR/tokenizer.*      the tokenizer file, copied
    DIR/params/          an orbax checkpoint of the parameter tree (nested dict of arrays)

A training run directory has the same config.json and tokenizer, and its orbax `CheckpointManager`
steps under DIR/checkpoints/<step>/params; `load` takes either and uses the newest step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from llama_jax.config import ModelConfig
from llama_jax.model import Llama, abstract_state
from llama_jax.sharding import make_mesh

class _NoStepMetadataWarning(logging.Filter):
    """A training run's params item sits inside an orbax step whose metadata file is one level up;
    orbax warns that the item has none on every load, which is expected and harmless."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Metadata file does not exist" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoStepMetadataWarning())

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"
FORMAT = "llama_jax"


def ensure_new_output_dir(path: str | Path) -> Path:
    """Refuse to write into anything that already holds files: nothing a user made is overwritten."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"output {path} already exists and is not empty; choose a new --out")
    return path


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


@contextlib.contextmanager
def staged_output_dir(out_dir: str | Path) -> Iterator[Path]:
    """A staging directory next to `out_dir` that is renamed to `out_dir` when the block succeeds and
    removed when it fails: a crash never leaves a half-written directory that looks complete, and an
    existing non-empty `out_dir` is refused before anything is written."""
    out_dir = ensure_new_output_dir(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield staging
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_config(directory: Path, config: ModelConfig, tokenizer_name: str | None, chat_template: str | None) -> None:
    payload = {"format": FORMAT, "model": config.to_dict(), "tokenizer": tokenizer_name, "chat_template": chat_template}
    (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def _tokenizer_file_name(path: str | Path) -> str:
    from llama_jax.tokenizer import load_tokenizer

    return load_tokenizer(path).file_name


def save_params(path: Path, params: dict) -> None:
    """Save a parameter tree (numpy or jax arrays) synchronously, holding no second copy of it: host arrays
    are written where they are (orbax deep-copies them by default) and uncompressed (compression buffers
    a compressed copy of the whole tree). benchmarks/convert_memory.py measures this."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
    ocp.Checkpointer(handler).save(path.absolute(), args=ocp.args.PyTreeSave(params))


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
    from llama_jax.tokenizer import load_tokenizer

    model_dir = read_model_dir(path)
    config = model_dir.config
    if dtype is not None:
        config = config.replace(dtype=dtype, param_dtype=dtype)
    mesh = mesh or make_mesh()
    params = restore_params(model_dir.params_path, config, mesh)
    graphdef, state = abstract_state(config)
    nnx.replace_by_pure_dict(state, params)
    tokenizer = load_tokenizer(model_dir.tokenizer_path) if model_dir.tokenizer_path else None
    return LoadedModel(nnx.merge(graphdef, state), config, mesh, tokenizer, model_dir.chat_template)


def restore_params(params_path: Path, config: ModelConfig, mesh: jax.sharding.Mesh) -> dict:
    """Restore the parameter tree straight into its sharded layout on `mesh`, in `config.param_dtype`."""
    _, abstract = abstract_state(config, mesh)
    target = nnx.to_pure_dict(abstract)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, config.param_dtype, sharding=a.sharding), target)
    check_param_shapes(params_path, target)
    return ocp.StandardCheckpointer().restore(params_path.absolute(), target)


def check_param_shapes(params_path: Path, target: dict) -> None:
    """One clear error when the stored tree does not fit the config (orbax's own is pages long)."""
    try:
        stored = ocp.StandardCheckpointer().metadata(params_path.absolute()).item_metadata
    except Exception as e:  # orbax raises many types for unreadable directories
        raise ValueError(f"cannot read parameters in {params_path}: {e}") from None
    stored_shapes = {_key(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]}
    wanted = {_key(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(target)[0]}
    for key, shape in wanted.items():
        if key not in stored_shapes:
            raise ValueError(f"{params_path}: parameter {key} is missing")
        if stored_shapes[key] != shape:
            raise ValueError(f"{params_path}: parameter {key} has shape {stored_shapes[key]}, "
                             f"but the config needs {shape}")
    extra = sorted(set(stored_shapes) - set(wanted))
    if extra:
        raise ValueError(f"{params_path}: parameters {extra} are not part of this config")


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
