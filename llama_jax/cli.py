"""What every command line shares: user errors become one line on stderr and a non-zero exit."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

EXPECTED_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, PermissionError, UnicodeDecodeError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors raise ValueError, so `run_cli` prints them as one `error:` line."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(f"{self.prog}: {message}")


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main(argv)`; expected errors print `error: ...` with no traceback and exit with status 2."""
    try:
        code = main(argv)
    except EXPECTED_ERRORS as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def _one_line(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError) and error.filename:
        return f"no such file: {error.filename}"
    if isinstance(error, UnicodeDecodeError):
        return f"input is not valid UTF-8 text ({error.reason} at byte {error.start})"
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())
