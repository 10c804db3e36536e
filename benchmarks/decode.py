"""Decode throughput: llama_jax's on-device generation loop beside transformers' `generate`.

    python benchmarks/decode.py                       # TinyLlama-1.1B shape, bf16, batches 1 16 64 (a GPU)
    python benchmarks/decode.py --small --batches 1 16 --new-tokens 64 --dtype float32   # a CPU-sized run

Random weights, prompts of --prompt-len random ids, exactly --new-tokens generated per row (no stop ids;
transformers gets min_new_tokens), greedy. tokens/s = batch × new tokens / wall time of the whole
generate call (prefill included), best of --repeats after one warm-up call. transformers runs SDPA
attention; with the static cache its `generate` compiles the forward with torch.compile on CUDA (its
default) and runs eagerly on CPU. The bandwidth line (batch 1)
is the bytes one decode step must read — every weight except the embedding rows it gathers, plus the
live KV cache (prompt + half the new tokens on average) — divided by the decode step time, as a fraction
of the peak memory bandwidth (--peak-gbs, else a per-device default; on CPU, a measured array read).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# transformers runs in this process too: JAX must not reserve most of the accelerator's memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from llama_jax import LoadedModel, create_model, make_mesh, preset  # noqa: E402
from llama_jax.hardware import chip_spec  # noqa: E402
from llama_jax.inference.generator import Generator  # noqa: E402
from llama_jax.inference.sampling import SamplingParams  # noqa: E402
from llama_jax.inference.settings import GenerationSettings  # noqa: E402
from llama_jax.model import abstract_state  # noqa: E402
from llama_jax.quantize import quantize_params  # noqa: E402

SMALL = "bench-cpu"  # the preset --small selects


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tinyllama-1.1b", help="model shape (a llama_jax preset)")
    parser.add_argument("--small", action="store_true", help=f"the CPU-sized preset {SMALL!r} instead")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers baseline")
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


def jax_generate_time(loaded: LoadedModel, prompts: list[list[int]], new_tokens: int, repeats: int) -> float:
    settings = GenerationSettings(
        max_new_tokens=new_tokens, sampling=SamplingParams(temperature=0.0), batch_size=len(prompts)
    )
    generator = Generator(loaded, settings)
    indices = list(range(len(prompts)))

    def run():
        results = generator.generate_ids(prompts, indices)  # returns host lists: includes the device sync
        assert all(len(ids) == new_tokens for ids, _ in results)

    return best_time(run, repeats)


def torch_generate_time(config, dtype: str, prompts: np.ndarray, new_tokens: int, cache: str, repeats: int) -> float:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings,
    )
    torch_dtype = getattr(torch, dtype)
    model = transformers.LlamaForCausalLM(hf_config).to(device=device, dtype=torch_dtype).eval()
    ids = torch.as_tensor(prompts, device=device)
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
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == prompts.shape[1] + new_tokens

    return best_time(run, repeats)


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
    if args.quantize == "int8":
        params = jax.jit(quantize_params)(nnx.to_pure_dict(nnx.state(loaded.model)))
        config = config.replace(quantize="int8")
        graphdef, state = abstract_state(config, mesh)
        nnx.replace_by_pure_dict(state, params)
        loaded = LoadedModel(nnx.merge(graphdef, state), config, mesh)
    rng = np.random.default_rng(0)
    name = SMALL if args.small else args.preset
    weights = f"{args.dtype}, int8 projections" if args.quantize == "int8" else args.dtype
    print(
        f"model {name} ({config.param_count() / 1e6:.1f}M params, {weights}), prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, device {jax.devices()[0].device_kind} x{len(jax.devices())}"
    )
    header = "| batch | llama_jax tok/s | HF dynamic tok/s | HF static tok/s | llama_jax / HF static |"
    print(header + "\n|" + "---|" * 5)
    for batch in args.batches:
        prompts = rng.integers(3, config.vocab_size, (batch, args.prompt_len))
        ours = batch * args.new_tokens / jax_generate_time(loaded, prompts.tolist(), args.new_tokens, args.repeats)
        row = [f"{ours:,.0f}"]
        if args.no_torch:
            row += ["-", "-", "-"]
        else:
            hf = {
                cache: batch
                * args.new_tokens
                / torch_generate_time(config, args.dtype, prompts, args.new_tokens, cache, args.repeats)
                for cache in ("dynamic", "static")
            }
            row += [f"{hf['dynamic']:,.0f}", f"{hf['static']:,.0f}", f"{ours / hf['static']:.2f}x"]
        print(f"| {batch} | " + " | ".join(row) + " |", flush=True)

    one = rng.integers(3, config.vocab_size, (1, args.prompt_len)).tolist()
    full = jax_generate_time(loaded, one, args.new_tokens, args.repeats)
    prefill = jax_generate_time(loaded, one, 1, args.repeats)
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
