"""Errors as the one line a user reads: what every command line prints, and what wrapped library errors carry."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


def one_line(error: BaseException) -> str:
    """`error` as one line. Operating-system errors read `reason: path` (a full disk, a missing file); other
    errors give their first line: libraries such as orbax put pages of detail below a first line that says
    what failed (the messages llama_jax raises are one line already)."""
    if isinstance(error, FileNotFoundError) and error.filename:
        return f"no such file: {error.filename}"
    if isinstance(error, UnicodeDecodeError):
        return f"input is not valid UTF-8 text ({error.reason} at byte {error.start})"
    if isinstance(error, OSError) and error.strerror:
        where = error.filename if error.filename is not None else ""
        return f"{error.strerror}: {where}" if where else error.strerror
    lines = [line for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    # TensorStore appends a dump of the array's spec to its first line; what failed is said before it.
    return " ".join(lines[0].split(" See full TensorStore details:")[0].split())


@contextlib.contextmanager
def errors_naming(path: str | Path) -> Iterator[None]:
    """Inside the block, an operating-system error that names no file is raised again naming `path`: a write
    to a file already open (a full disk, a quota) says only "No space left on device", and the user must learn
    which of their outputs it was. `path` is the one the user gave — an output file, or the directory a staged
    file is renamed into — not a temporary name that is gone by the time the error is read."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or not error.strerror:
            raise
        raise type(error)(error.errno, error.strerror, str(path)) from None
