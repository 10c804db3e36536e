"""What every command line shares: user errors become one line on stderr and a non-zero exit.

Libraries underneath log through absl (orbax: pages of lines about a failed write); a command line turns
the failure into its one line, so only their critical messages are let through.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from llama_jax.commands.hosts import PROGRAM_VARIABLE, is_job_process
from llama_jax.errors import one_line
from llama_jax.hardware import quiet_libtpu_without_tpu

USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130
EXPECTED_ERRORS = (ValueError, OSError, UnicodeDecodeError)


def program_name(usual: str) -> str:
    """The command as the user typed it: `llama-jax-train` when run through the installed script, else `usual`
    (e.g. `python train.py`), so usage and error lines name what to type again."""
    typed = os.environ.get(PROGRAM_VARIABLE)  # a job's process, started by its host's command (`hosts.py`)
    if typed:
        return typed
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return invoked if invoked.startswith("llama-jax-") else usual


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors raise ValueError, so `run_cli` prints them as one `error:` line."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(f"{self.prog}: {message}")


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main(argv)`; expected errors print `error: ...` with no traceback and exit with status 2.
    llama_jax's own warnings (a damaged checkpoint skipped) print as `warning: ...` lines."""
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    _warnings_as_lines()
    sys.unraisablehook = _quiet_closed_event_loops
    logging.getLogger("asyncio").addFilter(_drop_orbax_orphan_reads)
    quiet_libtpu_without_tpu()
    try:
        code = main(argv)
    except EXPECTED_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        _quiet_after_the_error_line()
        sys.exit(USER_ERROR_STATUS)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED_STATUS)
    except Exception as e:
        if not (is_job_process() and type(e).__name__ == "JaxRuntimeError"):
            raise
        # A process of a multi-host job whose collective failed: another process stopped. Its host's command
        # (`hosts.py`) names which one when the coordination service says, and shows this line otherwise.
        print(f"error: a computation across the job's processes failed: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)


def _quiet_closed_event_loops(unraisable) -> None:
    """A failed orbax read or write leaves tensorstore callbacks that fire into event loops orbax has closed,
    and reads of the other arrays that orbax never awaits: Python reports each as an unraisable exception
    (pages of them for a model whose files are gone). The command's own error line says what failed."""
    closed_loop = isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)
    code = getattr(unraisable.object, "cr_code", None)  # a coroutine's code object
    orbax_read = code is not None and "orbax" in code.co_filename
    if not (closed_loop or orbax_read):
        sys.__unraisablehook__(unraisable)


def _quiet_after_the_error_line() -> None:
    """The error line is the last thing a failed command says: what the interpreter collects on its way out
    (orphaned reads of a failed restore, whose exceptions asyncio would log) is a consequence of that error."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
    sys.unraisablehook = lambda unraisable: None


def _drop_orbax_orphan_reads(record: logging.LogRecord) -> bool:
    """The same orphaned reads, when their tasks or TensorStore futures are collected before their
    coroutines: asyncio logs `... exception was never retrieved` with the read's traceback whenever the
    garbage collector happens to get there first (while an older checkpoint is tried, or at exit)."""
    message = record.getMessage()
    orphan = "exception was never retrieved" in message
    return not (orphan and any(source in message for source in ("orbax", "OCDBT", "TensorStore", "tensorstore")))


def _warnings_as_lines() -> None:
    logger = logging.getLogger("llama_jax")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
