"""The server at its edge, as operators deploy it: an address it cannot listen on ends it at once with one error
line naming the address (never a "serving" line after minutes of compiling); HTTPS with uvicorn's own key and
certificate options, through the `openai` client trusting a self-signed certificate; 32 streams opened and
dropped leave nothing running; --request-timeout ends a request that runs too long with a clear error and frees
its slot."""

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time

import httpx
import pytest
from module_runner import REPO, free_port
from test_serve import start_server

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")


def serve(model_dir, *args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "llama_jax.serve", "--checkpoint", str(model_dir), *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
    )


def test_an_address_it_cannot_listen_on_ends_it_at_once_naming_the_address(stories_model):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        started = time.monotonic()
        result = serve(stories_model, "--port", port)
        seconds = time.monotonic() - started
    finally:
        taken.close()
    assert result.returncode == 2 and seconds < 30, (seconds, result.stderr)
    assert result.stderr.strip().splitlines()[-1] == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert "serving" not in result.stderr and "compiling" not in result.stderr and "Traceback" not in result.stderr
    result = serve(stories_model, "--host", "999.1.1.1", "--port", free_port())
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot listen on 999.1.1.1:")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a self-signed certificate")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", folder / "key.pem", "-out", folder / "cert.pem"],
        check=True,
        capture_output=True,
    )
    return folder


def test_https_with_a_self_signed_certificate_and_a_bad_pair_refused(stories_model, tls_files, tmp_path):
    key, cert = tls_files / "key.pem", tls_files / "cert.pem"
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    result = serve(stories_model, "--ssl-keyfile", key, "--ssl-certfile", tmp_path / "garbage.pem")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot use --ssl-certfile {tmp_path}/garbage.pem")
    args = ["--ssl-keyfile", key, "--ssl-certfile", cert, "--max-num-seqs", "4"]
    trust = ssl.create_default_context(cafile=str(cert))
    process, url = start_server(stories_model, *map(str, args), scheme="https", verify=trust)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", http_client=httpx.Client(verify=trust))
        text = client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=8, temperature=0)
        assert text.choices[0].text.startswith(", there was")
        client.close()
        with pytest.raises(httpx.ConnectError):  # no certificate trusted: refused
            httpx.get(f"{url}/health")
        asyncio.run(drop_streams(url, trust))
    finally:
        process.terminate()
        process.wait(timeout=30)


async def drop_streams(url: str, verify: ssl.SSLContext) -> None:
    """32 streams at once on 4 slots: once 4 run, every client goes away; nothing is left running or waiting."""

    def gauges() -> dict[str, float]:
        text = httpx.get(f"{url}/metrics", verify=verify).text
        return {
            line.split("{")[0]: float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting"))
        }

    async with httpx.AsyncClient(verify=verify, timeout=60) as http:
        body = {"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 400, "stream": True}
        streams = [http.stream("POST", f"{url}/v1/completions", json=body) for _ in range(32)]
        opened = await asyncio.gather(*(s.__aenter__() for s in streams))
        deadline = time.monotonic() + 30
        while gauges().get("vllm:num_requests_running", 0) < 4:
            assert time.monotonic() < deadline, gauges()
            await asyncio.sleep(0.05)
        for stream, response in zip(streams, opened):
            await stream.__aexit__(None, None, None)
            assert response.status_code == 200
    deadline = time.monotonic() + 5
    while gauges() != {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0}:
        assert time.monotonic() < deadline, gauges()
        time.sleep(0.05)


def test_a_request_past_its_time_is_ended_with_a_clear_error_and_frees_its_slot(stories_model):
    process, url = start_server(stories_model, "--max-num-seqs", "1", "--request-timeout", "0.5")
    try:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

        async def one(stream: bool):
            try:
                if not stream:
                    await client.completions.create(model="stories260K", prompt="Once", max_tokens=400, temperature=0)
                    return "done"
                async for _chunk in await client.completions.create(
                    model="stories260K", prompt="Once", max_tokens=400, temperature=0, stream=True
                ):
                    pass
                return "done"
            except openai.APIStatusError as e:
                return (e.status_code, e.message)
            except openai.APIError as e:  # the stream's error event
                return ("stream", e.message)

        async def burst():
            return await asyncio.gather(*(one(stream=i % 2 == 1) for i in range(6)))

        outcomes = asyncio.run(burst())
        timed_out = [o for o in outcomes if o != "done"]
        assert timed_out, outcomes
        for outcome in timed_out:
            assert "--request-timeout of 0.5 s" in outcome[1], outcome
        assert {o[0] for o in timed_out} <= {408, "stream"}
        health = httpx.get(f"{url}/health").json()
        assert health["running"] == 0 and health["waiting"] == 0
    finally:
        process.terminate()
        process.wait(timeout=30)
