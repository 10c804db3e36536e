"""The OpenAI-compatible server, driven by the real `openai` client: the real stories260K weights, completions
and chat, streamed or not, equal to infer.py's greedy output; log-probabilities equal the model's; 32
concurrent streams each get exactly their solo output; a disconnect frees its slot; bad input gets its status
and an OpenAI error body while the server goes on serving."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from module_runner import REPO

import llama_jax
from llama_jax.convert import convert_llama2c
from llama_jax.model_dir import CONFIG_FILE

openai = pytest.importorskip("openai")
KEY = "test-key"
MODEL = "stories"
PROMPTS = ["Once upon a time", "Lily had a big", "The sun was", "Tom and his dog", "One day, a cat", "Sue"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, assets):
    """stories260K with the llama2 chat template recorded, so that chat completions have a format."""
    out = convert_llama2c(assets / "stories260K.bin", assets / "tok512.bin", tmp_path_factory.mktemp("serve") / MODEL)
    config = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps({**config, "chat_template": "llama2"}))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, *args):
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_jax.serve", "--checkpoint", str(model_dir), "--port", str(port), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise TimeoutError("the server did not start")


@pytest.fixture(scope="module")
def server(model_dir):
    process, url = start_server(model_dir, "--slots", "4", "--api-key", KEY)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def infer_greedy(model_dir, tmp_path_factory):
    """infer.py's greedy completions of PROMPTS, 40 new tokens each."""
    out = tmp_path_factory.mktemp("infer") / "out.jsonl"
    args = ["--checkpoint", str(model_dir), "--temperature", "0", "--max-new-tokens", "40", "--output", str(out)]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    result = subprocess.run(
        [sys.executable, "infer.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_completions_equal_infer_streamed_or_not(client, infer_greedy):
    for prompt, expected in zip(PROMPTS, infer_greedy):
        whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
        assert whole.choices[0].text == expected["completion"]
        assert whole.choices[0].finish_reason == expected["finish_reason"]
        assert whole.usage.completion_tokens == len(expected["token_ids"])
        streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in streamed) == expected["completion"]
    several = client.completions.create(model=MODEL, prompt=PROMPTS[:3], max_tokens=40, temperature=0)
    assert [c.text for c in sorted(several.choices, key=lambda c: c.index)] == [
        r["completion"] for r in infer_greedy[:3]
    ]


def test_chat_uses_the_checkpoint_template(client, model_dir):
    loaded = llama_jax.load(model_dir)
    expected = llama_jax.generate(loaded, ["What is a cat?"], chat=True, max_new_tokens=24, temperature=0)[0]
    messages = [{"role": "user", "content": "What is a cat?"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    assert whole.choices[0].message.content == expected.text
    streamed = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_logprobs_are_the_models(client, model_dir):
    loaded = llama_jax.load(model_dir)
    prompt_ids = loaded.tokenizer.encode("Once upon a time", bos=True)
    answer = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0.8, seed=3, logprobs=0
    )
    generated = loaded.tokenizer.encode("Once upon a time" + answer.choices[0].text, bos=True)[len(prompt_ids) :]
    logits, _ = loaded.model(jnp.asarray([prompt_ids + generated], jnp.int32))
    log_probs = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32)))
    expected = [log_probs[len(prompt_ids) - 1 + i, t] for i, t in enumerate(generated)]
    np.testing.assert_allclose(answer.choices[0].logprobs.token_logprobs, expected, rtol=1e-4, atol=1e-5)


def test_32_concurrent_streams_each_get_their_solo_output(server, client):
    requests = [
        dict(
            prompt=PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)),
            max_tokens=8 + (i * 7) % 40,
            temperature=0.9 if i % 2 else 0,
            seed=i,
            top_p=0.9,
        )
        for i in range(32)
    ]
    solo = [client.completions.create(model=MODEL, **r).choices[0].text for r in requests]

    async def stream(async_client, request):
        pieces = [
            chunk.choices[0].text
            async for chunk in await async_client.completions.create(model=MODEL, stream=True, **request)
        ]
        return "".join(pieces)

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0) as async_client:
            return await asyncio.gather(*(stream(async_client, r) for r in requests))

    assert asyncio.run(all_at_once()) == solo


