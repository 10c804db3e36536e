"""A training run's checkpoints: orbax `CheckpointManager` steps under RUN_DIR/checkpoints, checked on restore.

    RUN_DIR/checkpoints/<step>/
        params      the pure parameter dict (StandardSave)
        opt_state   the optax state (StandardSave)
        meta        JSON: step, data position, last train loss, fingerprint, checksums of params and opt_state,
                    sealed with the SHA-256 of its own content (an edited step number or position is damage)
    RUN_DIR/damaged/<step>/   steps found damaged, moved aside (kept, never deleted)

Saves are asynchronous (training goes on while the arrays are written) and atomic: orbax writes each step
into a temporary directory and renames it when complete, so a process killed mid-save leaves a step that
is never read back. Restoring reads every array straight into the shardings of the current mesh, which
may differ from the mesh that saved it, then checks it against the checksums saved with it and for
non-finite values: a step that fails (or cannot be read at all) is moved to damaged/ and the next older
one is tried, so a damaged newest step costs the steps since the one before, never the run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from llama_jax.errors import one_line
from llama_jax.integrity import SEAL, damage, device_checksums, seal_problem, sealed
from llama_jax.model_dir import CHECKPOINTS_DIR, META_ITEM

DAMAGED_DIR = "damaged"
log = logging.getLogger("llama_jax")


class TrainingCheckpoints:
    """Orbax CheckpointManager over RUN_DIR/checkpoints with the items above, keeping the last `keep`."""

    _started: tuple[int, ...] = ()  # the steps whose saves this process started

    def __init__(self, run_dir: Path, keep: int):
        self.run_dir = run_dir
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True, cleanup_tmp_directories=True
        )
        self._manager = _Manager((run_dir / CHECKPOINTS_DIR).absolute(), options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        """Start saving `state` as `step` (asynchronously: returns once the arrays are copied off device),
        with the checksums of what is saved. A CheckpointWriteError when the save before it failed."""
        checksums = {"params": device_checksums(state.params), "opt_state": device_checksums(state.opt_state)}
        self._started += (step,)
        with self._writing():
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(state.params),
                    opt_state=ocp.args.StandardSave(state.opt_state),
                    **{META_ITEM: ocp.args.JsonSave(sealed({"step": step, **meta, "checksums": checksums}))},
                ),
                force=True,
            )

    def check(self) -> None:
        """A CheckpointWriteError as soon as a save running in the background has failed (a full disk): the
        run stops instead of training on past checkpoints it cannot write."""
        with self._writing():
            self._manager.check_for_errors()
            if self._manager.failure is not None:
                raise self._manager.failure

    def restore_newest_intact(self, abstract_state) -> tuple[Any, Any, dict] | None:
        """(params, opt_state, meta) of the newest intact step, placed as `abstract_state`'s shardings say;
        None when there is none (each damaged step is reported and moved to damaged/)."""
        for step in sorted(self._manager.all_steps(), reverse=True):
            restored, problem = self._restore_checked(step, abstract_state)
            if problem is None:
                return restored
            log.warning(
                "checkpoint step %d of %s is damaged (%s): moved to %s/%d; trying the one before",
                step,
                self.run_dir,
                problem,
                DAMAGED_DIR,
                step,
            )
            if jax.process_index() == 0:
                (self.run_dir / DAMAGED_DIR).mkdir(exist_ok=True)
                shutil.move(str(Path(self._manager.directory) / str(step)), self.run_dir / DAMAGED_DIR / str(step))
            multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
            self._manager.reload()
        return None

    def _restore_checked(self, step: int, abstract_state) -> tuple[tuple[Any, Any, dict] | None, str | None]:
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_state.params),
                    opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
                    **{META_ITEM: ocp.args.JsonRestore()},
                ),
            )
            meta = restored[META_ITEM]
            problem = meta_problem(meta, step)
            if problem is None:
                expected = meta["checksums"]
                problem = damage(restored.params, expected["params"]) or damage(
                    restored.opt_state, expected["opt_state"]
                )
        except Exception as e:  # orbax and tensorstore raise many types for files cut short or missing
            restored, problem = None, one_line(e)
        if jax.process_count() > 1:  # a file one host could not read damages the step for all of them
            problems = multihost_utils.process_allgather(np.int32(problem is not None))
            problem = problem or ("damaged on another host" if problems.any() else None)
        if problem is not None:
            return None, problem
        return (restored.params, restored.opt_state, restored[META_ITEM]), None

    def wait(self) -> None:
        with self._writing():
            self._manager.wait_until_finished()

    @contextlib.contextmanager
    def _writing(self):
        """Orbax's and TensorStore's errors of a failed save, raised from its threads, name the step's
        temporary directory (gone by now) in pages of detail: said here as one line naming the checkpoints
        directory, the first step this run started and did not write, and the newest step written."""
        try:
            yield
        except Exception as error:
            written = self._manager.all_steps(read=True)
            failed = min((s for s in self._started if s not in written), default=None)
            newest = max(written, default=None)
            raise CheckpointWriteError(self.run_dir / CHECKPOINTS_DIR, error, failed, newest) from None

    def close(self) -> None:
        self._manager.close()


class _Manager(ocp.CheckpointManager):
    """Orbax's manager, keeping the error of a failed background save: its finalizing thread takes the error
    (orbax raises one only once), logs it and skips the step, so the run would train on with its saves
    failing and learn of it only at exit."""

    failure: Exception | None = None

    def check_for_errors(self):
        try:
            super().check_for_errors()
        except Exception as error:
            self.failure = self.failure or error
            raise


class CheckpointWriteError(OSError):
    """A checkpoint could not be written: `reason: RUN_DIR/checkpoints (step N; ...)`, the reason being the
    operating system's (No space left on device) when the storage layers' message carries one."""

    def __init__(self, directory: Path, error: Exception, step: int | None, newest: int | None):
        message = str(error)
        code = re.search(r"os_error_code='?(\d+)", message)
        if isinstance(error, OSError) and error.strerror:
            reason = error.strerror
        elif code is not None:
            reason = os.strerror(int(code.group(1)))
        else:
            reason = f"writing failed ({_OS_CODE.sub('', one_line(error))})"
        kept = f"the newest checkpoint written is step {newest}" if newest is not None else "no checkpoint is written"
        where = f"step {step}; {kept}" if step is not None else kept
        super().__init__(f"{reason}: {directory} ({where})")


_OS_CODE = re.compile(r"\s*\[os_error_code=[^]]*\]")
REQUIRED_META = ("step", "checksums")


def meta_problem(meta: dict, step: int) -> str | None:
    """Why a step's meta cannot be trusted: edited after it was written (its seal), naming another step than
    its directory, or missing what a resume needs. Steps written before metas were sealed are taken on the
    other two checks."""
    if SEAL in meta and seal_problem(meta):
        return "its meta was changed after it was written"
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing or not {"params", "opt_state"} <= set(meta["checksums"]):
        return f"its meta lacks {', '.join(missing) or 'the checksums of params and opt_state'}"
    if meta["step"] != step:
        return f"its meta names step {meta['step']}"
    return None
