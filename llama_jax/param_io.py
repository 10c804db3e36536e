"""Parameter trees on disk, through orbax: saved without extra copies, restored straight into their shardings,
checked against the model config first so that a mismatch is one clear error instead of orbax's pages."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from llama_jax.errors import one_line
from llama_jax.integrity import Checksums, host_checksums


def save_params(path: Path, params: dict) -> None:
    """Save a parameter tree (numpy or jax arrays) synchronously, holding no second copy of it: host arrays
    are written where they are (orbax deep-copies them by default) and uncompressed (compression buffers
    a compressed copy of the whole tree). benchmarks/convert_memory.py measures this."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),
    )
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
    ocp.Checkpointer(handler).save(path.absolute(), args=ocp.args.PyTreeSave(params))


def restore_params(params_path: Path, target: dict) -> dict:
    """Restore the parameter tree straight into the shapes, dtypes and shardings of `target` (a pure dict of
    `jax.ShapeDtypeStruct`s, e.g. `nnx.to_pure_dict` of `model.abstract_state(config, mesh)[1]`)."""
    check_param_shapes(params_path, target)
    try:
        with _without_step_metadata_warning():
            return ocp.StandardCheckpointer().restore(params_path.absolute(), target)
    except Exception as e:  # orbax and tensorstore raise many types for damaged files
        raise ValueError(f"cannot read parameters in {params_path}: {one_line(e)}") from None


class StoredParams:
    """A saved parameter tree read one parameter at a time (orbax partial restore): only the parameter
    being exported is in memory, so exporting never holds the whole model."""

    def __init__(self, params_path: Path, target: dict, checksums: Checksums | None):
        """`target`: the tree's shapes (`nnx.to_pure_dict` of `model.abstract_state(config)[1]`)."""
        self._target = target
        check_param_shapes(params_path, self._target)
        self._path = params_path.absolute()
        self._checksums = checksums
        self._key: str | None = None
        self._value: np.ndarray | None = None

    def __getitem__(self, key: str) -> np.ndarray:
        """The parameter at `key` ("layers/attention/wq"), kept until another is read (exports read a stacked
        parameter once per layer)."""
        if key != self._key:
            self._key, self._value = key, None  # drop the previous parameter before reading the next
            item = self._only(key, lambda a: a)
            restore_args = self._only(key, lambda _: ocp.RestoreArgs(restore_type=np.ndarray))
            with _without_step_metadata_warning():
                restored = ocp.PyTreeCheckpointer().restore(self._path, args=ocp.args.PyTreeRestore(item, restore_args))
            for part in key.split("/"):
                restored = restored[part]
            if self._checksums is not None and host_checksums({key: restored})[key] != self._checksums.get(key):
                raise ValueError(f"{self._path}: parameter {key} changed since it was saved: the files are damaged")
            self._value = restored
        return self._value

    def take(self, key: str) -> np.ndarray:
        """The parameter at `key`, forgotten here: the caller may change it in place."""
        value = self[key]
        self._key, self._value = None, None
        return value

    def _only(self, key: str, leaf):
        """The tree with `leaf(a)` at `key` and orbax's skip marker everywhere else."""
        return jax.tree_util.tree_map_with_path(
            lambda path, a: leaf(a) if "/".join(str(k.key) for k in path) == key else ocp.PLACEHOLDER, self._target
        )


def read_json_item(path: Path) -> dict:
    """An orbax JSON item (a training step's `meta`)."""
    try:
        return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path.absolute())
    except Exception as e:
        raise ValueError(f"cannot read {path}: {one_line(e)}") from None


def check_param_shapes(params_path: Path, target: dict) -> None:
    """One clear error when the stored tree does not fit the config (orbax's own is pages long)."""
    try:
        with _without_step_metadata_warning():
            stored = ocp.StandardCheckpointer().metadata(params_path.absolute()).item_metadata
    except Exception as e:  # orbax raises many types for unreadable directories
        raise ValueError(f"cannot read parameters in {params_path}: {one_line(e)}") from None
    stored_shapes = {_key(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]}
    if not stored_shapes:  # the tree's index lives in the data files
        raise ValueError(f"{params_path}: no parameters can be read: its data files are missing or damaged")
    wanted = {_key(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(target)[0]}
    for key, shape in wanted.items():
        if key not in stored_shapes:
            raise ValueError(f"{params_path}: parameter {key} is missing")
        if stored_shapes[key] != shape:
            raise ValueError(
                f"{params_path}: parameter {key} has shape {stored_shapes[key]}, but the config needs {shape}"
            )
    extra = sorted(set(stored_shapes) - set(wanted))
    if extra:
        raise ValueError(f"{params_path}: parameters {extra} are not part of this config")


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


class _StepMetadataWarning(logging.Filter):
    """A training run's params item sits inside an orbax step whose metadata file is one level up;
    orbax warns that the item has none on every load, which is expected and harmless."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Metadata file does not exist" not in record.getMessage()


@contextlib.contextmanager
def _without_step_metadata_warning() -> Iterator[None]:
    log_filter = _StepMetadataWarning()
    logging.getLogger("absl").addFilter(log_filter)
    try:
        yield
    finally:
        logging.getLogger("absl").removeFilter(log_filter)
