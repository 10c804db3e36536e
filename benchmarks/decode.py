"""Decode throughput: the engine beside transformers' `generate` and the one-jit decode loop of commit b94043e.

    python benchmarks/decode.py                       # TinyLlama-1.1B shape, bf16, batches 1 16 64 (a GPU)
    python benchmarks/decode.py --small --batches 1 16 --dtype float32   # the CPU-sized run of README

Random weights, made by llama_jax and given to transformers through `to-hf`; prompts of --prompt-len random
ids; exactly --new-tokens generated per row (no stop ids; transformers gets min_new_tokens); greedy.
tokens/s = batch × new tokens / wall time of a whole generation (prefill included), best of --repeats after a
warm-up, and for llama_jax and the earlier commit the best of --rounds alternating runs. Side by side in one run:

  * llama_jax: `Engine.generate` with `batch` decode slots, the engine infer.py, the server and evaluation use;
  * b94043e: the same command at commit b94043e, whose prefill and decode loop ran in one jit, checked out in a
    temporary git worktree (--baseline COMMIT; --no-baseline skips it);
  * transformers: `generate` with the static cache and with the dynamic one, SDPA attention.

The bandwidth line (batch 1) is the bytes one decode step must read — every weight except the embedding rows
it gathers, plus the live KV cache (prompt + half the new tokens on average) — over the decode step time, as a
share of the peak memory bandwidth (--peak-gbs, else the device's data sheet; on CPU, a measured array read).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# transformers runs in this process too: JAX must not reserve most of the accelerator's memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from baseline import number, run_at, table_rows  # noqa: E402
from flax import nnx  # noqa: E402
from same_weights import transformers_model  # noqa: E402

from llama_jax import LoadedModel, create_model, make_mesh, preset  # noqa: E402
from llama_jax.hardware import chip_spec  # noqa: E402
from llama_jax.inference.engine import Engine  # noqa: E402
from llama_jax.inference.scheduler import Request  # noqa: E402
from llama_jax.model import abstract_state  # noqa: E402
from llama_jax.quantize import quantize_params  # noqa: E402

SMALL = "bench-cpu"  # the preset --small selects
BASELINE = "b94043e"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tinyllama-1.1b", help="model shape (a llama_jax preset)")
    parser.add_argument("--small", action="store_true", help=f"the CPU-sized preset {SMALL!r} instead")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers baselines")
    parser.add_argument("--baseline", default=BASELINE, help=f"the earlier commit to compare with (default {BASELINE})")
    parser.add_argument("--no-baseline", action="store_true", help="skip the earlier commit")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of this commit and the earlier one")
    parser.add_argument("--peak-gbs", type=float, help="peak memory bandwidth in GB/s (default: per device kind)")
    parser.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="llama_jax with int8 projection weights (transformers stays in --dtype)",
    )
    return parser.parse_args()


def best_time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def engine_time(loaded: LoadedModel, prompts: list[list[int]], new_tokens: int, repeats: int) -> float:
    engine = Engine(loaded, slots=len(prompts), cache_len=len(prompts[0]) + new_tokens)
    requests = [Request(tuple(p), new_tokens, stream=i) for i, p in enumerate(prompts)]

    def run():
        results = engine.generate(requests)  # host lists: includes the device sync
        assert all(len(r.token_ids) == new_tokens for r in results)

    return best_time(run, repeats)


def torch_generate_time(model, prompts: np.ndarray, new_tokens: int, cache: str, repeats: int) -> float:
    import torch

    ids = torch.as_tensor(prompts, device=model.device)
    options = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        attention_mask=torch.ones_like(ids),
    )
    if cache == "static":
        options["cache_implementation"] = "static"

    def run():
        with torch.inference_mode():
            out = model.generate(ids, **options)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == prompts.shape[1] + new_tokens

    return best_time(run, repeats)


def baseline_tokens_per_second(args) -> dict[int, float]:
    """tok/s by batch of the same command at the earlier commit (its own llama_jax column)."""
    command = [
        "--batches",
        *map(str, args.batches),
        "--prompt-len",
        str(args.prompt_len),
        "--new-tokens",
        str(args.new_tokens),
        "--dtype",
        args.dtype,
        "--repeats",
        str(args.repeats),
        "--no-torch",
    ]
    command += ["--small"] if args.small else ["--preset", args.preset]
    rows = table_rows(run_at(args.baseline, "benchmarks/decode.py", command))
    return {int(row[0]): number(row[1]) for row in rows if row[0].isdigit()}


def peak_bandwidth_gbs(requested: float | None) -> tuple[float, str]:
    if requested:
        return requested, "given"
    spec = chip_spec(jax.devices()[0].device_kind)
    if spec is not None:
        return spec.hbm_bandwidth / 1e9, f"{spec.name} data sheet"
    data = jnp.ones((64 * 2**20,), jnp.float32)  # 256 MiB, far beyond the caches
    read = jax.jit(jnp.sum)
    seconds = best_time(lambda: read(data).block_until_ready(), 5)
    return data.nbytes / seconds / 1e9, "measured array read"


def step_bytes(config, prompt_len: int, new_tokens: int) -> float:
    """Bytes one batch-1 decode step reads: the weights (the embedding table only through lm_head when
    tied, else one gathered row) and the live KV cache."""
    itemsize = jnp.dtype(config.param_dtype).itemsize
    weights = config.param_count() - (0 if config.tie_embeddings else config.vocab_size * config.dim)
    live_len = prompt_len + new_tokens / 2
    cache = 2 * config.n_layers * live_len * config.n_kv_heads * config.head_dim * jnp.dtype(config.dtype).itemsize
    return weights * itemsize + cache


def main() -> None:
    args = parse_args()
    config = preset(SMALL if args.small else args.preset)
    config = config.replace(dtype=args.dtype, param_dtype=args.dtype)
    mesh = make_mesh()
    loaded = LoadedModel(create_model(config, mesh), config, mesh)
    hf = None
    scratch = tempfile.TemporaryDirectory(prefix="llama_jax-decode-")
    if not args.no_torch:
        hf = transformers_model(loaded, args.dtype, Path(scratch.name))
    if args.quantize == "int8":
        params = jax.jit(quantize_params)(nnx.to_pure_dict(nnx.state(loaded.model)))
        config = config.replace(quantize="int8")
        graphdef, state = abstract_state(config, mesh)
        nnx.replace_by_pure_dict(state, params)
        loaded = LoadedModel(nnx.merge(graphdef, state), config, mesh)
    # Rounds alternate this commit and the earlier one, each keeping its best: a 2-core machine's speed drifts
    # by more than the difference being measured, and alternating gives both sides the same drift.
    prompts = {
        batch: np.random.default_rng(batch).integers(3, config.vocab_size, (batch, args.prompt_len))
        for batch in args.batches
    }
    ours, earlier = {}, {}
    for _ in range(1 if args.no_baseline else args.rounds):
        for batch in args.batches:
            seconds = engine_time(loaded, prompts[batch].tolist(), args.new_tokens, args.repeats)
            ours[batch] = max(ours.get(batch, 0.0), batch * args.new_tokens / seconds)
        if not args.no_baseline:
            for batch, value in baseline_tokens_per_second(args).items():
                earlier[batch] = max(earlier.get(batch, 0.0), value)
    rng = np.random.default_rng(0)
    name = SMALL if args.small else args.preset
    weights = f"{args.dtype}, int8 projections" if args.quantize == "int8" else args.dtype
    print(
        f"model {name} ({config.param_count() / 1e6:.1f}M params, {weights}), prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, device {jax.devices()[0].device_kind} x{len(jax.devices())}"
    )
    header = (
        f"| batch | llama_jax engine tok/s | {args.baseline} one-jit loop tok/s | HF static tok/s "
        f"| HF dynamic tok/s | engine / {args.baseline} | engine / HF static |"
    )
    print(header + "\n|" + "---|" * 7)
    for batch in args.batches:
        before = earlier.get(batch)
        hf_static = hf_dynamic = None
        if hf is not None:
            hf_static, hf_dynamic = (
                batch * args.new_tokens / torch_generate_time(hf, prompts[batch], args.new_tokens, cache, args.repeats)
                for cache in ("static", "dynamic")
            )

        def cell(value, ratio=False, mine=ours[batch]):
            return "-" if value is None else (f"{mine / value:.2f}x" if ratio else f"{value:,.0f}")

        cells = [
            f"{ours[batch]:,.0f}",
            cell(before),
            cell(hf_static),
            cell(hf_dynamic),
            cell(before, True),
            cell(hf_static, True),
        ]
        print(f"| {batch} | " + " | ".join(cells) + " |", flush=True)

    one = rng.integers(3, config.vocab_size, (1, args.prompt_len)).tolist()
    full = engine_time(loaded, one, args.new_tokens, args.repeats)
    prefill = engine_time(loaded, one, 1, args.repeats)
    step = (full - prefill) / (args.new_tokens - 1)
    peak, source = peak_bandwidth_gbs(args.peak_gbs)
    if args.quantize == "int8":  # the bandwidth model below counts weights of one dtype
        print(f"batch 1 decode step {step * 1e3:.3f} ms")
        return
    achieved = step_bytes(config, args.prompt_len, args.new_tokens) / step / 1e9
    print(
        f"batch 1 decode step {step * 1e3:.3f} ms: {achieved:,.0f} GB/s of {peak:,.0f} GB/s peak ({source}) "
        f"= {achieved / peak:.0%} of the bandwidth roofline"
    )


if __name__ == "__main__":
    main()
