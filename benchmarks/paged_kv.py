"""Paged KV cache at equal memory: the engine's page pool beside the fixed slots of the previous release and
transformers' paged continuous batching, each given the KV bytes of --fixed-slots (16) slots of 2,048 positions.

    python benchmarks/paged_kv.py                     # 128 requests, paged at 16 and 64 live sequences
    python benchmarks/paged_kv.py --fixed-slots 4 --seqs 4 16    # the memory of 4 slots
    python benchmarks/paged_kv.py --requests 32 --no-torch --no-baseline   # a quick look

Random weights of the --preset shape (default bench-cpu), float32, greedy, no stop ids: request i wants
exactly wanted[i] new tokens. Lengths are long-tailed, as a chat server's are: prompts log-normal with a
median of 128 tokens (σ = 1), clipped to 16-1,024; completions log-normal with a median of 96 (σ = 0.9),
clipped to 16-512 — most requests short, a few long ones that fixed slots must still reserve room for.
Useful tokens/s = Σ wanted / wall time (prefill included), timed after a warm-up job of the same lengths
and other prompt ids (so the timed job finds nothing in the prefix cache). Side by side in one run:

  * llama_jax paged: `Engine.generate`, --kv-cache-tokens --fixed-slots × 2,048 and --max-num-seqs of --seqs;
    live = the sequences holding pages when a request ends (peak and mean), preemptions counted;
  * fixed slots: the engine of --baseline (1d94a88, the last release before pages) with --fixed-slots slots of
    2,048 positions, in a temporary git worktree;
  * transformers continuous batching: `continuous_batching_context_manager` (what `generate_batch` runs)
    with blocks of 256 positions (the same memory) and up to the largest --seqs requests per batch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from baseline import checkout  # noqa: E402
from ragged_batch import torch_continuous_batching  # noqa: E402
from same_weights import transformers_model  # noqa: E402

from llama_jax import LoadedModel, create_model, make_mesh, preset  # noqa: E402
from llama_jax.inference.engine import Engine  # noqa: E402
from llama_jax.inference.settings import EngineSettings  # noqa: E402
from llama_jax.inference.types import Request  # noqa: E402

BASELINE = "1d94a88"  # the last commit with fixed decode slots
CONTEXT = 2048  # positions of a fixed slot: the memory every path gets is --fixed-slots of them


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench-cpu")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--fixed-slots", type=int, default=16, help="the KV memory: this many slots of 2,048")
    parser.add_argument("--seqs", type=int, nargs="+", default=[16, 64], help="--max-num-seqs of the paged runs")
    parser.add_argument("--no-torch", action="store_true", help="skip transformers")
    parser.add_argument("--baseline", default=BASELINE, help=f"the fixed-slot commit (default {BASELINE})")
    parser.add_argument("--no-baseline", action="store_true", help="skip the fixed-slot commit")
    return parser.parse_args()


def job(config, n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Prompts and wanted completion lengths, long-tailed (module docstring)."""
    rng = np.random.default_rng(seed)
    prompt_lens = np.clip(np.rint(128 * rng.lognormal(0, 1.0, n)), 16, 1024).astype(int)
    wanted = np.clip(np.rint(96 * rng.lognormal(0, 0.9, n)), 16, 512).astype(int)
    prompts = [rng.integers(3, config.vocab_size, length).tolist() for length in prompt_lens]
    return prompts, wanted.tolist()


def run_engine(engine: Engine, prompts, wanted) -> tuple[float, list[int]]:
    """Seconds for the job, and the live sequences seen as each request ended."""
    live: list[int] = []
    requests = [Request(tuple(p), w, stream=i) for i, (p, w) in enumerate(zip(prompts, wanted))]
    start = time.perf_counter()
    results = engine.generate(requests, on_result=lambda i, c: live.append(engine.status().running))
    seconds = time.perf_counter() - start
    assert [len(r.token_ids) for r in results] == wanted
    return seconds, live


