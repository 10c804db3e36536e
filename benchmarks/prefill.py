"""Prefill throughput: the engine's prefill of one prompt beside transformers' forward pass, same weights.

    python benchmarks/prefill.py                      # bench-cpu, prompts of 256, 1024 and 2048 tokens, float32
    python benchmarks/prefill.py --preset tinyllama-1.1b --dtype bfloat16 --lengths 1024 4096   # a GPU

Random weights of --preset, made by llama_jax and given to transformers through `to-hf`; prompts of random
ids; a warm-up first (compiles excluded):

  * llama_jax: what a request pays before its first token, `Engine.generate` of one request for one token
    (the prefix cache off): the prompt's first chunk (up to 256 tokens) through the model with the platform's
    flash attention (the blockwise XLA path on CPU, cuDNN on GPU, splash on TPU) into its slot, the rest chunk
    by chunk through the cache path, then the first token sampled;
  * llama_jax, one chunk: the same with the chunk as long as the prompt (`--prefill-chunk`), the whole prompt
    through flash attention in one call: what chunking costs;
  * transformers forward: `model(ids)`, logits at every position, SDPA attention;
  * transformers prefill: `model(ids, logits_to_keep=1, cache=DynamicCache())`, what its `generate` runs
    before the first token (logits of the last position only, the cache filled).

The four take turns, --repeats times, each keeping its best.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from same_weights import transformers_model  # noqa: E402

from llama_jax import LoadedModel, create_model, make_mesh, preset  # noqa: E402
from llama_jax.inference.engine import Engine  # noqa: E402
from llama_jax.inference.settings import EngineSettings  # noqa: E402
from llama_jax.inference.types import Request  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench-cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048], help="prompt tokens")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-torch", action="store_true")
    return parser.parse_args()


def best_times(functions: list, repeats: int) -> list[float]:
    """Each function's best time of `repeats` after a warm-up, the functions taking turns: a 2-core machine's
    speed drifts, and taking turns gives every side the same drift."""
    for fn in functions:
        fn()
    times = [[] for _ in functions]
    for _ in range(repeats):
        for fn, kept in zip(functions, times):
            start = time.perf_counter()
            fn()
            kept.append(time.perf_counter() - start)
    return [min(kept) for kept in times]


def engine_prefill(engine: Engine, prompt: list[int]):
    request = Request(tuple(prompt), 1)
    return lambda: engine.generate([request])


def torch_passes(model, prompt: list[int]) -> list:
    """transformers' plain forward, and its prefill as `generate` runs it."""
    import torch
    from transformers import DynamicCache

    ids = torch.as_tensor([prompt], device=model.device)

    def forward():
        with torch.inference_mode():
            model(ids)

    def prefill():
        with torch.inference_mode():
            model(ids, logits_to_keep=1, cache=DynamicCache(config=model.config))

    return [forward, prefill]


def main() -> None:
    args = parse_args()
    config = preset(args.preset)
    # Room for the longest prompt and its first token.
    config = config.replace(
        dtype=args.dtype, param_dtype=args.dtype, max_seq_len=max(config.max_seq_len, max(args.lengths) + 1)
    )
    mesh = make_mesh()
    loaded = LoadedModel(create_model(config, mesh), config, mesh)
    cache_len = max(args.lengths) + 1
    chunked = Engine(loaded, EngineSettings(max_num_seqs=1, max_model_len=cache_len, prefix_cache_tokens=0))
    whole_chunk = 1 << (max(args.lengths) - 1).bit_length()
    whole = Engine(
        loaded,
        EngineSettings(max_num_seqs=1, max_model_len=cache_len, prefill_chunk=whole_chunk, prefix_cache_tokens=0),
    )
    hf = None
    if not args.no_torch:
        with tempfile.TemporaryDirectory(prefix="llama_jax-prefill-") as scratch:
            hf = transformers_model(loaded, args.dtype, Path(scratch))
    rng = np.random.default_rng(0)
    print(
        f"{args.preset} ({config.param_count() / 1e6:.1f}M params, {args.dtype}), device "
        f"{jax.devices()[0].device_kind} x{len(jax.devices())}, best of {args.repeats}"
    )
    print(
        "| prompt tokens | llama_jax prefill ms | llama_jax tokens/s | one chunk ms | HF forward ms "
        "| HF prefill ms | vs HF forward | vs HF prefill |\n|---|---|---|---|---|---|---|---|"
    )
    for length in args.lengths:
        prompt = rng.integers(3, config.vocab_size, length).tolist()
        passes = [engine_prefill(chunked, prompt), engine_prefill(whole, prompt)]
        if hf is None:
            ours, one_chunk = best_times(passes, args.repeats)
            cells = [f"{ours * 1e3:.1f}", f"{length / ours:,.0f}", f"{one_chunk * 1e3:.1f}"] + ["-"] * 4
        else:
            ours, one_chunk, forward, prefill = best_times([*passes, *torch_passes(hf, prompt)], args.repeats)
            cells = [f"{ours * 1e3:.1f}", f"{length / ours:,.0f}", f"{one_chunk * 1e3:.1f}"]
            cells += [
                f"{forward * 1e3:.1f}",
                f"{prefill * 1e3:.1f}",
                f"{forward / ours:.2f}x",
                f"{prefill / ours:.2f}x",
            ]
        print(f"| {length} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
