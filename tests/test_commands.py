"""The installed commands: on the path after `pip install`, naming themselves as typed, --help fast."""

import dataclasses
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from llama_jax.train.config import TrainConfig

COMMANDS = {"llama-jax-train", "llama-jax-infer", "llama-jax-convert", "llama-jax-eval", "llama-jax-serve"}


def test_every_command_is_installed_and_answers_help(tmp_path):
    installed = {e.name: e for e in entry_points(group="console_scripts") if e.name.startswith("llama-jax-")}
    assert set(installed) == COMMANDS
    for name in sorted(COMMANDS):
        assert callable(installed[name].load())
        script = Path(sys.executable).parent / name
        if not script.exists():
            pytest.skip(f"{script} is not there: the package is not installed into this interpreter's environment")
        # From another directory: nothing may need the repository as the working directory.
        result = subprocess.run(
            [str(script), "--help"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        assert result.returncode == 0 and "usage:" in result.stdout, (name, result.stderr)
        # The usage line names the command as it was typed, not `python train.py`.
        assert result.stdout.startswith(f"usage: {name}"), (name, result.stdout[:80])


@pytest.mark.parametrize("module", ["train", "infer", "convert", "evaluate", "serve"])
def test_help_does_not_import_jax(module, tmp_path):
    """--help costs a fraction of a second, not JAX's start-up (convert's once took 4.8 s)."""
    probe = (
        f"import sys\nfrom llama_jax.commands import {module}\n"
        f"try:\n    {module}.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('imported jax' if 'jax' in sys.modules else 'no jax')"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("no jax"), result.stdout[-200:]


def test_train_help_lists_every_setting_with_its_default_without_importing_jax(tmp_path):
    probe = (
        "import sys\nfrom llama_jax.commands import train\n"
        "try:\n    train.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('imported jax' if 'jax' in sys.modules else 'no jax')"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("no jax")  # --help costs a fraction of a second, not JAX's start-up
    settings = result.stdout.split("settings (key=value):")[1]
    for field in dataclasses.fields(TrainConfig):
        if dataclasses.is_dataclass(field.default):  # nested settings (model, mesh, lora, dpo, ...)
            assert f"\n  {field.name}" in settings, field.name
        else:
            assert f"\n  {field.name} (default {field.default!r})" in settings, field.name


@pytest.mark.parametrize(
    "module, old, new",
    [
        ("infer", "--batch-size", "--max-num-seqs"),
        ("serve", "--slots", "--max-num-seqs"),
        ("serve", "--max-len", "--max-model-len"),
        ("evaluate", "--seq-len", "--max-model-len"),
    ],
)
def test_a_settings_old_flag_still_works_for_a_release_and_says_its_new_name(module, old, new, capsys):
    """One name per setting in every command (vLLM's); the names they replace set the same value, with a warning."""
    from llama_jax.commands import evaluate, infer, serve
    from llama_jax.commands.common import add_generation_arguments, add_max_model_len_argument

    if module == "serve":
        args = serve.parse_args(["--checkpoint", "DIR", old, "5"])
    elif module == "infer":
        args = infer.parse_args(["--checkpoint", "DIR", old, "5"])
    else:
        parser = evaluate.ArgumentParser(prog="test")
        add_max_model_len_argument(parser, "--seq-len", "window length")
        add_generation_arguments(parser, temperature=0.0, max_new_tokens=8)
        args = parser.parse_args([old, "5"])
    assert getattr(args, new.removeprefix("--").replace("-", "_")) == 5
    assert f"warning: {old} is now {new}" in capsys.readouterr().err
    help_text = {"infer": infer.parse_args, "serve": serve.parse_args}.get(module)
    if help_text is not None:
        with pytest.raises(SystemExit):
            help_text(["--help"])
        shown = capsys.readouterr().out
        assert new in shown and old not in shown  # the old name is read, not advertised


def test_compile_for_is_declared_once():
    sources = [Path(__file__).parents[1] / "llama_jax" / "commands" / f"{m}.py" for m in ("train", "infer", "serve")]
    assert all('"--compile-for"' not in path.read_text() for path in sources)
