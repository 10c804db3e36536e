"""README's code blocks, as a new user would use them.

Every ```bash / ```python block in README.md is preceded by a marker comment:

    <!-- readme-test: run -->                 the block runs, in order, in one scratch working directory
    <!-- readme-test: run if installed: MODULE ... -->   the same, when those optional packages are installed
    <!-- readme-test: not run: REASON -->     too long for CI or needs hardware; REASON says which
    <!-- readme-test: serve: ... -->          runs like `run`, but its last line stays running in the
                                              background (a server: until GET /health answers) while the
                                              next block runs, then it is stopped
    <!-- readme-test: the output above has these lines -->   (before a ```text block) the previous block's
                                              stdout has these lines, in this order; "..." stands for any text

Every block, run or not, is also checked against the command lines: each `--flag` written after
`python train.py`, `python infer.py` or `python -m llama_jax.X` must be one that command's --help lists, and each
`key=value` after train.py must be a setting. A README example that no longer works fails here.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the fast suite (-m 'not slow') leaves this module out

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(
    r"<!-- readme-test: (run|run if installed: [\w ]+|not run: .+?|serve: .+?|the output above has these lines) -->"
)
OUTPUT = "the output above has these lines"
SERVER = "http://127.0.0.1:8000/health"  # where README's server example listens
FENCE = re.compile(r"^```(\w*)\s*$")
COMMAND = re.compile(r"python (train\.py|infer\.py|-m llama_jax\.(?:convert|evaluate|serve))((?: (?!#)\S+)*)")


def readme_blocks() -> list[tuple[int, str, str, str]]:
    """(line number, language, marker, code) of each fenced block; `marker` is '' when missing."""
    lines = (REPO / "README.md").read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        previous = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        found = MARKER.fullmatch(previous.strip())
        blocks.append((index + 1, opening.group(1), found.group(1) if found else "", "\n".join(lines[index + 1 : end])))
        index = end + 1
    return blocks


CODE_BLOCKS = [block for block in readme_blocks() if block[1] in ("bash", "python")]


def test_every_code_block_says_whether_it_runs():
    unmarked = [line for line, _, marker, _ in CODE_BLOCKS if not marker]
    assert not unmarked, f"README code blocks at lines {unmarked} need a <!-- readme-test: ... --> marker"
    assert sum(marker.startswith("run") for _, _, marker, _ in CODE_BLOCKS) >= 3


@cache
def help_text(command: str, subcommand: str) -> str:
    argv = [command] if command.endswith(".py") else ["-m", command.removeprefix("-m ")]
    result = subprocess.run(
        [sys.executable, *argv, *([subcommand] if subcommand else []), "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def joined_lines(code: str) -> list[str]:
    """Lines with usage continuations (indented, or after a backslash) joined to the command they continue."""
    joined: list[str] = []
    for line in code.splitlines():
        if joined and (line.startswith(" ") or joined[-1].endswith("\\")):
            joined[-1] = joined[-1].rstrip("\\") + " " + line.strip()
        else:
            joined.append(line)
    return joined


@pytest.mark.parametrize("line,code", [(line, code) for line, lang, _, code in CODE_BLOCKS if lang == "bash"])
def test_commands_use_only_flags_and_settings_that_exist(line, code):
    checked = 0
    for text in joined_lines(code):
        for command, args in COMMAND.findall(text.split(" # ")[0]):
            words = args.split()
            takes_subcommand = command.endswith(("convert", "evaluate")) and words and not words[0].startswith("-")
            subcommand = words[0] if takes_subcommand else ""
            usage = help_text(command, subcommand)
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", " ".join(words)):
                assert re.search(rf"{flag}\b", usage), f"README line {line}: {command} has no {flag}"
            if command == "train.py":
                for key in re.findall(r"(?:^|\s)\[?([a-z_]+)(?:\.[a-z_]+)?=", " " + " ".join(words)):
                    assert re.search(rf"^  {key}\b", usage, re.M), f"README line {line}: no setting {key}"
            checked += 1
    if not checked:
        pytest.skip("no llama_jax command in this block")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """What a fresh clone has (entry scripts, configs, bundled assets, test tasks); outputs land in scratch."""
    folder = tmp_path_factory.mktemp("readme")
    for name in ("train.py", "infer.py", "configs", "assets", "tests"):
        (folder / name).symlink_to(REPO / name)
    return folder


def test_the_blocks_marked_run_run_as_written(workspace):
    # One device, as a laptop or a Colab CPU runtime has: an example that needs a mesh of several fails here.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["MY_KEY"] = "sk-readme-test"
    stdout, ran, server = "", False, None
    try:
        for line, lang, marker, code in readme_blocks():
            if marker == OUTPUT:
                if ran:  # the block above ran: its stdout shows what README says it shows
                    assert_has_lines(stdout, code, line)
                continue
            ran = False
            if lang not in ("bash", "python") or not marker.startswith(("run", "serve")):
                continue
            needs = (
                marker.removeprefix("run").removeprefix(" if installed:").split() if marker.startswith("run") else []
            )
            if any(importlib.util.find_spec(module) is None for module in needs):
                continue
            if marker.startswith("serve"):
                *first, last = joined_lines(code)
                run_block(lang, "\n".join(first), line, workspace, env)
                server = start_server(last, line, workspace, env)
                continue
            stdout, ran = run_block(lang, code, line, workspace, env), True
            if server is not None:
                stop(server)
                server = None
    finally:
        if server is not None:
            stop(server)
    shutil.rmtree(workspace / "runs", ignore_errors=True)


def run_block(lang: str, code: str, line: int, workspace: Path, env: dict) -> str:
    argv = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    result = subprocess.run(argv, cwd=workspace, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"README block at line {line} failed:\n{result.stderr[-3000:]}"
    return result.stdout


def assert_has_lines(stdout: str, shown: str, line: int) -> None:
    """Each shown line is a line of stdout ("..." matching any text), in the order shown."""
    printed = stdout.splitlines()
    at = 0
    for wanted in shown.splitlines():
        pattern = re.compile(".*?".join(map(re.escape, wanted.rstrip().split("..."))))
        found = next((i for i in range(at, len(printed)) if pattern.fullmatch(printed[i].rstrip())), None)
        assert found is not None, f"README line {line}: the block above did not print {wanted!r}:\n{stdout[-3000:]}"
        at = found + 1


def start_server(command: str, line: int, workspace: Path, env: dict) -> subprocess.Popen:
    log = open(workspace / "server.log", "w")  # noqa: SIM115 (closed with the process in `stop`)
    server = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=workspace, env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(SERVER, timeout=5) as answer:
                if answer.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.5)
    stop(server)
    pytest.fail(
        f"README line {line}: the server never became healthy:\n{(workspace / 'server.log').read_text()[-3000:]}"
    )


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
