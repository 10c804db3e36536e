"""A training run's checkpoints: orbax `CheckpointManager` steps under RUN_DIR/checkpoints.

    RUN_DIR/checkpoints/<step>/
        params      the pure parameter dict (StandardSave)
        opt_state   the optax state (StandardSave)
        meta        JSON: step, data position, last train loss, fingerprint

Saves are asynchronous (training goes on while the arrays are written) and atomic: orbax writes each step
into a temporary directory and renames it when complete, so a process killed mid-save leaves a step that
is never read back. Restoring reads every array straight into the shardings of the current mesh, which
may differ from the mesh that saved it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from llama_jax.checkpoint import CHECKPOINTS_DIR


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
