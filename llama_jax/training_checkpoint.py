"""A training run directory and its checkpoints.

    RUN_DIR/config.json            the model (checkpoint.py's format: `llama_jax.load(RUN_DIR)` and
    RUN_DIR/tokenizer.model        `infer.py --checkpoint RUN_DIR` use the newest step)
    RUN_DIR/train_config.json      the run's settings and fingerprint: what a rerun must match to resume
    RUN_DIR/checkpoints/<step>/    orbax CheckpointManager steps, items:
        params                     the pure parameter dict (StandardSave)
        opt_state                  the optax state (StandardSave)
        meta                       JSON: step, data position, last train loss, fingerprint

Saves are asynchronous (training goes on while the arrays are written) and atomic: orbax writes each step
into a temporary directory and renames it when complete, so a process killed mid-save leaves a step that
is never read back. Restoring reads every array straight into the shardings of the current mesh, which
may differ from the mesh that saved it.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from llama_jax.checkpoint import CHECKPOINTS_DIR, write_config
from llama_jax.config import ModelConfig

RUN_FILE = "train_config.json"
RUN_FORMAT = "llama_jax-train"


def read_run(run_dir: Path) -> dict | None:
    """The stored settings of the run in `run_dir`; None for a new or empty directory. Anything else in
    the directory is refused: a run never writes over files it did not make."""
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return None
    run_file = run_dir / RUN_FILE
    if not run_dir.is_dir() or not run_file.is_file():
        raise ValueError(f"run_dir {run_dir} exists and is not a training run (no {RUN_FILE}); "
                         "choose a new run_dir")
    try:
        stored = json.loads(run_file.read_text())
    except json.JSONDecodeError:
        stored = None
    valid = isinstance(stored, dict) and stored.get("format") == RUN_FORMAT
    if not valid or not isinstance(stored.get("fingerprint"), dict):
        raise ValueError(f"{run_file} is corrupt; choose a new run_dir")
    return stored


def check_same_run(run_dir: Path, stored: dict, fingerprint: dict[str, Any]) -> None:
    """Refuse to resume a run whose settings differ in anything that changes its result."""
    old = stored["fingerprint"]
    differences = [f"{key}: {old.get(key)!r} there, {value!r} now"
                   for key, value in fingerprint.items() if old.get(key) != value]
    if differences:
        raise ValueError(f"run_dir {run_dir} holds a different run ({'; '.join(differences[:4])}"
                         f"{'; ...' if len(differences) > 4 else ''}); use a new run_dir, or the same settings "
                         "to resume it")


def create_run_dir(run_dir: Path, model: ModelConfig, tokenizer_path: Path, tokenizer_name: str,
                   chat_template: str | None, settings: dict, fingerprint: dict[str, Any]) -> None:
    """Write the run's files, assembled next to run_dir and renamed into place: a run directory either
    holds all of them or does not exist."""
    run_dir = run_dir.absolute()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.partial-", dir=run_dir.parent))
    try:
        shutil.copyfile(tokenizer_path, staging / tokenizer_name)
        write_config(staging, model, tokenizer_name, chat_template)
        payload = {"format": RUN_FORMAT, "settings": settings, "fingerprint": fingerprint}
        (staging / RUN_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        if run_dir.exists():
            run_dir.rmdir()  # empty: read_run refused anything else
        staging.rename(run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class TrainingCheckpoints:
    """Orbax CheckpointManager over RUN_DIR/checkpoints with the items above, keeping the last `keep`."""

    def __init__(self, run_dir: Path, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True,
                                               cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager((run_dir / CHECKPOINTS_DIR).absolute(), options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def path(self, step: int) -> Path:
        return Path(self._manager.directory) / str(step)

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        """Start saving `state` as `step` (asynchronously: returns once the arrays are copied off device)."""
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave({"step": step, **meta})), force=True)

    def restore(self, step: int, abstract_state) -> tuple[Any, Any, dict]:
        """(params, opt_state, meta) of `step`, placed as `abstract_state`'s shardings say."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
            meta=ocp.args.JsonRestore()))
        return restored.params, restored.opt_state, restored.meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
