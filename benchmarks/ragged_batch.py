"""A ragged batch job: the engine beside transformers' continuous batching, static batches and the engine of
the previous release.

    python benchmarks/ragged_batch.py                 # 256 prompts of 16-512 tokens, completions of 8-256
    python benchmarks/ragged_batch.py --prompts 64    # quicker

Random weights of the --preset shape (default: bench-cpu, the CPU-sized benchmark model), made by llama_jax
and given to transformers through `to-hf`, float32, greedy, no stop ids: prompt i wants exactly wanted[i]
new tokens, drawn uniformly from 8-256 (as completions ending at their EOS would), its prompt uniformly from
16-512 random ids. Useful tokens/s = Σ wanted / wall time (prefill included), after a warm-up job for the
paths that compile: for the engine, other prompts of lengths drawn alike (the same prompts would find their
first chunks in its prefix cache); for the earlier commit's paths, the same job (its copy of this script; it
has no prefix cache). The transformers paths run once. Side by side in one run:

  * llama_jax engine: `Engine.generate` with --batch decode slots, each refilled as its request ends;
  * transformers continuous batching: `model.continuous_batching_context_manager` (what `generate_batch` runs:
    paged attention, requests admitted as others finish), each request with its own max_new_tokens;
  * transformers `generate` on static batches of --batch prompts, left-padded, each run to its longest;
  * the engine and the static batches (prefill and a decode loop in one jit per batch of --batch prompts) of
    the previous release, --baseline (a38b2de), running its own copy of this job in a temporary git worktree.
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
from baseline import number, run_at, table_rows  # noqa: E402
from same_weights import transformers_model  # noqa: E402

from llama_jax import LoadedModel, create_model, make_mesh, preset  # noqa: E402
from llama_jax.inference.engine import Engine  # noqa: E402
from llama_jax.inference.settings import EngineSettings  # noqa: E402
from llama_jax.inference.types import Request  # noqa: E402

BASELINE = "a38b2de"  # the previous release: the last with the static-batch generator


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench-cpu")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="decode slots / static batch size")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers paths")
    parser.add_argument("--baseline", default=BASELINE, help=f"the earlier commit to compare with (default {BASELINE})")
    parser.add_argument("--no-baseline", action="store_true", help="skip the earlier commit")
    parser.add_argument("--max-new", type=int, default=256, help="cap the completions (smoke runs; drawn as before)")
    return parser.parse_args()


def job(config, n: int, seed: int = 0):
    """The prompts and wanted lengths; the earlier commit's copy of this benchmark draws the same ones."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, config.vocab_size, rng.integers(16, 513)).tolist() for _ in range(n)]
    return prompts, rng.integers(8, 257, n).tolist()


def engine_job(engine: Engine, prompts, wanted) -> None:
    results = engine.generate([Request(tuple(p), w, stream=i) for i, (p, w) in enumerate(zip(prompts, wanted))])
    assert [len(r.token_ids) for r in results] == wanted


def torch_continuous_batching(model, prompts, wanted, slots: int, **pool) -> None:
    """transformers' continuous batching, as `generate_batch` drives it, with a token budget per request; `pool`:
    more ContinuousBatchingConfig settings (the KV pool's page_size and num_blocks)."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(max_new_tokens=max(wanted), do_sample=False, eos_token_id=None, pad_token_id=0)
    same_concurrency = ContinuousBatchingConfig(max_requests_per_batch=slots, **pool)
    context = model.continuous_batching_context_manager(
        generation_config=config, continuous_batching_config=same_concurrency, block=True, timeout=5
    )
    with torch.inference_mode(), context as manager:
        ids = [manager.add_request(p, max_new_tokens=w) for p, w in zip(prompts, wanted)]
        done = {}
        while len(done) < len(ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                done[result.request_id] = result
    assert [len(done[i].generated_tokens) for i in ids] == wanted


def torch_static_batches(model, prompts, wanted, batch: int) -> None:
    import torch

    for start in range(0, len(prompts), batch):
        rows = prompts[start : start + batch]
        width = max(map(len, rows))
        ids = torch.zeros((len(rows), width), dtype=torch.long, device=model.device)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):  # left padding
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        new = max(wanted[start : start + batch])
        with torch.inference_mode():
            model.generate(
                ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
            )


def timed(fn, warm_up: bool = True) -> float:
    if warm_up:  # compile every shape the job uses
        fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def earlier_rows(args) -> list[tuple[str, float]]:
    """(path, seconds) of the earlier commit's engine and static batches on the same job."""
    command = [
        "--preset",
        args.preset,
        "--prompts",
        str(args.prompts),
        "--batch",
        str(args.batch),
        "--dtype",
        args.dtype,
        "--no-torch",
    ]
    rows = table_rows(run_at(args.baseline, "benchmarks/ragged_batch.py", command))
    return [(f"{row[0]} at {args.baseline}", number(row[1])) for row in rows if row[0].startswith("llama_jax")]


def main() -> None:
    args = parse_args()
    config = preset(args.preset).replace(dtype=args.dtype, param_dtype=args.dtype)
    mesh = make_mesh()
    loaded = LoadedModel(create_model(config, mesh), config, mesh)
    prompts, wanted = job(config, args.prompts)
    wanted = [min(w, args.max_new) for w in wanted]
    useful = sum(wanted)
    print(
        f"{args.preset} ({config.param_count() / 1e6:.1f}M params, {args.dtype}), {args.prompts} prompts of "
        f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, completions of {min(wanted)}-{max(wanted)} "
        f"({useful:,} tokens), batch/slots {args.batch}, device {jax.devices()[0].device_kind}",
        flush=True,
    )
    engine = Engine(loaded, EngineSettings(max_num_seqs=args.batch, max_model_len=512 + 256))
    warm_prompts, _ = job(config, args.prompts, seed=1)  # lengths drawn alike: every program gets compiled
    engine_job(engine, warm_prompts, wanted)
    rows = [("llama_jax engine (continuous batching)", timed(lambda: engine_job(engine, prompts, wanted), False))]
    if not args.no_torch:
        import transformers

        with tempfile.TemporaryDirectory(prefix="llama_jax-ragged-") as scratch:
            model = transformers_model(loaded, args.dtype, Path(scratch))
        version = transformers.__version__
        cb = timed(lambda: torch_continuous_batching(model, prompts, wanted, args.batch), warm_up=False)
        rows.append((f"transformers {version} continuous batching", cb))
        static = timed(lambda: torch_static_batches(model, prompts, wanted, args.batch), warm_up=False)
        rows.append((f"transformers {version} generate (static batches)", static))
    if not args.no_baseline:
        rows += earlier_rows(args)
    print("| path | seconds | useful tokens/s | engine speed-up |\n|---|---|---|---|")
    for name, seconds in rows:
        rate = useful / seconds  # below 10, three figures: a smoke run's few tokens must not print as 0
        shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.3g}"
        print(f"| {name} | {seconds:.1f} | {shown} | {seconds / rows[0][1]:.2f}x |")


if __name__ == "__main__":
    main()
