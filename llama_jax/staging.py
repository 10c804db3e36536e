"""Output directories that appear whole or not at all, and never over anything a user made.

Every directory llama_jax writes (model directories, Hugging Face exports, training run directories, the
tokenized-corpus cache) is assembled in a hidden staging directory beside its destination and renamed into
place when complete: a crash leaves no half-written directory that looks finished. A staging directory
is named after the process that writes it, and the next writer to the same place removes those whose
process is gone (killed mid-conversion, they can hold gigabytes).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def ensure_new_output_dir(path: str | Path) -> Path:
    """`path`, refused when it already holds anything: nothing a user made is overwritten."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"output {path} already exists and is not empty; choose a new output directory")
    return path


@contextlib.contextmanager
def staged_output_dir(target: str | Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory that becomes `target` when the block succeeds and is removed when
    it fails. `target` must be new or an empty directory, checked before anything is written.

    `keep_existing`: for caches that several processes may fill at once with identical contents: when
    `target` exists by the time the block ends, it is kept and the staged copy dropped.
    """
    target = Path(target).absolute()
    if not (keep_existing and target.exists()):
        ensure_new_output_dir(target)
    existing = next(parent for parent in target.parents if parent.exists())
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(existing))
    target.parent.mkdir(parents=True, exist_ok=True)
    writers = _remove_abandoned_staging(target)
    if writers and not keep_existing:
        raise ValueError(
            f"another process (pid {writers[0]}) is writing {target}: wait for it, or choose another output"
        )
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result should be like any new directory
    try:
        yield staging
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        try:
            staging.rename(target)
        except OSError:
            if not (keep_existing and target.exists()):
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException as error:
        _remove_failed_staging(staging)
        named = _naming_target(error, staging, target)
        if named is None:
            raise
        raise named from None


def _naming_target(error: BaseException, staging: Path, target: Path) -> Exception | None:
    """`error` (a failed write: a full disk, say) reworded to name `target`, the path the user gave, instead of
    the staging directory it happened in, which is gone by now; None when it does not name the staging path."""
    if not isinstance(error, Exception) or str(staging) not in str(error):
        return None
    if isinstance(error, OSError) and error.strerror:
        return type(error)(error.errno, error.strerror, str(target))
    return ValueError(f"writing {target} failed: {str(error).replace(str(staging), str(target))}")


def _remove_failed_staging(staging: Path, rounds: int = 20) -> None:
    """Remove a failed writer's staging directory. orbax's tensorstore threads can still be finishing writes
    after the first error reaches us (and they create missing parent directories), so the removal is
    repeated until the directory stays gone for a moment (at most `rounds` × 50 ms)."""
    for _ in range(rounds):
        shutil.rmtree(staging, ignore_errors=True)
        time.sleep(0.05)
        if not staging.exists():
            return


def _remove_abandoned_staging(target: Path) -> list[int]:
    """Remove the staging directories for `target` whose writer (the pid in their name) no longer runs; the
    pids of the other processes writing `target` now (a second conversion to the same place learns of the
    first at its start, not after converting)."""
    writers = []
    for staging in target.parent.glob(f".{glob.escape(target.name)}.partial-*"):
        pid = staging.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if not pid.isdigit():
            continue
        if not _running(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)
        elif int(pid) != os.getpid():
            writers.append(int(pid))
    return writers


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
