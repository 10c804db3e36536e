"""Output directories that appear whole or not at all, and never over anything a user made.

Every directory llama_jax writes (model directories, Hugging Face exports, training run directories, the
tokenized-corpus cache) is assembled in a hidden staging directory beside its destination and renamed into
place when complete: a crash leaves no half-written directory that looks finished.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
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
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
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
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
