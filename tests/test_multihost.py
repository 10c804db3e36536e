"""Generation, scoring and serving on a multi-host job: two processes of two CPU devices each (gloo
collectives, JAX's coordination service) give exactly what one process of four devices gives, process 0 alone
writes, and a lost process ends the job with one line (its rerun resumes).

Each host runs the same command with --coordinator/--num-processes/--process-id, as on a GPU cluster (a Cloud
TPU VM finds them itself)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from module_runner import free_port

pytestmark = pytest.mark.slow  # the fast suite (-m 'not slow') leaves this module out

REPO = Path(__file__).resolve().parents[1]
PROMPT_WORDS = "Once upon a time there was a little girl named Lily who loved to play in the park with her dog".split()
HEARTBEAT = "10"  # seconds: a lost process is noticed within them (LLAMA_JAX_HEARTBEAT_TIMEOUT)


def environment(cache: Path, devices: int) -> dict[str, str]:
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "LLAMA_JAX_HEARTBEAT_TIMEOUT": HEARTBEAT,
    }


def job(command: list[str], cache: Path, cwd: Path, **popen) -> list[subprocess.Popen]:
    """The command on each of two 'hosts' (processes of two CPU devices), each in a session of its own so
    that a host can be killed whole."""
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, *command, "--coordinator", f"localhost:{port}", "--num-processes", "2"]
            + ["--process-id", str(i)],
            cwd=cwd,
            env=environment(cache, 2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            **popen,
        )
        for i in range(2)
    ]


def alone(command: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    """The command as one process of four devices: the same mesh shape as the job's."""
    result = subprocess.run(
        [sys.executable, *command], cwd=cwd, env=environment(cache, 4), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def finish(processes: list[subprocess.Popen]) -> list[tuple[str, str]]:
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    return outputs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, stories_model):
    """The model, ragged prompts (one past a 256-token prefill chunk, two sharing a 300-token prefix for the
    prefix cache) and a compilation cache the module's processes share."""
    folder = tmp_path_factory.mktemp("multihost")
    long_prefix = " ".join(PROMPT_WORDS * 10)
    prompts = [
        "Once upon a time",
        "Tom",
        f"{long_prefix} One day",
        f"{long_prefix} Then the sun came out and",
        " ".join(PROMPT_WORDS[:9]),
        "The big dog ran to",
    ]
    (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return folder


def infer(workdir: Path, stories_model: Path, output: str, *flags: str) -> list[str]:
    return [
        "-m",
        "llama_jax.commands.infer",
        "--checkpoint",
        str(stories_model),
        "--prompts",
        str(workdir / "prompts.txt"),
        "--output",
        str(workdir / output),
        "--max-new-tokens",
        "16",
        *flags,
    ]


@pytest.mark.parametrize(
    "mesh, sampling",
    [("tensor=4", ["--temperature", "0.8", "--seed", "3"]), ("data=2,tensor=2", ["--temperature", "0"])],
    ids=["tensor-sampled", "data-tensor-greedy"],
)
def test_infer_on_two_hosts_writes_what_one_process_writes(workdir, stories_model, mesh, sampling):
    flags = ["--mesh", mesh, *sampling]
    alone(infer(workdir, stories_model, f"alone-{mesh}.jsonl", *flags), workdir / "cache", REPO)
    outputs = finish(job(infer(workdir, stories_model, f"job-{mesh}.jsonl", *flags), workdir / "cache", REPO))
    expected = (workdir / f"alone-{mesh}.jsonl").read_text()
    assert (workdir / f"job-{mesh}.jsonl").read_text() == expected
    assert len(expected.splitlines()) == 6
    leader, follower = outputs
    assert "6 completions written" in leader[1]
    assert follower == ("", "")  # process 1 writes nothing: no output file, no progress, no summary


def test_a_lost_host_ends_the_job_in_one_line_and_the_rerun_resumes(workdir, stories_model):
    """Process 1 dies (killed whole) once the first records are written (four prompts at a time, one sequence
    on each device: a data-parallel job); process 0 stops with one line within the heartbeat timeout, and the
    same command on both hosts again finishes the file as one process writes it."""
    (workdir / "short.txt").write_text("".join(f"Story {i}: once upon a time\n" for i in range(12)))
    flags = ["--mesh", "data=4", "--temperature", "0.8", "--seed", "3", "--max-num-seqs", "4"]
    flags += ["--prompts", str(workdir / "short.txt"), "--max-new-tokens", "120"]
    alone(infer(workdir, stories_model, "uninterrupted.jsonl", *flags), workdir / "cache", REPO)
    command = infer(workdir, stories_model, "resumed.jsonl", *flags)
    leader, follower = job(command, workdir / "cache", REPO)
    output = workdir / "resumed.jsonl"
    deadline = time.monotonic() + 300
    while not (output.is_file() and output.read_text()):
        assert time.monotonic() < deadline and leader.poll() is None, leader.stderr.read()[-3000:]
        time.sleep(0.05)
    os.killpg(follower.pid, signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = leader.communicate(timeout=120)
    assert time.monotonic() - killed < 60
    assert leader.returncode == 1
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error")]
    assert lines == [
        "error: process 1 of this 2-process job stopped (no heartbeat for the coordination service's timeout); "
        "process 0 stops too: rerun the command on every host"
    ], stderr[-3000:]
    assert "Traceback" not in stderr and "Check failure" not in stderr
    written = len(output.read_text().splitlines())
    assert 1 <= written < 12
    outputs = finish(job(command, workdir / "cache", REPO))
    assert f"{12 - written} completions written" in outputs[0][1]
    assert output.read_text() == (workdir / "uninterrupted.jsonl").read_text()


def test_perplexity_on_two_hosts_is_one_process_perplexity(workdir, stories_model, assets):
    command = [
        "-m",
        "llama_jax.commands.evaluate",
        "--checkpoint",
        str(stories_model),
        "--data",
        str(assets / "tinystories_sample.txt"),
        "--max-model-len",
        "128",
        "--mesh",
        "data=2,tensor=2",
    ]
    expected = json.loads(alone(command, workdir / "cache", REPO).stdout.splitlines()[-1])
    (leader_out, _), (follower_out, _) = finish(job(command, workdir / "cache", REPO))
    got = json.loads(leader_out.splitlines()[-1])
    assert got["tokens"] == expected["tokens"] and follower_out == ""
    assert got["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)


def serve(workdir: Path, stories_model: Path, port: int) -> list[str]:
    return [
        "-m",
        "llama_jax.commands.serve",
        "--checkpoint",
        str(stories_model),
        "--port",
        str(port),
        "--mesh",
        "data=2,tensor=2",
        "--max-model-len",
        "512",
        "--chat-template",
        "llama2",
        # Few programs to compile in each server: chunks of 64 (the long prompts take five), two sequences.
        "--prefill-chunk",
        "64",
        "--max-num-seqs",
        "2",
    ]


def wait_healthy(url: str, processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for process in processes:
            assert process.poll() is None, process.stderr.read()[-3000:]
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the server did not start")


def ask(url: str, prompts: list[str]) -> list:
    """Completions (n=2, sampled, a stop string) and chat and completion streams, through the openai client."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    answers = []
    reply = client.completions.create(
        model="stories260K", prompt=prompts[:2], max_tokens=30, temperature=0.8, seed=5, n=2, stop=["."]
    )
    answers.append([(c.index, c.text, c.finish_reason) for c in reply.choices])
    for prompt in prompts[2:4]:  # longer than a chunk, sharing a prefix: chunked prefill and the prefix cache
        stream = client.completions.create(
            model="stories260K", prompt=prompt, max_tokens=20, temperature=0, stream=True
        )
        answers.append("".join(chunk.choices[0].text for chunk in stream if chunk.choices))
    chat = [{"role": "user", "content": "Tell me about Lily."}]
    stream = client.chat.completions.create(model="stories260K", messages=chat, max_tokens=25, stream=True, seed=1)
    answers.append("".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))
    return answers


def test_the_server_on_two_hosts_answers_as_one_process_does(workdir, stories_model):
    prompts = (workdir / "prompts.txt").read_text().splitlines()
    port = free_port()
    one = subprocess.Popen(
        [sys.executable, *serve(workdir, stories_model, port)],
        cwd=REPO,
        env=environment(workdir / "cache", 4),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", [one])
        expected = ask(f"http://127.0.0.1:{port}", prompts)
    finally:
        one.terminate()
        one.wait(timeout=60)
    port = free_port()
    processes = job(serve(workdir, stories_model, port), workdir / "cache", REPO)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", processes)
        assert ask(f"http://127.0.0.1:{port}", prompts) == expected
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["running"] == 0
    finally:
        os.killpg(processes[0].pid, signal.SIGINT)  # Ctrl-C on process 0's host: every process ends
    for process in processes:
        process.wait(timeout=120)
        assert process.returncode == 0, process.stderr.read()[-3000:]
