"""Decode throughput: the engine beside transformers' `generate` and the one-jit decode loop of commit b94043e.

    python benchmarks/decode.py                       # TinyLlama-1.1B shape, bf16, batches 1 16 64 (a GPU)
    python benchmarks/decode.py --small --batches 1 16 --dtype float32   # the CPU-sized run of README

Random weights, made by llama_jax and given to transformers through `to-hf`; prompts of --prompt-len random
ids; exactly --new-tokens generated per row (no stop ids; transformers gets min_new_tokens); greedy.
tokens/s = batch × new tokens / wall time of a whole generation (prefill included), best of --repeats after a
warm-up. Each side runs in a fresh process of its own (a process that has run one framework slows the other),
and llama_jax and the earlier commit alternate --rounds times, each keeping its best (a 2-core machine's speed
drifts by more than the difference measured; alternating gives both sides the same drift):

  * llama_jax: `Engine.generate` with `batch` decode slots, the engine infer.py, the server and evaluation use;
  * b94043e: the same command at commit b94043e, whose prefill and decode loop ran in one jit, checked out in a
    temporary git worktree (--baseline COMMIT; --no-baseline skips it);
  * transformers: `generate` with the static cache and with the dynamic one, SDPA attention;
  * tunix (--tunix-python: a Python with google-tunix 0.1.7 installed, jax and flax as ours): its `Sampler`
    on its llama3 model, which reads our `to-hf` export; greedy, prompts of one padded length, a cache of prompt
    + new tokens, no stop id (an id it never makes). tunix's attention calls `apply_rope` without the config's
    rope_theta (its default is 10^6); the benchmark passes the model's, so both sides make the same tokens.
    tunix alternates with llama_jax too (--rounds).

The bandwidth line (batch 1) is the bytes one decode step must read — every weight except the embedding rows
it gathers, plus the live KV cache (prompt + half the new tokens on average) — over the decode step time, as a
share of the peak memory bandwidth (--peak-gbs, else the device's data sheet; on CPU, a measured array read).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# transformers runs in this process too: JAX must not reserve most of the accelerator's memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from baseline import number, run_at, table_rows  # noqa: E402

from llama_jax.hardware import host_cpu  # noqa: E402

SMALL = "bench-cpu"  # the preset --small selects
BASELINE = "b94043e"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tinyllama-1.1b", help="model shape (a llama_jax preset)")
    parser.add_argument("--small", action="store_true", help=f"the CPU-sized preset {SMALL!r} instead")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of llama_jax and the earlier commit")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers baselines")
    parser.add_argument("--baseline", default=BASELINE, help=f"the earlier commit to compare with (default {BASELINE})")
    parser.add_argument("--no-baseline", action="store_true", help="skip the earlier commit")
    parser.add_argument("--tunix-python", help="a Python with google-tunix installed: race its Sampler too")
    parser.add_argument("--peak-gbs", type=float, help="peak memory bandwidth in GB/s (default: per device kind)")
    parser.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="llama_jax with int8 projection weights (transformers stays in --dtype)",
    )
    # One side's measurement, in a process of its own; --weights-dir: where llama_jax leaves the weights.
    parser.add_argument("--part", choices=["llama_jax", "transformers", "tunix"], help=argparse.SUPPRESS)
    parser.add_argument("--weights-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def best_time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def prompts(args, batch: int, vocab_size: int):
    import numpy as np

    return np.random.default_rng(batch).integers(3, vocab_size, (batch, args.prompt_len))


def measure_llama_jax(args) -> None:
    """Rows `| batch | tok/s |` and the bandwidth line; the weights to --weights-dir when given."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llama_jax import LoadedModel, create_model, make_mesh, preset
    from llama_jax.hardware import chip_spec
    from llama_jax.inference.engine import Engine
    from llama_jax.inference.settings import EngineSettings
    from llama_jax.inference.types import Request
    from llama_jax.model import abstract_state
    from llama_jax.quantize import quantize_params

    config = preset(SMALL if args.small else args.preset).replace(dtype=args.dtype, param_dtype=args.dtype)
    mesh = make_mesh()
    loaded = LoadedModel(create_model(config, mesh), config, mesh)
    if args.weights_dir:
        from llama_jax.convert.to_hf import export_hf
        from llama_jax.model_dir import write_model_dir

        write_model_dir(Path(args.weights_dir), config, nnx.to_pure_dict(nnx.state(loaded.model)))
        export_hf(Path(args.weights_dir), Path(args.weights_dir).parent / "hf")
    if args.quantize == "int8":
        params = jax.jit(quantize_params)(nnx.to_pure_dict(nnx.state(loaded.model)))
        config = config.replace(quantize="int8")
        graphdef, state = abstract_state(config, mesh)
        nnx.replace_by_pure_dict(state, params)
        loaded = LoadedModel(nnx.merge(graphdef, state), config, mesh)

    def engine_time(rows, new_tokens: int) -> float:
        engine = Engine(loaded, EngineSettings(max_num_seqs=len(rows), max_model_len=len(rows[0]) + new_tokens))
        requests = [Request(tuple(p), new_tokens, stream=i) for i, p in enumerate(rows)]

        def run():
            results = engine.generate(requests)  # host lists: includes the device sync
            assert all(len(r.token_ids) == new_tokens for r in results)

        return best_time(run, args.repeats)

    weights = f"{args.dtype}, int8 projections" if args.quantize == "int8" else args.dtype
    print(f"model {config.param_count() / 1e6:.1f}M params, {weights}, device {jax.devices()[0].device_kind}")
    for batch in args.batches:
        rows = prompts(args, batch, config.vocab_size).tolist()
        print(f"| {batch} | {batch * args.new_tokens / engine_time(rows, args.new_tokens):,.0f} |", flush=True)
    one = prompts(args, 1, config.vocab_size).tolist()
    step = (engine_time(one, args.new_tokens) - engine_time(one, 1)) / (args.new_tokens - 1)
    if args.quantize == "int8":  # the bandwidth model below counts weights of one dtype
        print(f"batch 1 decode step {step * 1e3:.3f} ms")
        return
    if args.peak_gbs:
        peak, source = args.peak_gbs, "given"
    elif (spec := chip_spec(jax.devices()[0].device_kind)) is not None:
        peak, source = spec.hbm_bandwidth / 1e9, f"{spec.name} data sheet"
    else:
        data = jnp.ones((64 * 2**20,), jnp.float32)  # 256 MiB, far beyond the caches
        read = jax.jit(jnp.sum)
        peak, source = data.nbytes / best_time(lambda: read(data).block_until_ready(), 5) / 1e9, "measured array read"
    # The weights (the embedding table only through lm_head when tied, else one gathered row) and the cache.
    weight_bytes = (config.param_count() - (0 if config.tie_embeddings else config.vocab_size * config.dim)) * (
        jnp.dtype(config.param_dtype).itemsize
    )
    live = args.prompt_len + args.new_tokens / 2
    cache_bytes = 2 * config.n_layers * live * config.n_kv_heads * config.head_dim * jnp.dtype(config.dtype).itemsize
    achieved = (weight_bytes + cache_bytes) / step / 1e9
    print(
        f"batch 1 decode step {step * 1e3:.3f} ms: {achieved:,.0f} GB/s of {peak:,.0f} GB/s peak ({source}) "
        f"= {achieved / peak:.0%} of the bandwidth roofline"
    )


