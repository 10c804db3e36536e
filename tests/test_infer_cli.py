"""`python infer.py`: llama2.c's published stories260K greedy text, resuming a partial output, chat prompts
from standard input, and every user error as one `error:` line.

Real command lines run as subprocesses; the error cases call the same `run_cli(main, argv)` in-process
(each subprocess costs seconds of imports), plus one subprocess to show the real exit status and stderr.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

from llama_jax.chat import encode_dialog
from llama_jax.commands import infer
from llama_jax.commands.cli import run_cli
from llama_jax.config import preset
from llama_jax.convert import convert_llama2c
from llama_jax.inference.engine import Engine
from llama_jax.inference.results_file import JsonlOutput
from llama_jax.inference.settings import EngineSettings
from llama_jax.inference.types import make_request
from llama_jax.loading import load
from llama_jax.model import create_model
from llama_jax.model_dir import write_model_dir
from llama_jax.sharding import MeshConfig, make_mesh
from llama_jax.tokenizers import load_tokenizer

pytestmark = pytest.mark.slow  # the fast suite (-m 'not slow') leaves this module out

REPO = Path(__file__).resolve().parents[1]


def run_infer(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "infer.py", *map(str, args)],
        cwd=REPO,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def stories(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("stories") / "stories260K"
    convert_llama2c(assets / "stories260K.bin", assets / "tok512.bin", out)
    return out


@pytest.fixture(scope="module")
def chat_model(assets, tmp_path_factory):
    """Random weights with tok512's vocabulary and the llama2 chat template."""
    config = preset("tiny").replace(vocab_size=512, max_seq_len=96)
    model = create_model(config, make_mesh(MeshConfig(), jax.devices()[:1]), seed=1)
    out = tmp_path_factory.mktemp("chat") / "model"
    write_model_dir(out, config, nnx.to_pure_dict(nnx.state(model)), assets / "tok512.bin", chat_template="llama2")
    return out


def test_stories260k_greedy_text_matches_llama2c(stories, assets, tmp_path):
    expected = json.loads((assets / "stories260K_expected.json").read_text())
    cases = {case["name"]: case for case in expected["cases"]}
    out = tmp_path / "out.jsonl"
    # run.c's `steps` counts forward positions from BOS; each position yields one token.
    result = run_infer(
        "--checkpoint",
        stories,
        "--prompt",
        "",
        "--temperature",
        "0",
        "--max-new-tokens",
        cases["greedy_n256"]["steps"],
        "--output",
        out,
    )
    assert result.returncode == 0, result.stderr
    [record] = records(out)
    assert record["completion"] == cases["greedy_n256"]["expected"]
    assert record["token_ids"][:6] == expected["first_greedy_ids"]
    assert (record["prompt"], record["finish_reason"]) == ("", "length")
    tokenizer = load_tokenizer(stories / "tokenizer.bin")
    assert tokenizer.decode(record["token_ids"][: cases["greedy_n200"]["steps"]]) == cases["greedy_n200"]["expected"]
    assert "prompt buckets compiled: [16]" in result.stderr
    # --format text: the story as plain text on stdout, as README shows it.
    text = run_infer(
        "--checkpoint", stories, "--prompt", "", "--temperature", "0", "--max-new-tokens", 256, "--format", "text"
    )
    assert text.returncode == 0, text.stderr
    assert text.stdout == cases["greedy_n256"]["expected"] + "\n\n"


def test_a_rerun_resumes_after_the_records_already_written(stories, tmp_path):
    prompts = ["Once upon a time", "Lily had a ball", "The sun was", "Tom", "One day, a cat"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    args = [
        "--checkpoint",
        stories,
        "--prompts",
        tmp_path / "prompts.txt",
        "--max-num-seqs",
        "2",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.9",
        "--top-k",
        "40",
        "--seed",
        "5",
    ]
    full_out = tmp_path / "full.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(infer.main, [*map(str, args), "--output", str(full_out)])
    assert exit_info.value.code == 0
    full = records(full_out)
    assert [r["prompt"] for r in full] == prompts

    # A crash after the first batch... of a run whose first record we mark, and mid-way through a line.
    kept = dict(full[0], completion="(kept, not regenerated)")
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps(kept) + "\n" + json.dumps(full[1])[:25])
    (tmp_path / "partial.jsonl.run.json").write_text((tmp_path / "full.jsonl.run.json").read_text())
    result = run_infer(*args, "--output", partial)
    assert result.returncode == 0, result.stderr
    # Batches now start at prompt 1, yet every prompt keeps its own random stream.
    assert records(partial) == [kept, *full[1:]]


def test_chat_prompts_from_stdin_use_the_checkpoint_template(chat_model, tmp_path):
    messages = ["Hello there", "What is a cat?"]
    stdin = "".join(json.dumps({"prompt": m}) + "\n" for m in messages)
    result = run_infer(
        "--checkpoint",
        chat_model,
        "--prompts",
        "-",
        "--chat",
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
        "--max-num-seqs",
        "2",
        stdin=stdin,
    )
    assert result.returncode == 0, result.stderr
    got = [json.loads(line) for line in result.stdout.splitlines()]

    loaded = load(chat_model, mesh=make_mesh(MeshConfig(), jax.devices()[:1]))
    ids = [encode_dialog(loaded.tokenizer, "llama2", [{"role": "user", "content": m}]) for m in messages]
    assert ids[0][:1] == [loaded.tokenizer.bos_id]
    asked = [make_request(i, 6, tokenizer=loaded.tokenizer) for i in ids]
    expected = Engine(loaded, EngineSettings(max_num_seqs=1)).generate(asked)
    assert [(r["token_ids"], r["finish_reason"]) for r in got] == [(e.token_ids, e.finish_reason) for e in expected]
    assert [r["prompt"] for r in got] == messages


