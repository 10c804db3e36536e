"""The OpenAI-compatible server under load: concurrent streaming clients, latency and throughput.

    python benchmarks/serve_load.py                        # bench-cpu random weights, 1, 8 and 32 clients
    python benchmarks/serve_load.py --checkpoint DIR --clients 1 8 32 64

Starts `python -m llama_jax.serve` on a free port (random weights of --preset with the LLaMA 2 tokenizer,
unless --checkpoint names a model directory), then for each client count runs that many clients at once
through the async `openai` client, each sending --requests streaming completions one after another (prompts
of --prompt-words random words, --max-tokens new tokens, temperature 0.8). Reported: completed requests/s,
generated tokens/s, and p50/p99 of the time to first token and of the time between tokens (the gap between
stream chunks divided by the tokens in the chunk: the engine hands out 8 tokens per device call).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Meta's LLaMA 2 tokenizer is not bundled (its license): the folder LLAMA_JAX_META_TOKENIZERS names holds it
# (assets/README.md); --tokenizer names another.
META_TOKENIZERS = Path(os.environ.get("LLAMA_JAX_META_TOKENIZERS", "."))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a model directory (default: random weights of --preset)")
    parser.add_argument("--preset", default="bench-cpu")
    parser.add_argument("--tokenizer", default=str(META_TOKENIZERS / "llama2_tokenizer.model"))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--prompt-words", type=int, default=60)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=16)
    return parser.parse_args()


def random_model(preset_name: str, tokenizer: str, out: Path) -> Path:
    from flax import nnx

    from llama_jax import create_model, preset
    from llama_jax.model_dir import write_model_dir

    config = preset(preset_name)
    model = create_model(config)
    return write_model_dir(out, config, nnx.to_pure_dict(nnx.state(model)), tokenizer)


def start_server(model_dir: Path, slots: int) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_jax.serve",
            "--checkpoint",
            str(model_dir),
            "--port",
            str(port),
            "--slots",
            str(slots),
            "--max-queue",
            "1024",
        ],
        cwd=REPO,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            if process.poll() is not None:
                raise RuntimeError("the server did not start") from None
            time.sleep(0.2)


async def client(api, model: str, prompts: list[str], max_tokens: int, stats: dict) -> None:
    for prompt in prompts:
        start = last = time.perf_counter()
        first = None
        stream = await api.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.8, stream=True, logprobs=0
        )  # logprobs: each chunk lists its tokens
        async for chunk in stream:
            now = time.perf_counter()
            tokens = len(chunk.choices[0].logprobs.tokens) if chunk.choices and chunk.choices[0].logprobs else 0
            if not tokens:
                continue
            stats["tokens"] += tokens
            if first is None:
                first = now
                stats["first"].append(first - start)
            else:
                stats["between"].append((now - last) / tokens)
            last = now
        stats["done"] += 1


async def load(url: str, model: str, clients: int, args) -> dict:
    import openai

    rng = np.random.default_rng(clients)
    words = "time story king river bird cloud light stone happy little run find".split()
    stats = {"first": [], "between": [], "done": 0, "tokens": 0}
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600) as api:
        start = time.perf_counter()
        await asyncio.gather(
            *(
                client(
                    api,
                    model,
                    [" ".join(rng.choice(words, args.prompt_words)) for _ in range(args.requests)],
                    args.max_tokens,
                    stats,
                )
                for _ in range(clients)
            )
        )
        stats["seconds"] = time.perf_counter() - start
    return stats


def main() -> None:
    args = parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = (
            Path(args.checkpoint)
            if args.checkpoint
            else random_model(args.preset, args.tokenizer, Path(scratch) / "model")
        )
        process, url = start_server(model_dir, args.slots)
        try:
            asyncio.run(load(url, model_dir.name, 1, argparse.Namespace(**{**vars(args), "requests": 1})))  # compile
            print(
                f"{model_dir.name}: {args.slots} slots, prompts of {args.prompt_words} words, "
                f"{args.max_tokens} new tokens, {args.requests} requests per client"
            )
            print(
                "| clients | requests/s | tokens/s | TTFT p50 ms | TTFT p99 ms | between tokens p50 ms "
                "| between tokens p99 ms |\n|---|---|---|---|---|---|---|"
            )
            for clients in args.clients:
                s = asyncio.run(load(url, model_dir.name, clients, args))
                first, between = np.asarray(s["first"]) * 1e3, np.asarray(s["between"]) * 1e3
                print(
                    f"| {clients} | {s['done'] / s['seconds']:.2f} | {s['tokens'] / s['seconds']:,.0f} "
                    f"| {np.percentile(first, 50):.0f} | {np.percentile(first, 99):.0f} "
                    f"| {np.percentile(between, 50):.1f} | {np.percentile(between, 99):.1f} |",
                    flush=True,
                )
        finally:
            process.terminate()
            process.wait()


if __name__ == "__main__":
    main()