def measure_transformers(args) -> None:
    """Rows `| batch | static tok/s | dynamic tok/s |` of transformers with the weights in --weights-dir."""
    import torch
    from same_weights import hf_model

    from llama_jax import preset

    config = preset(SMALL if args.small else args.preset)
    model = hf_model(Path(args.weights_dir).parent / "hf", args.dtype)

    for batch in args.batches:
        ids = torch.as_tensor(prompts(args, batch, config.vocab_size), device=model.device)
        speeds = []
        for cache in ("static", "dynamic"):
            options = dict(
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
                attention_mask=torch.ones_like(ids),
            )
            if cache == "static":
                options["cache_implementation"] = "static"

            def run(options=options, ids=ids):
                with torch.inference_mode():
                    out = model.generate(ids, **options)
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                assert out.shape[1] == args.prompt_len + args.new_tokens

            speeds.append(batch * args.new_tokens / best_time(run, args.repeats))
        print(f"| {batch} | {speeds[0]:,.0f} | {speeds[1]:,.0f} |", flush=True)


def measure_tunix(args) -> None:
    """Rows `| batch | tok/s |` of tunix's Sampler on the `to-hf` export next to --weights-dir. This runs in the
    --tunix-python environment: numpy, jax and tunix only, no llama_jax."""
    from tunix.generate import sampler as sampler_lib
    from tunix_llama3 import load_llama3

    model, config = load_llama3(Path(args.weights_dir).parent / "hf", args.dtype)

    class Ids:  # prompts are random ids: "text" is the ids, space-separated; no BOS is added (bos_id 0)
        def encode(self, text, **_):
            return [int(t) for t in text.split()]

        def decode(self, ids, **_):
            return " ".join(map(str, ids))

        def bos_id(self):
            return 0

        def eos_id(self):
            return -1

        def pad_id(self):
            return 0

    cache = sampler_lib.CacheConfig(
        args.prompt_len + args.new_tokens, config.num_layers, config.num_kv_heads, config.head_dim
    )
    sampler = sampler_lib.Sampler(model, Ids(), cache)
    for batch in args.batches:
        texts = [" ".join(map(str, row)) for row in prompts(args, batch, config.vocab_size)]

        def run(texts=texts):
            out = sampler(texts, args.new_tokens, max_prompt_length=args.prompt_len, eos_tokens=[-1], temperature=0.0)
            assert all(len(tokens) == args.new_tokens for tokens in out.tokens)  # host arrays: synced

        print(f"| {batch} | {batch * args.new_tokens / best_time(run, args.repeats):,.0f} |", flush=True)