def assert_one_error_line(stderr: str, expected: str) -> str:
    """One error line, last, with nothing before it but the status lines of compiles (waits that say what
    they are for)."""
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("compiling ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and stderr.strip().endswith(lines[0]), stderr
    assert expected in lines[0], lines[0]
    return lines[0]


def test_outputs_are_never_overwritten_mixed_or_shared(stories, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes, no newline at the end")
    base = ["--checkpoint", str(stories), "--max-new-tokens", "4"]

    def refused(*args, prompts=("Tom", "Lily")) -> str:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(infer.main, [*base, *args, *(a for p in prompts for a in ("--prompt", p))])
        assert exit_info.value.code == 2
        return assert_one_error_line(capsys.readouterr().err, "")

    assert "was not written by infer.py" in refused("--output", str(notes))
    assert notes.read_text() == "my notes, no newline at the end"
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit):
        run_cli(infer.main, [*base, "--output", str(out), "--seed", "1", "--prompt", "Tom", "--prompt", "Lily"])
    capsys.readouterr()
    written = out.read_text()
    for other in (
        ["--seed", "2"],
        ["--temperature", "0"],
        ["--top-p", "0.5"],
        ["--top-k", "3"],
        ["--max-new-tokens", "5"],
        ["--stop-id", "7"],
    ):
        message = refused("--output", str(out), "--seed", "1", *other)
        assert "holds results of other settings" in message, message
    assert "is not for prompt 1" in refused("--output", str(out), "--seed", "1", prompts=("Sue", "Lily"))
    # another writer holds the output while this one starts
    held = JsonlOutput(out, ["Tom", "Lily"], json.loads((tmp_path / "out.jsonl.run.json").read_text())["settings"])
    try:
        assert "is being written by another infer.py" in refused("--output", str(out), "--seed", "1")
    finally:
        held.close()
    assert out.read_text() == written


def test_a_full_disk_is_one_line(stories, tmp_path, capsys, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out.jsonl"))

    monkeypatch.setattr(JsonlOutput, "write", no_space)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            infer.main,
            [
                "--checkpoint",
                str(stories),
                "--prompt",
                "Tom",
                "--max-new-tokens",
                "2",
                "--output",
                str(tmp_path / "out.jsonl"),
            ],
        )
    assert exit_info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, f"No space left on device: {tmp_path / 'out.jsonl'}")


def test_the_command_line_reports_a_missing_checkpoint_in_one_line(tmp_path):
    result = run_infer("--checkpoint", tmp_path / "nowhere", "--prompt", "hi")
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "is not a llama_jax model directory")
    assert result.stdout == ""


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (folder / "no_prompt.jsonl").write_text('{"text": "hello"}\n')
    (folder / "other.jsonl").write_text(json.dumps({"prompt": "something else", "completion": "x"}) + "\n")
    return folder


ERRORS = {
    "top-p zero": (["--top-p", "0"], "top_p must be in (0, 1]"),
    "top-p above one": (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    "negative temperature": (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    "infinite temperature": (["--temperature", "inf"], "temperature must be a finite number >= 0, got inf"),
    "negative top-k": (["--top-k", "-1"], "top_k must be an integer >= 0"),
    "negative new tokens": (["--max-new-tokens", "-5"], "max_new_tokens must be an integer >= 1"),
    "zero sequences": (["--max-num-seqs", "0"], "max_num_seqs must be an integer >= 1"),
    "negative seed": (["--seed", "-1"], "seed must be an integer in [0, 4294967295]"),
    "seed beyond 32 bits": (["--seed", str(2**32)], "seed must be an integer in [0, 4294967295]"),
    "not a number": (["--max-new-tokens", "many"], "invalid int value"),
    "bad mesh": (["--mesh", "model=2"], "bad mesh"),
    "mesh larger than the devices": (["--mesh", "tensor=4"], "devices"),
    "prompt too long": (
        ["--prompt", "", "--prompt", "Once upon a time", "--max-new-tokens", "508"],
        "prompt 2 has 5 tokens; with max_new_tokens 508 it needs 513 positions, but the model allows 512",
    ),
    "no chat template": (["--chat"], "no chat template"),
    "stop id outside the vocabulary": (["--stop-id", "512"], "outside the vocabulary"),
}
FILE_ERRORS = {
    "missing prompt file": (["--prompts", "{bad}/missing.txt"], "no such file"),
    "prompt file is a folder": (["--prompts", "{bad}"], "Is a directory"),
    "non-UTF-8 prompts": (["--prompts", "{bad}/latin1.txt"], "is not valid UTF-8 text"),
    "JSONL without prompt": (["--prompts", "{bad}/no_prompt.jsonl"], 'needs a string "prompt" field'),
    "output not written by infer.py": (["--output", "{bad}/other.jsonl"], "was not written by infer.py"),
    "output under a file": (["--output", "{bad}/latin1.txt/out.jsonl"], "Not a directory"),
}


@pytest.mark.parametrize("case", [*ERRORS, *FILE_ERRORS])
def test_user_errors_are_one_line_without_a_traceback(case, stories, bad_inputs, capsys):
    args, expected = {**ERRORS, **FILE_ERRORS}[case]
    args = [a.format(bad=bad_inputs) for a in args]
    prompts = [] if any(a in args for a in ("--prompts", "--prompt")) else ["--prompt", "hi"]
    before = (bad_inputs / "other.jsonl").read_text()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(infer.main, ["--checkpoint", str(stories), *prompts, *args])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert_one_error_line(captured.err, expected)
    assert captured.out == ""
    assert (bad_inputs / "other.jsonl").read_text() == before  # nothing overwritten
