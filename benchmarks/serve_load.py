"""The OpenAI-compatible server under load, raced against `transformers serve` on the same weights.

    python benchmarks/serve_load.py                         # bench-cpu random weights, 1, 8 and 32 clients
    python benchmarks/serve_load.py --clients 8 --no-peer   # llama_jax only
    python benchmarks/serve_load.py --checkpoint DIR        # a model directory of your own

Random weights of --preset with the LLaMA 2 tokenizer (or --checkpoint), given to transformers through
`to-hf`. Each server in turn: `python -m llama_jax.serve --max-num-seqs S`, then `transformers serve DIR
--continuous-batching` (transformers' own server, its paged-attention continuous batching). For each client
count, that many clients at once through the async `openai` client, each sending --requests streaming
completions one after another (prompts of --prompt-words random words, --max-tokens new tokens, temperature
0.8). Reported: requests/s, generated tokens/s, time to first token p50 / p99, time between tokens p50 / p99
(the gap between stream chunks over the tokens a chunk brings: llama_jax sends up to 8 per device call,
transformers one), and how long GET /health took meanwhile (p99). Each server gets one warm-up request first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import (  # noqa: E402
    LLAMA2_TOKENIZER,
    Load,
    llama_jax_command,
    p,
    random_model,
    run_clients,
    server,
    transformers_command,
    words,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a model directory (default: random weights of --preset)")
    parser.add_argument("--preset", default="bench-cpu")
    parser.add_argument("--tokenizer", default=str(LLAMA2_TOKENIZER))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--prompt-words", type=int, default=60)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=32, help="llama_jax's decode slots")
    parser.add_argument("--no-peer", action="store_true", help="skip transformers serve")
    return parser.parse_args()


def race(command, clients: list[int], args) -> dict[int, Load]:
    rng = np.random.default_rng(0)
    loads = {}
    with server(command) as url:
        asyncio.run(run_clients(url, command.model, [["warm up"]], 4))
        for n in clients:  # the same prompts for every server
            prompts = [[words(rng, args.prompt_words) for _ in range(args.requests)] for _ in range(n)]
            loads[n] = asyncio.run(run_clients(url, command.model, prompts, args.max_tokens))
            print(f"  {command.name}, {n} clients: {loads[n].tokens_per_s():,.0f} tokens/s", file=sys.stderr)
    return loads


def main() -> None:
    args = parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with tempfile.TemporaryDirectory() as scratch:
        if args.checkpoint:
            model_dir = Path(args.checkpoint)
        else:
            model_dir = random_model(Path(scratch) / "model", args.preset, Path(args.tokenizer))
        commands = [llama_jax_command(model_dir, "--max-num-seqs", str(args.slots), "--max-queue", "1024")]
        if not args.no_peer:
            from llama_jax.convert import export_hf

            hf_dir = Path(scratch) / "hf"
            export_hf(model_dir, hf_dir)
            commands.append(transformers_command(hf_dir, "--continuous-batching"))
        results = {command.name: race(command, args.clients, args) for command in commands}

    print(
        f"{model_dir.name}: prompts of {args.prompt_words} words, {args.max_tokens} new tokens, "
        f"{args.requests} streaming requests per client; llama_jax with {args.slots} slots"
    )
    print(
        "| server | clients | requests/s | tokens/s | TTFT p50 ms | TTFT p99 ms | between tokens p50 ms "
        "| between tokens p99 ms | /health p99 ms |\n|---|---|---|---|---|---|---|---|---|"
    )
    for name, loads in results.items():
        for n, load in loads.items():
            ttft, between = load.ttft_ms(), load.between_ms()
            print(
                f"| {name} | {n} | {load.requests_per_s():.2f} | {load.tokens_per_s():,.0f} | {p(ttft, 50):.0f} "
                f"| {p(ttft, 99):.0f} | {p(between, 50):.1f} | {p(between, 99):.1f} | {p(load.health_ms, 99):.0f} |"
            )
    if "transformers serve" in results:
        ours, peer = results["llama_jax"], results["transformers serve"]
        for n in args.clients:
            print(
                f"{n} clients: llama_jax {ours[n].tokens_per_s() / peer[n].tokens_per_s():.2f}x the tokens/s of "
                f"transformers serve; TTFT p99 {p(ours[n].ttft_ms(), 99):.0f} ms vs {p(peer[n].ttft_ms(), 99):.0f} ms"
            )


if __name__ == "__main__":
    main()