def test_bad_requests_get_400_and_an_openai_error_body(server, client):
    headers = {"authorization": f"Bearer {KEY}"}
    cases = {
        "malformed JSON": (b'{"model": "stories", "prompt": ', "not valid JSON"),
        "NaN temperature": (b'{"model": "stories", "prompt": "x", "temperature": NaN}', "temperature"),
        "wrong type": (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": "ten"}).encode(), "max_tokens"),
        "unknown model": (json.dumps({"model": "gpt-9", "prompt": "x"}).encode(), "is not served here"),
        "negative top_p": (json.dumps({"model": MODEL, "prompt": "x", "top_p": -0.5}).encode(), "top_p"),
        "n of 2": (json.dumps({"model": MODEL, "prompt": "x", "n": 2}).encode(), "n"),
        "too many prompts": (json.dumps({"model": MODEL, "prompt": ["x"] * 17}).encode(), "prompt"),
        "prompt too long": (json.dumps({"model": MODEL, "prompt": "story " * 600}).encode(), "positions"),
        "max_tokens past the context": (
            json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 600}).encode(),
            "positions",
        ),
    }
    for name, (body, message) in cases.items():
        response = httpx.post(
            f"{server}/v1/completions", content=body, headers={**headers, "content-type": "application/json"}
        )
        assert response.status_code == 400, (name, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and message in error["message"], (name, error)
    chat = httpx.post(
        f"{server}/v1/chat/completions",
        headers=headers,
        json={"model": MODEL, "messages": [{"role": "assistant", "content": "hi"}]},
    )
    assert chat.status_code == 400 and "roles" in chat.json()["error"]["message"]
    assert httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 401
    big = httpx.post(f"{server}/v1/completions", headers=headers, content=b"x" * (2 << 20))
    assert big.status_code == 413 and "error" in big.json()
    # still serving
    assert client.completions.create(model=MODEL, prompt="Tom", max_tokens=3, temperature=0).choices[0].text


def test_the_server_compiles_every_program_before_it_reports_healthy(model_dir):
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "llama_jax.serve", "--checkpoint", str(model_dir), "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--slots", "2", "--max-len", "100"],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        starting, early = [], None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1][-3000:]
            try:
                health = httpx.get(f"{url}/health")
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            if health.status_code == 200:
                break
            starting.append(health.json())
            if early is None:
                early = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Tom", "max_tokens": 2})
        assert starting and all(h["status"] == "starting" for h in starting)  # 503 while compiling
        assert early.status_code == 503 and "starting" in early.json()["error"]["message"]
        ready = health.json()
        assert ready["status"] == "ok" and ready["compiled"] == ready["programs"] > 0
        for prompt, tokens in (("Tom", 3), ("Once upon a time there was a girl named Lily. " * 3, 20)):
            body = {"model": MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0}
            assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        assert httpx.get(f"{url}/health").json()["compiled"] == ready["programs"]  # requests compiled nothing
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_disconnect_frees_the_slot_and_a_full_queue_answers_429(model_dir):
    process, url = start_server(model_dir, "--slots", "1", "--max-queue", "1")
    try:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 450, "temperature": 0.8, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for _ in response.iter_lines():
                break  # the first chunk, then hang up
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{url}/health").json()["running"] == 0  # freed long before 450 tokens

        async def burst():
            async with httpx.AsyncClient(timeout=60) as http:
                calls = [
                    http.post(f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 200})
                    for _ in range(6)
                ]
                return await asyncio.gather(*calls)

        statuses = sorted(r.status_code for r in asyncio.run(burst()))
        # One slot and one queue place: at most two of the six are taken (one when all arrive before the
        # engine admits the first), the rest answered 429 at once.
        assert 1 <= statuses.count(200) <= 2 and statuses.count(429) == 6 - statuses.count(200), statuses
    finally:
        process.terminate()
        process.wait(timeout=30)
