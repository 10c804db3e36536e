"""Where a scoring forward's time goes on a tiny model: stories260K (dim 64, 8 heads of width 8, 5 layers),
llama_jax's scoring forward beside transformers' (SDPA), each whole and with its attention replaced by a
no-op, on the same weights, same rows, in one run.

    python benchmarks/scoring_profile.py [--rows 16] [--length 160]

The default shape is a batch of `benchmarks/harness.py`'s story_choice requests (contexts of 21-370 tokens,
160 on average). The no-op keeps every projection, norm, MLP and the output layer, so `whole - no-op` is
what attention costs on each side; the table says how much of each forward that is. This is the profile
behind the stories260K row of the harness table: the rest of the model is faster in llama_jax than in
transformers, attention over 8-wide heads is not.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def best_ms(call, repeats: int = 5, inner: int = 10) -> float:
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            call()
        best = min(best, (time.perf_counter() - start) / inner)
    return best * 1e3


def llama_jax_forward(model_dir: Path, ids, implementation: str | None):
    """ms of the scoring forward (hidden states + final norm, as `continuation_logprobs` runs it before the
    output layer), with `implementation`'s attention or, for None, attention replaced by its query."""
    import jax

    import llama_jax.model as model_module
    from llama_jax import load

    model = load(model_dir, dtype="float32").model
    original = model_module.attention
    if implementation is None:
        model_module.attention = lambda q, k, v, implementation, segment_ids=None: q
    try:
        forward = jax.jit(lambda ids: model.hidden_states(ids, differentiable=False)[0])
        forward(ids).block_until_ready()
    finally:
        model_module.attention = original
    return best_ms(lambda: forward(ids).block_until_ready())


def transformers_forward(hf_dir: Path, ids, no_op: bool):
    import torch
    from transformers import AttentionInterface, AutoModelForCausalLM

    def query_only(module, query, key, value, attention_mask, **kwargs):
        return query.transpose(1, 2).contiguous(), None

    AttentionInterface.register("query_only", query_only)
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="query_only" if no_op else "sdpa"
    ).eval()
    tokens = torch.from_numpy(ids)

    def call():
        with torch.no_grad():
            model.model(input_ids=tokens)

    return best_ms(call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--length", type=int, default=160)
    args = parser.parse_args()
    import jax
    import numpy as np
    import torch

    from llama_jax.convert import convert_llama2c, export_hf

    ids = np.random.default_rng(0).integers(3, 512, (args.rows, args.length), dtype=np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = convert_llama2c(
            REPO / "assets" / "stories260K.bin", REPO / "assets" / "tok512.bin", Path(tmp) / "s"
        )
        hf_dir = export_hf(model_dir, Path(tmp) / "s-hf")
        ours = {
            name: llama_jax_forward(model_dir, ids, impl) for name, impl in (("flash", "blockwise"), ("xla", "xla"))
        }
        ours_rest = llama_jax_forward(model_dir, ids, None)
        theirs = transformers_forward(hf_dir, ids.astype(np.int64), no_op=False)
        theirs_rest = transformers_forward(hf_dir, ids.astype(np.int64), no_op=True)
    print(
        f"stories260K, {args.rows} rows x {args.length} tokens, float32; jax {jax.__version__}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores"
    )
    print("| forward | whole ms | attention no-op ms | attention ms | attention share |")
    print("|---|---|---|---|---|")
    for name, whole, rest in [
        *((f"llama_jax ({name} attention)", ms, ours_rest) for name, ms in ours.items()),
        ("transformers (SDPA)", theirs, theirs_rest),
    ]:
        print(f"| {name} | {whole:.1f} | {rest:.1f} | {whole - rest:.1f} | {(whole - rest) / whole:.0%} |")


if __name__ == "__main__":
    main()