# The fixed-slot engine's side, run by the earlier commit's own package in its worktree: it builds the same
# model (same preset, same seed) and runs the job it is handed, printing seconds and the live sequences.
FIXED_SIDE = """
import json, sys, time
from llama_jax import LoadedModel, create_model, make_mesh, preset
from llama_jax.inference.engine import Engine
from llama_jax.inference.settings import EngineSettings
from llama_jax.inference.types import Request
spec = json.load(open(sys.argv[1]))
config = preset(spec["preset"]).replace(dtype="float32", param_dtype="float32")
mesh = make_mesh()
engine = Engine(LoadedModel(create_model(config, mesh), config, mesh),
                EngineSettings(max_num_seqs=spec["slots"], max_model_len=spec["context"]))
def run(prompts, wanted):
    live = []
    requests = [Request(tuple(p), w, stream=i) for i, (p, w) in enumerate(zip(prompts, wanted))]
    start = time.perf_counter()
    results = engine.generate(requests, on_result=lambda i, c: live.append(engine.status().running))
    assert [len(r.token_ids) for r in results] == wanted
    return time.perf_counter() - start, live
run(*spec["warm_up"])
print(json.dumps(run(*spec["timed"])))
"""


def fixed_slots(args, warm_up, timed) -> tuple[float, list[int]]:
    spec = {"preset": args.preset, "slots": args.fixed_slots, "context": CONTEXT, "warm_up": warm_up, "timed": timed}
    with tempfile.TemporaryDirectory(prefix="llama_jax-paged-") as scratch, checkout(args.baseline) as tree:
        path = Path(scratch) / "job.json"
        path.write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONPATH": str(tree)}
        result = subprocess.run(
            [sys.executable, "-c", FIXED_SIDE, str(path)], cwd=tree, env=env, capture_output=True, text=True
        )
    if result.returncode != 0:
        raise RuntimeError(f"the engine at {args.baseline} failed:\n{result.stderr[-3000:]}")
    seconds, live = json.loads(result.stdout.strip().splitlines()[-1])
    return seconds, live


def main() -> None:
    args = parse_args()
    config = preset(args.preset).replace(dtype="float32", param_dtype="float32")
    mesh = make_mesh()
    loaded = LoadedModel(create_model(config, mesh), config, mesh)
    warm_up, timed = job(config, args.requests, seed=1), job(config, args.requests, seed=0)
    prompts, wanted = timed
    useful, pool = sum(wanted), args.fixed_slots * CONTEXT
    print(
        f"{args.preset} ({config.param_count() / 1e6:.1f}M params, float32), {args.requests} requests: prompts "
        f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens (median {int(np.median(list(map(len, prompts))))})"
        f", completions {min(wanted)}-{max(wanted)} (median {int(np.median(wanted))}, {useful:,} tokens); KV "
        f"memory {pool:,} positions ({args.fixed_slots} x {CONTEXT}) for every path; "
        f"device {jax.devices()[0].device_kind}",
        flush=True,
    )
    rows = []  # (path, seconds, live sequences or None, preemptions or None)
    for seqs in args.seqs:
        settings = EngineSettings(max_num_seqs=seqs, max_model_len=CONTEXT, kv_cache_tokens=pool)
        engine = Engine(loaded, settings)
        run_engine(engine, *warm_up)
        before = engine.status().preemptions
        seconds, live = run_engine(engine, prompts, wanted)
        rows.append((f"llama_jax paged, max-num-seqs {seqs}", seconds, live, engine.status().preemptions - before))
    if not args.no_baseline:
        seconds, live = fixed_slots(args, warm_up, timed)
        rows.append((f"llama_jax fixed slots at {args.baseline}, {args.fixed_slots} x {CONTEXT}", seconds, live, None))
    if not args.no_torch:
        import transformers

        with tempfile.TemporaryDirectory(prefix="llama_jax-paged-") as scratch:
            model = transformers_model(loaded, "float32", Path(scratch))
        start = time.perf_counter()  # transformers compiles nothing: no warm-up job
        torch_continuous_batching(model, prompts, wanted, max(args.seqs), page_size=256, num_blocks=pool // 256)
        seconds = time.perf_counter() - start
        rows.append((f"transformers {transformers.__version__} continuous batching (paged)", seconds, None, None))
    print("| path | seconds | useful tokens/s | live seqs: peak / mean | preemptions |\n|---|---|---|---|---|")
    for name, seconds, live, preempted in rows:
        shown = f"{max(live)} / {np.mean(live):.1f}" if live else "—"
        preempted = "—" if preempted is None else preempted
        print(f"| {name} | {seconds:.1f} | {useful / seconds:,.0f} | {shown} | {preempted} |")


if __name__ == "__main__":
    main()