def run_part(part: str, args, extra: list[str], python: str = sys.executable) -> str:
    command = [python, __file__, "--part", part, *passed_on(args), *extra]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the {part} measurement failed:\n{result.stderr[-3000:]}")
    return result.stdout


def passed_on(args) -> list[str]:
    """The command-line settings both sides (and the earlier commit) measure with."""
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
    ]
    return command + (["--small"] if args.small else ["--preset", args.preset])


def main() -> None:
    args = parse_args()
    if args.part == "llama_jax":
        return measure_llama_jax(args)
    if args.part == "transformers":
        return measure_transformers(args)
    if args.part == "tunix":
        return measure_tunix(args)
    ours: dict[int, float] = {}
    earlier: dict[int, float] = {}
    tunix: dict[int, float] = {}
    lines: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="llama_jax-decode-") as scratch:
        weights = Path(scratch) / "model"
        extra = [*(["--peak-gbs", str(args.peak_gbs)] if args.peak_gbs else []), "--quantize", args.quantize]
        first = args.batches[0]
        for round_ in range(1 if args.no_baseline and not args.tunix_python else args.rounds):
            output = run_part("llama_jax", args, [*extra, *(["--weights-dir", str(weights)] if round_ == 0 else [])])
            speeds = {int(row[0]): number(row[1]) for row in table_rows(output) if row[0].isdigit()}
            if speeds[first] >= ours.get(first, 0.0):  # the bandwidth line of the best round
                lines = {line.split()[0]: line for line in output.splitlines() if line.startswith(("model", "batch"))}
            ours = {batch: max(ours.get(batch, 0.0), speed) for batch, speed in speeds.items()}
            if not args.no_baseline:
                rows = table_rows(run_at(args.baseline, "benchmarks/decode.py", [*passed_on(args), "--no-torch"]))
                speeds = {int(row[0]): number(row[1]) for row in rows if row[0].isdigit()}
                earlier = {batch: max(earlier.get(batch, 0.0), speed) for batch, speed in speeds.items()}
            if args.tunix_python:
                rows = table_rows(run_part("tunix", args, ["--weights-dir", str(weights)], args.tunix_python))
                speeds = {int(row[0]): number(row[1]) for row in rows if row[0].isdigit()}
                tunix = {batch: max(tunix.get(batch, 0.0), speed) for batch, speed in speeds.items()}
        hf = {}
        if not args.no_torch:
            rows = table_rows(run_part("transformers", args, ["--weights-dir", str(weights)]))
            hf = {int(row[0]): (number(row[1]), number(row[2])) for row in rows if row[0].isdigit()}
    name = SMALL if args.small else args.preset
    print(
        f"{name}: {lines.get('model', '')}, prompt {args.prompt_len}, {args.new_tokens} new tokens; CPU: {host_cpu()}"
    )
    print(
        f"| batch | llama_jax engine tok/s | {args.baseline} one-jit loop tok/s | HF static tok/s | HF dynamic tok/s "
        f"| tunix 0.1.7 Sampler tok/s | engine / {args.baseline} | engine / HF static | engine / tunix |\n|"
        + "---|"
        * 9
    )
    for batch in args.batches:
        mine, before, theirs = ours[batch], earlier.get(batch), tunix.get(batch)
        static, dynamic = hf.get(batch, (None, None))

        def cell(value, ratio=False, mine=mine):
            return "-" if value is None else (f"{mine / value:.2f}x" if ratio else f"{value:,.0f}")

        cells = [f"{mine:,.0f}", cell(before), cell(static), cell(dynamic), cell(theirs)]
        cells += [cell(before, True), cell(static, True), cell(theirs, True)]
        print(f"| {batch} | " + " | ".join(cells) + " |")
    print(lines.get("batch", ""))


if __name__ == "__main__":
    main()
