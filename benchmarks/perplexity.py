"""Perplexity throughput: `llama_jax.perplexity` (what `evaluate --data` runs) beside transformers' forward
pass over the same windows, same weights, on this machine, in the same run.

    python benchmarks/perplexity.py [--seq-len 512] [--batch-size 8] [--repeats 3]

Random weights of the bench-cpu shape (19.3M parameters, a 32,000-word vocabulary), float32, given to
transformers through `to-hf`; the text is the bundled TinyShakespeare encoded with the tok512 tokenizer, as one
document cut into windows of --seq-len. transformers scores each batch of windows with
`model(input_ids).logits`, then the log-softmax of the targets (SDPA attention, no gradients); llama_jax with
its own evaluation path (flash attention, logits a chunk at a time). Each side keeps its best of --repeats
passes over all windows (llama_jax's first pass compiles; it is reported apart as cold).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=65_536, help="score this many tokens of the text")
    args = parser.parse_args()

    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from llama_jax import create_model, load, make_mesh, preset
    from llama_jax.convert import export_hf
    from llama_jax.evaluate.perplexity import perplexity, windows
    from llama_jax.model_dir import write_model_dir
    from llama_jax.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(REPO / "assets" / "tok512.bin")
    text = (REPO / "llama_jax" / "data" / "tinyshakespeare.txt").read_text()
    ids = tokenizer.encode(text, bos=True)[: args.max_tokens]
    config = preset("bench-cpu").replace(dtype="float32", param_dtype="float32", max_seq_len=args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        params = nnx.to_pure_dict(nnx.state(create_model(config, make_mesh())))
        model_dir = write_model_dir(Path(tmp) / "model", config, params, REPO / "assets" / "tok512.bin")
        hf_dir = export_hf(model_dir, Path(tmp) / "hf")
        loaded = load(model_dir, dtype="float32")
        ours = [perplexity(loaded, ids, args.seq_len, args.batch_size) for _ in range(args.repeats + 1)]
        reference = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    chunks = windows(ids, args.seq_len)
    theirs_seconds, theirs_nll, tokens = math.inf, 0.0, 0
    for _ in range(args.repeats):
        start, total, count = time.perf_counter(), 0.0, 0
        with torch.inference_mode():
            for first in range(0, len(chunks), args.batch_size):
                batch = chunks[first : first + args.batch_size]
                width = max(len(c) for c in batch)
                inputs = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros((len(batch), width - 1))
                for row, chunk in enumerate(batch):
                    inputs[row, : len(chunk)] = torch.from_numpy(np.asarray(chunk, np.int64))
                    mask[row, : len(chunk) - 1] = 1
                logprobs = torch.log_softmax(reference(inputs).logits[:, :-1].float(), -1)
                picked = logprobs.gather(-1, inputs[:, 1:, None])[..., 0]
                total -= float((picked * mask).sum())
                count += int(mask.sum())
        theirs_seconds = min(theirs_seconds, time.perf_counter() - start)
        theirs_nll, tokens = total / count, count

    warm = max(r["tokens_per_second"] for r in ours[1:])
    print(
        f"bench-cpu ({config.param_count() / 1e6:.1f}M params, float32), {tokens:,} tokens in windows of "
        f"{args.seq_len}, batch {args.batch_size}; transformers {transformers.__version__}, torch {torch.__version__}"
    )
    print("| path | tokens/s | perplexity |")
    print("|---|---|---|")
    cold = ours[0]
    print(f"| llama_jax, cold (its compile included) | {cold['tokens_per_second']:,.0f} | {cold['perplexity']:.4f} |")
    print(f"| llama_jax, warm | {warm:,.0f} | {ours[-1]['perplexity']:.4f} |")
    print(f"| transformers forward | {tokens / theirs_seconds:,.0f} | {math.exp(theirs_nll):.4f} |")
    print(f"llama_jax warm / transformers: {warm / (tokens / theirs_seconds):.2f}x")


if __name__ == "__main__":
    main()
