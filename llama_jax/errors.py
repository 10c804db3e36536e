"""Errors as the one line a user reads: what every command line prints, and what wrapped library errors carry."""

from __future__ import annotations


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
