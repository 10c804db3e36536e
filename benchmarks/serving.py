"""What the serving benchmarks share: random weights in a model directory (and their transformers copy), a
server process — llama_jax's, an earlier commit's, or `transformers serve` — and streaming clients driving it
through the async `openai` client, with what each stream saw.

    with server(llama_jax_command(model_dir, "--max-num-seqs", "16")) as url:
        load = asyncio.run(run_clients(url, model_dir.name, [[prompt] * 4] * 8, max_tokens=64))
    load.ttft_ms(), load.between_ms(), load.tokens_per_s()
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Meta's LLaMA 2 tokenizer is not bundled (its license): the folder LLAMA_JAX_META_TOKENIZERS names holds it
# (assets/README.md).
META_TOKENIZERS = Path(os.environ.get("LLAMA_JAX_META_TOKENIZERS", "."))
LLAMA2_TOKENIZER = META_TOKENIZERS / "llama2_tokenizer.model"
WORDS = "time story king river bird cloud light stone happy little run find garden window morning".split()


def random_model(out: Path, preset_name: str = "bench-cpu", tokenizer: Path = LLAMA2_TOKENIZER, **changes) -> Path:
    """A model directory of random weights of `preset_name` (with `changes`, e.g. max_seq_len=4096)."""
    from flax import nnx

    from llama_jax import create_model, preset
    from llama_jax.model_dir import write_model_dir

    if not Path(tokenizer).is_file():
        sys.exit(f"error: tokenizer not found: {tokenizer} (set LLAMA_JAX_META_TOKENIZERS, or pass --tokenizer)")
    config = dataclasses.replace(preset(preset_name), **changes)
    model = create_model(config)
    return write_model_dir(out, config, nnx.to_pure_dict(nnx.state(model)), tokenizer)


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))


def text_of_tokens(tokenizer, rng: np.random.Generator, tokens: int) -> str:
    """Random words whose encoding (no BOS) is `tokens` tokens long, or a few over (a word's pieces)."""
    text = ""
    while len(tokenizer.encode(text, bos=False)) < tokens:
        text += " " + words(rng, 8)
    return text.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Command:
    """How to start a server on a port: `argv(port)`, run in `cwd` with `env` added."""

    name: str
    args: list[str]
    cwd: Path = REPO
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    model: str = ""  # the model name requests carry

    def argv(self, port: int) -> list[str]:
        return [arg.replace("{port}", str(port)) for arg in self.args]


def llama_jax_command(model_dir: Path, *flags: str, tree: Path = REPO, name: str = "llama_jax") -> Command:
    """`python -m llama_jax.serve` of the package in `tree` (an earlier commit's worktree, or this one)."""
    args = [sys.executable, "-m", "llama_jax.serve", "--checkpoint", str(model_dir), "--port", "{port}", *flags]
    return Command(name, args, tree, {"PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu"}, model_dir.name)


def transformers_command(hf_dir: Path, *flags: str) -> Command:
    """`transformers serve` (transformers' OpenAI-compatible server) with `hf_dir` loaded for every request."""
    serve = Path(sys.executable).with_name("transformers")
    args = [str(serve), "serve", str(hf_dir), "--host", "127.0.0.1", "--port", "{port}", "--device", "cpu", *flags]
    return Command("transformers serve", args, REPO, {}, str(hf_dir))


@contextlib.contextmanager
def server(command: Command, timeout: float = 900) -> Iterator[str]:
    """The server running, once GET /health answers 200; its URL. Stopped on exit; its log shown if it fails."""
    import httpx

    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            command.argv(port),
            cwd=command.cwd,
            env={**os.environ, **command.env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        start = last_said = time.monotonic()
        try:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                if process.poll() is not None or time.monotonic() - start > timeout:
                    log.seek(0)
                    raise RuntimeError(f"{command.name} did not start:\n{log.read()[-3000:]}")
                if time.monotonic() - last_said > 15:
                    print(f"  waiting for {command.name} to start ({time.monotonic() - start:.0f} s)", file=sys.stderr)
                    last_said = time.monotonic()
                time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


@dataclasses.dataclass
class Stream:
    """One streamed completion: when it was sent, when each chunk of tokens came, how many tokens in all."""

    sent: float
    chunks: list[tuple[float, int]]  # (arrival time, tokens in the chunk)
    tokens: int
    extra_body: dict | None = None  # the request's fields beyond the common ones


@dataclasses.dataclass
class Load:
    streams: list[Stream]
    seconds: float
    health_ms: np.ndarray  # how long GET /health took, asked every 50 ms while the clients ran

    def ttft_ms(self) -> np.ndarray:
        return np.asarray([(s.chunks[0][0] - s.sent) * 1e3 for s in self.streams if s.chunks])

    def between_ms(self) -> np.ndarray:
        """The time between tokens: each gap between chunks of a stream over the tokens the later one brings."""
        return np.asarray(
            [
                (later - earlier) * 1e3 / n
                for s in self.streams
                for (earlier, _), (later, n) in zip(s.chunks, s.chunks[1:])
                if n
            ]
        )

    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.streams) / self.seconds

    def requests_per_s(self) -> float:
        return len(self.streams) / self.seconds


async def stream_completion(
    api, model: str, prompt: str, max_tokens: int, temperature: float, seed: int, extra_body: dict | None = None
) -> Stream:
    """Stream one completion (`extra_body`: more request fields, a response_format say). `logprobs: 0` makes
    llama_jax list each chunk's tokens (a chunk carries the tokens of one device call); transformers serve
    ignores it and sends one token per chunk."""
    sent = time.perf_counter()
    chunks: list[tuple[float, int]] = []
    tokens = 0
    stream = await api.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        stream=True,
        logprobs=0,
        stream_options={"include_usage": True},
        extra_body=extra_body,
    )
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        n = len(choice.logprobs.tokens) if choice.logprobs and choice.logprobs.tokens else int(bool(choice.text))
        if n:
            chunks.append((now, n))
    return Stream(sent, chunks, tokens or sum(n for _, n in chunks), extra_body)


async def run_clients(
    url: str,
    model: str,
    prompts: Sequence[Sequence[str]],
    max_tokens: int,
    temperature: float = 0.8,
    delay: float = 0.0,
    extra_body: Callable[[int, int], dict | None] | None = None,
) -> Load:
    """len(prompts) clients at once, client i sending prompts[i] one after another (after `delay` s each);
    `extra_body(i, j)`: more fields of client i's j-th request."""
    import httpx
    import openai

    streams: list[Stream] = []

    async def client(index: int, own: Sequence[str]) -> None:
        for j, prompt in enumerate(own):
            await asyncio.sleep(delay)
            extra = extra_body(index, j) if extra_body is not None else None
            streams.append(
                await stream_completion(api, model, prompt, max_tokens, temperature, index * 1000 + j, extra)
            )

    async def probe_health(http, waits: list[float]) -> None:
        while True:
            asked = time.perf_counter()
            await http.get(f"{url}/health")
            waits.append((time.perf_counter() - asked) * 1e3)
            await asyncio.sleep(0.05)

    health: list[float] = []
    async with (
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=1800) as api,
        httpx.AsyncClient(timeout=60) as http,
    ):
        probe = asyncio.create_task(probe_health(http, health))
        start = time.perf_counter()
        await asyncio.gather(*(client(i, own) for i, own in enumerate(prompts)))
        seconds = time.perf_counter() - start
        probe.cancel()
    return Load(streams, seconds, np.asarray(health))


def p(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")
