"""`python train.py` as users and schedulers run it: exact resume after SIGKILL, a checkpoint on SIGTERM,
two processes computing what one does, and user errors as one line on stderr."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama_jax.commands import train as train_cli
from llama_jax.commands.cli import run_cli

pytestmark = pytest.mark.slow  # the fast suite (-m 'not slow') leaves this module out

REPO = Path(__file__).resolve().parents[1]
STEPS = 40


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_cli")


@pytest.fixture(scope="module")
def base_args(workdir, assets) -> list[str]:
    data = workdir / "shakespeare.txt"
    data.write_text((assets / "tinyshakespeare.txt").read_text()[:40_000])
    return [
        "model=tiny",
        f"data={data}",
        f"tokenizer={assets / 'tok512.bin'}",
        f"data_cache={workdir / 'cache'}",
        "seq_len=32",
        "batch_size=8",
        f"steps={STEPS}",
        "warmup=4",
        "lr=1e-2",
        "eval_every=20",
        "checkpoint_every=10",
        "log_every=1",
        "eval_batches=1",
        "samples=0",
        "mesh.data=2",
    ]


def environment(workdir: Path, devices: int = 2) -> dict[str, str]:
    # One compilation cache for the module: the later processes reuse the first one's executables.
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(workdir / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, expected_status: int = 0) -> dict:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == expected_status, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def train_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().split("\n")[:-1]  # the last may be still being written
    records = [json.loads(line) for line in lines]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        if (run_dir / "metrics.jsonl").is_file() and max(train_losses(run_dir), default=0) >= step:
            return
        time.sleep(0.01)
    pytest.fail(f"step {step} never came")


@pytest.fixture(scope="module")
def uninterrupted(workdir, base_args):
    run_dir = workdir / "uninterrupted"
    return run_dir, finish(start([*base_args, f"run_dir={run_dir}"], environment(workdir)))


def test_exact_resume_after_sigkill(workdir, base_args, uninterrupted):
    reference_dir, reference = uninterrupted
    run_dir = workdir / "killed"
    args = [*base_args, f"run_dir={run_dir}"]
    process = start(args, environment(workdir))
    wait_for_step(run_dir, 13, process)  # past the step-10 checkpoint, possibly while it is being written
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = max(train_losses(run_dir))
    assert killed_at < STEPS
    restarted = start(args, environment(workdir))
    result = finish(restarted)
    assert result["step"] == STEPS
    assert (result["train_loss"], result["eval_loss"]) == (reference["train_loss"], reference["eval_loss"])  # bitwise
    assert train_losses(run_dir) == train_losses(reference_dir)


def test_sigterm_saves_a_checkpoint_and_stops(workdir, base_args):
    run_dir = workdir / "preempted"
    process = start([*base_args, f"run_dir={run_dir}", "checkpoint_every=1000"], environment(workdir))
    wait_for_step(run_dir, 3, process)
    process.send_signal(signal.SIGTERM)
    result = finish(process, expected_status=143)
    assert result["preempted"] and 3 <= result["step"] < STEPS
    assert result["checkpoint_step"] == result["step"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [str(result["step"])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_compute_what_one_does(workdir, base_args, uninterrupted):
    reference_dir, reference = uninterrupted
    run_dir = workdir / "two_processes"
    port = free_port()
    processes = [
        start(
            [
                *base_args,
                f"run_dir={run_dir}",
                f"distributed.coordinator=localhost:{port}",
                "distributed.num_processes=2",
                f"distributed.process_id={i}",
            ],
            environment(workdir, devices=1),
        )
        for i in range(2)
    ]
    results = [finish(p) for p in processes]
    assert results[0] == results[1]
    assert results[0]["step"] == STEPS
    expected, got = train_losses(reference_dir), train_losses(run_dir)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    assert results[0]["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-5)
    assert (run_dir / "checkpoints" / str(STEPS) / "params").is_dir()


def test_user_errors_are_one_line_without_traceback(workdir):
    result = subprocess.run(
        [sys.executable, "train.py", "stpes=5"],
        cwd=REPO,
        env=environment(workdir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key 'stpes'; did you mean 'steps'? (configs/default.yaml lists every key)"
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data=/no/such/corpus.txt"], "no data file matches /no/such/corpus.txt"),
        (["--config", "/no/such.yaml"], "config file not found"),
        (["--config"], "--config needs a YAML file"),
        (["--resume"], "unrecognized arguments: --resume"),
        (["steps=-3"], "steps must be at least 1"),
        (["batch_size=lots"], "bad value for batch_size: expected an integer, got 'lots'"),
        (["tokenizer=/no/such/tokenizer.model", "data=EMPTY"], "tokenizer file not found"),
        (["data=EMPTY"], "cannot train a tokenizer on an empty corpus"),
    ],
)
def test_errors_through_the_cli_entry_point(workdir, capsys, argv, message):
    empty = workdir / "empty.txt"
    empty.write_text("")
    argv = [a.replace("EMPTY", str(empty)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_cli.main, [*argv, f"run_dir={workdir / 'never'}", f"data_cache={workdir / 'cache'}"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (workdir / "never").exists()


def test_evaluate_held_out_scores_the_runs_own_validation_rows(uninterrupted, capsys):
    """`evaluate --held-out RUN_DIR` reproduces the eval loss the run reported (the same rows, masked the same way)."""
    from llama_jax.commands import evaluate

    run_dir, reference = uninterrupted
    assert evaluate.main(["--held-out", str(run_dir)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["nll_per_token"] == pytest.approx(reference["eval_loss"], rel=1e-5)
    assert result["rows"] == 8
