"""README's code blocks, as a new user would use them.

Every ```bash / ```python block in README.md is preceded by a marker comment:

    <!-- readme-test: run -->                 the block runs, in order, in one scratch working directory
    <!-- readme-test: run if installed: MODULE ... -->   the same, when those optional packages are installed
    <!-- readme-test: not run: REASON -->     too long for CI or needs hardware/a server; REASON says which

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
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- readme-test: (run|run if installed: [\w ]+|not run: .+?) -->")
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
    for line, lang, marker, code in CODE_BLOCKS:
        if not marker.startswith("run"):
            continue
        needs = marker.removeprefix("run").removeprefix(" if installed:").split()
        if any(importlib.util.find_spec(module) is None for module in needs):
            continue
        argv = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
        result = subprocess.run(argv, cwd=workspace, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"README block at line {line} failed:\n{result.stderr[-3000:]}"
    shutil.rmtree(workspace / "runs", ignore_errors=True)
