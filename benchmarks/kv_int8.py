"""What an int8 KV cache costs in perplexity: a document scored through the KV cache — each chunk of tokens
attends to the keys and values of everything before it as the cache holds them — with the cache in the model's
dtype and in int8 (`--kv-cache-dtype int8`: a float32 scale per position and head), side by side.

    python benchmarks/kv_int8.py --checkpoint models/stories260K --data assets/tinystories_sample.txt
    python benchmarks/kv_int8.py --checkpoint runs/default --data tinyshakespeare.txt    # the default job's model

The document (BOS first) is cut into windows of --window tokens, each scored --chunk tokens at a time through
one cache; the table gives the perplexity both ways and the change. A cache in the model's dtype gives the
perplexity of the full forward pass (`python -m llama_jax.evaluate`) to float rounding.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import llama_jax  # noqa: E402
from llama_jax.kv_cache import KVCache  # noqa: E402
from llama_jax.train.sources import data_files  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a model directory or training run")
    parser.add_argument("--data", required=True, help="a text file (or a bundled corpus by name)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=40_000, help="score the document's first N tokens")
    return parser.parse_args()


def score(loaded, ids: np.ndarray, window: int, chunk: int, kv_dtype) -> tuple[float, int]:
    """(total NLL, tokens scored) of `ids` in windows of `window`, `chunk` tokens per call through the cache."""
    graphdef, state = nnx.split(loaded.model)

    @jax.jit
    def step(state, cache, tokens, targets):
        logits, cache = nnx.merge(graphdef, state)(tokens, cache=cache)
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return cache, -jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]

    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        piece = ids[start : start + window + 1]
        cache = KVCache.zeros(loaded.config, 1, window, kv_dtype)
        usable = (len(piece) - 1) // chunk * chunk  # whole chunks only: one compiled shape
        for first in range(0, usable, chunk):
            tokens, targets = piece[first : first + chunk], piece[first + 1 : first + chunk + 1]
            cache, nll = step(state, cache, jnp.asarray(tokens[None]), jnp.asarray(targets[None]))
            total += float(np.sum(nll))
            count += chunk
    return total, count


def main() -> None:
    args = parse_args()
    loaded = llama_jax.load(args.checkpoint, dtype="float32")
    text = data_files(args.data)[0].read_text(encoding="utf-8")
    ids = np.asarray(loaded.tokenizer.encode(text, bos=True)[: args.max_tokens], np.int32)
    results = {
        name: score(loaded, ids, args.window, args.chunk, dtype)
        for name, dtype in (("float32", None), ("int8", "int8"))
    }
    base = math.exp(results["float32"][0] / results["float32"][1])
    print(
        f"{Path(args.checkpoint).name} on {Path(args.data).name}: {results['float32'][1]:,} tokens in windows of "
        f"{args.window}, {args.chunk} at a time through the KV cache; {jax.devices()[0].device_kind}"
    )
    print(f"| KV cache | bytes per position and head (head_dim {loaded.config.head_dim}) | perplexity | change |")
    print("|---|---|---|---|")
    for name, (nll, count) in results.items():
        perplexity = math.exp(nll / count)
        size = loaded.config.head_dim * (4 if name == "float32" else 1) + (4 if name == "int8" else 0)
        print(f"| {name} | {size} | {perplexity:.4f} | {100 * (perplexity / base - 1):+.3f} % |")


if __name__ == "__main__":
    main()
