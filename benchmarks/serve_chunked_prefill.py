"""Chunked prefill: streams keep producing while long prompts arrive.

    python benchmarks/serve_chunked_prefill.py                # 16 streams, 2,048-token prompts arriving
    python benchmarks/serve_chunked_prefill.py --no-baseline  # this tree only

Random weights of --preset (its context raised to 4,096) with the LLaMA 2 tokenizer. --streams clients each
stream one completion of --stream-tokens tokens (short prompts, temperature 0.8) while --senders other clients
send prompts of --long-tokens random tokens one after another (each wanting 8 new tokens) until the streams
end. Reported for the streams: the time between tokens p50 / p99 (the gap between stream chunks over the
tokens a chunk brings), and for the long prompts their time to first token. Side by side:

  * the previous release (--baseline, 873d0ab: a prompt is prefilled whole in one call), in a git worktree;
  * this tree with --prefill-chunk as long as the prompt (one chunk: the same);
  * this tree with the default chunks of 256 tokens, prefilled between decode calls.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import checkout  # noqa: E402
from serving import (  # noqa: E402
    LLAMA2_TOKENIZER,
    Load,
    llama_jax_command,
    p,
    random_model,
    server,
    stream_completion,
    text_of_tokens,
    words,
)

BASELINE = "873d0ab"  # the previous release: prompts prefilled whole


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench-cpu")
    parser.add_argument("--tokenizer", default=str(LLAMA2_TOKENIZER))
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--stream-tokens", type=int, default=256)
    parser.add_argument("--senders", type=int, default=2, help="clients sending long prompts")
    parser.add_argument("--long-tokens", type=int, default=2048)
    parser.add_argument("--baseline", default=BASELINE, help=f"the earlier commit (default {BASELINE})")
    parser.add_argument("--no-baseline", action="store_true", help="skip the earlier commit")
    return parser.parse_args()


async def load(url: str, model: str, streams: list[str], long_prompts: list[str], args) -> tuple[Load, Load]:
    """The streams, and the long prompts sent meanwhile: what each saw."""
    import openai

    done = asyncio.Event()
    long_streams = []

    async def sender(index: int) -> None:
        for j in range(index, 10**6, args.senders):
            if done.is_set():
                return
            prompt = long_prompts[j % len(long_prompts)]
            long_streams.append(await stream_completion(api, model, prompt, 8, 0.8, seed=j))

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=1800) as api:
        start = time.perf_counter()
        senders = [asyncio.create_task(sender(i)) for i in range(args.senders)]
        await asyncio.sleep(0.5)  # the first long prompts are in before the streams start
        runs = [stream_completion(api, model, s, args.stream_tokens, 0.8, seed=i) for i, s in enumerate(streams)]
        got = await asyncio.gather(*runs)
        seconds = time.perf_counter() - start
        done.set()
        await asyncio.gather(*senders)
    empty = np.zeros(0)
    return Load(list(got), seconds, empty), Load(long_streams, seconds, empty)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from llama_jax.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    rng = np.random.default_rng(0)
    streams = [words(rng, 20) for _ in range(args.streams)]
    # Prompts of --long-tokens tokens (BOS included), distinct from their first chunk on: no cache hits.
    long_prompts = [text_of_tokens(tokenizer, rng, args.long_tokens - 1) for _ in range(16)]
    max_len = str(args.long_tokens + args.stream_tokens + 32)
    slots = str(args.streams + args.senders)
    flags = ["--max-num-seqs", slots, "--max-model-len", max_len, "--max-queue", "1024"]
    baseline_flags = ["--slots", slots, "--max-len", max_len, "--max-queue", "1024"]  # the names it knew
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = random_model(Path(scratch) / "model", args.preset, Path(args.tokenizer), max_seq_len=4096)

        def run(name, command):
            with server(command) as url:
                asyncio.run(load(url, command.model, streams[:2], long_prompts[:2], args))  # warm up
                results[name] = asyncio.run(load(url, command.model, streams, long_prompts, args))
            print(f"  {name}: between tokens p99 {p(results[name][0].between_ms(), 99):.1f} ms", file=sys.stderr)

        if not args.no_baseline:
            with checkout(args.baseline) as tree:
                run(f"{args.baseline} (whole prompts)", llama_jax_command(model_dir, *baseline_flags, tree=tree))
        one_chunk = ["--prefill-chunk", str(1 << (args.long_tokens - 1).bit_length())]
        run("one chunk per prompt", llama_jax_command(model_dir, *flags, *one_chunk))
        run("chunks of 256", llama_jax_command(model_dir, *flags))

    print(
        f"{model_dir.name} ({args.preset}): {args.streams} streams of {args.stream_tokens} tokens while "
        f"{args.senders} clients send {args.long_tokens}-token prompts one after another; {slots} slots"
    )
    print(
        "| server | between tokens p50 ms | between tokens p99 ms | p99 / p50 | streams done s "
        "| long prompts served | their TTFT p50 ms |\n|---|---|---|---|---|---|---|"
    )
    for name, (streamed, long) in results.items():
        between = streamed.between_ms()
        print(
            f"| {name} | {p(between, 50):.1f} | {p(between, 99):.1f} | {p(between, 99) / p(between, 50):.2f} "
            f"| {streamed.seconds:.1f} | {len(long.streams)} | {p(long.ttft_ms(), 50):.0f} |"
        )


if __name__ == "__main__":
    main()
