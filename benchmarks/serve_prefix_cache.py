"""The prefix cache: many requests sharing a long system prompt, served with the cache on and off.

    python benchmarks/serve_prefix_cache.py                   # 1,000-token system prompt, 64 requests
    python benchmarks/serve_prefix_cache.py --clients 8 --requests 4

Random weights of --preset with the LLaMA 2 tokenizer. One system prompt of about --system-tokens tokens of
random words, then each request's own question of about --question-tokens tokens; --clients clients at once,
each sending --requests streaming completions one after another (--max-tokens new tokens, temperature 0.8),
through the async `openai` client. The same load against `python -m llama_jax.serve --max-num-seqs S` twice: with
`--prefix-cache-tokens 0` (off) and with the default cache. Reported: time to first token p50 / p99, tokens/s,
and the share of prompt tokens the cache served (its Prometheus counters).
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
    llama_jax_command,
    p,
    random_model,
    run_clients,
    server,
    text_of_tokens,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench-cpu")
    parser.add_argument("--tokenizer", default=str(LLAMA2_TOKENIZER))
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=16)
    return parser.parse_args()


def prefix_counters(url: str) -> tuple[float, float]:
    """(prompt tokens the cache served, prompt tokens it was asked for) so far."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        for sample in family.samples
    }
    return values["vllm:prefix_cache_hits_total"], values["vllm:prefix_cache_queries_total"]


def main() -> None:
    args = parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from llama_jax.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    rng = np.random.default_rng(0)
    system = text_of_tokens(tokenizer, rng, args.system_tokens)
    prompts = [
        [f"{system}\nQuestion: {text_of_tokens(tokenizer, rng, args.question_tokens)}" for _ in range(args.requests)]
        for _ in range(args.clients)
    ]
    lengths = [len(tokenizer.encode(q)) for own in prompts for q in own]
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = random_model(Path(scratch) / "model", args.preset, Path(args.tokenizer))
        for name, flags in (("off", ["--prefix-cache-tokens", "0"]), ("on", [])):
            command = llama_jax_command(model_dir, "--max-num-seqs", str(args.slots), "--max-queue", "1024", *flags)
            with server(command) as url:
                asyncio.run(run_clients(url, command.model, [["warm up"]], 4))
                load = asyncio.run(run_clients(url, command.model, prompts, args.max_tokens))
                hits, queries = prefix_counters(url) if name == "on" else (0.0, 1.0)
            rows[name] = (load, hits / max(queries, 1.0))
            print(f"  cache {name}: TTFT p50 {p(load.ttft_ms(), 50):.0f} ms", file=sys.stderr)

    print(
        f"{model_dir.name} ({args.preset}): a {len(tokenizer.encode(system, bos=False))}-token system prompt, "
        f"prompts of {min(lengths)}-{max(lengths)} tokens, {args.clients} clients × {args.requests} streaming "
        f"requests, {args.max_tokens} new tokens, {args.slots} slots"
    )
    print("| prefix cache | TTFT p50 ms | TTFT p99 ms | tokens/s | requests/s | prompt tokens from the cache |")
    print("|---|---|---|---|---|---|")
    for name, (load, share) in rows.items():
        ttft = load.ttft_ms()
        print(
            f"| {name} | {p(ttft, 50):.0f} | {p(ttft, 99):.0f} | {load.tokens_per_s():,.0f} "
            f"| {load.requests_per_s():.2f} | {share:.0%} |"
        )
    off, on = rows["off"][0], rows["on"][0]
    print(
        f"the cache: {p(off.ttft_ms(), 50) / p(on.ttft_ms(), 50):.2f}x lower TTFT p50, "
        f"{on.tokens_per_s() / off.tokens_per_s():.2f}x the tokens/s"
    )


if __name__ == "__main__":
    main()
