"""One process of a multi-host job, run so that it always ends with one line.

When a process of a job dies, JAX's coordination service notices — at once when it was process 0 (the
service runs there), after `distributed.HEARTBEAT_TIMEOUT_S` otherwise — and every other process is ended
by a fatal C++ log and an abort: pages of stack trace and no word of which process was lost. So a command that
joins a job runs its work in a child process (the same command, marked by `CHILD_VARIABLE`), passes its
output through, holds back the coordination service's own log, and when the child was ended that way prints
one `error:` line naming what was lost and exits 1. A child that ends otherwise — done, or with its own
`error:` line — hands its exit status on unchanged. Signals (Ctrl-C, a scheduler's SIGTERM) go to the child.

Nothing here imports JAX: the parent stays a small process.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys

CHILD_VARIABLE = "LLAMA_JAX_JOB_PROCESS"
PROGRAM_VARIABLE = "LLAMA_JAX_PROGRAM"  # the command as the user typed it (`cli.program_name`)
LOST_STATUS = 1
# The coordination service's fatal log ("Terminating process because the JAX distributed service detected
# fatal errors ...") and C++ log lines in general (absl's format: severity, date, time, thread, file:line).
_FATAL = re.compile(rb"^F\d{4} [\d:.]+\s+\d+ client\.h:\d+\] Terminating process because the JAX distributed service")
_LOG_LINE = re.compile(rb"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\]")
# Gloo's connection notice ("[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer ranks
# is : 1"), which two threads may print at once, their characters interleaved: its pieces, to find it in any mix.
_GLOO_PIECES = re.compile(rb"\[Gloo\] Rank|is connected to|peer ranks\.|Expected number of connected peer ranks is :")
# Which processes the service lost: "unhealthy (stopped sending heartbeats):\n1\n" when it ends the others,
# "Task 1 heartbeat timeout" when a process that saw a collective fail shuts down.
_UNHEALTHY = re.compile(rb"unhealthy \(stopped sending heartbeats\):\s*((?:\d+\s*)+)|Task (\d+) heartbeat timeout")


def is_job_process() -> bool:
    """True in the child that does a host's work (and in a process that must not start one)."""
    return os.environ.get(CHILD_VARIABLE) == "1"


def keep_stdout_for_python() -> None:
    """In a job's process: what native code writes to standard output (gloo's "[Gloo] Rank 1 is connected"
    lines on CPU hosts) goes to standard error, where the host's command drops it, so that standard output
    holds only what the command prints (infer.py's JSONL records)."""
    sys.stdout.flush()
    ours = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = open(ours, "w", encoding=sys.stdout.encoding, errors=sys.stdout.errors, closefd=True)  # noqa: SIM115


def run_as_job_process(argv: list[str], program: str, process_id: int, num_processes: int) -> int:
    """Run `argv` (a command line of this interpreter) as this host's process of the job and return the exit
    status this host's command should end with. `program`: the command as the user typed it, for its usage
    and error lines."""
    env = {**os.environ, CHILD_VARIABLE: "1", PROGRAM_VARIABLE: program}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # XLA's own warnings and errors; its fatal log still comes
    if process_id != 0:  # process 0 shows the progress; the others' bars (ours, a library's) would repeat it
        env["TQDM_DISABLE"] = "1"
    child = subprocess.Popen([sys.executable, *argv], env=env, stderr=subprocess.PIPE)
    signals = (signal.SIGINT, signal.SIGTERM)
    forwarded = {sig: signal.signal(sig, lambda sig, _: child.send_signal(sig)) for sig in signals}
    try:
        fatal = _pass_through(child.stderr)
        status = child.wait()
    finally:
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)
    if fatal is None:
        return status
    print(f"error: {lost_process_line(fatal, process_id, num_processes)}", file=sys.stderr, flush=True)
    return LOST_STATUS


def lost_process_line(fatal: bytes, process_id: int, num_processes: int) -> str:
    """What the coordination service's fatal log says was lost, in one line."""
    unhealthy = _UNHEALTHY.search(fatal)
    if unhealthy is not None:
        lost = ", ".join((unhealthy.group(1) or unhealthy.group(2)).decode().split())
        return (
            f"process {lost} of this {num_processes}-process job stopped (no heartbeat for the coordination "
            f"service's timeout); process {process_id} stops too: rerun the command on every host"
        )
    if process_id != 0:
        return (
            f"process 0 of this {num_processes}-process job, which runs its coordination service, is gone; "
            f"process {process_id} stops too: rerun the command on every host"
        )
    return f"the coordination service ended this {num_processes}-process job; rerun the command on every host"


def _pass_through(stream) -> bytes | None:
    """Copy the child's stderr to ours as it comes (a progress bar's carriage returns included), except C++
    log lines and the child's own `error:` lines, which are held back until the child ends: the coordination
    service's fatal log and what follows it (a stack trace) are returned instead of shown, and then the line
    that names the lost process replaces the child's (a collective that failed because a peer stopped). None
    when there was no such log: the held lines follow."""
    held: list[bytes] = []
    fatal: list[bytes] | None = None
    pending, after_notice = b"", False
    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    while True:
        ready = selector.select(timeout=0.2)
        chunk = os.read(stream.fileno(), 65536) if ready else None
        if chunk == b"":
            break
        if chunk is None:  # quiet for a moment: show a partial line (a prompt, a progress bar) as it is
            lines, pending = ([pending], b"") if pending and not _GLOO_PIECES.search(pending) else ([], pending)
        else:
            lines = re.split(rb"(?<=[\r\n])", pending + chunk)
            pending = lines.pop() if not lines[-1].endswith((b"\n", b"\r")) else b""
        for line in filter(None, lines):
            notice = _GLOO_PIECES.search(line) or (after_notice and not line.strip(b" 0123456789\r\n"))
            after_notice = bool(notice) and not _GLOO_PIECES.sub(b"", line).strip(b" 0123456789\r\n")
            if fatal is not None:
                fatal.append(line)
            elif _FATAL.match(line):
                fatal = [line]
            elif after_notice:  # gloo's notice, or the rest of one split by another's: never the user's
                continue
            elif _LOG_LINE.match(line) or line.startswith(b"error: "):
                held.append(line)
            else:
                sys.stderr.buffer.write(line)
                sys.stderr.buffer.flush()
    if fatal is None:
        sys.stderr.buffer.write(b"".join(held) + pending)
        sys.stderr.buffer.flush()
        return None
    return b"".join(fatal)
