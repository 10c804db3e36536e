"""An earlier commit's own benchmark, run in a temporary git worktree in the same run as today's: a regression
check compares with the code as it was, on the same machine under the same load.

    output = run_at("b94043e", "benchmarks/decode.py", ["--small", "--no-torch"])
    rows = table_rows(output)      # the markdown table rows it printed, as lists of cells
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def checkout(commit: str) -> Iterator[Path]:
    """`commit` checked out in a temporary worktree (removed afterwards, with its git bookkeeping)."""
    with tempfile.TemporaryDirectory(prefix="llama_jax-baseline-") as scratch:
        path = Path(scratch) / "tree"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit], check=True, capture_output=True
        )
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], capture_output=True)


def run_at(commit: str, script: str, args: list[str], timeout: float = 3600) -> str:
    """Run `script` of `commit` with its own package first on the path; its standard output."""
    with checkout(commit) as tree:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        result = subprocess.run(
            [sys.executable, str(tree / script), *args],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if result.returncode != 0:
        raise RuntimeError(f"{script} at {commit} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def table_rows(output: str) -> list[list[str]]:
    """The data rows of the markdown tables in `output`, each a list of its cells."""
    rows = []
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and not set("".join(cells)) <= set("-: "):
            rows.append(cells)
    return rows


def number(cell: str) -> float:
    """A table cell such as "1,234" or "2.95x" as a number."""
    return float(cell.replace(",", "").rstrip("x"))
