"""A ragged batch job: the continuous-batching engine beside static batches and transformers' `generate`.

    python benchmarks/ragged_batch.py                 # 256 prompts of 16-512 tokens, completions of 8-256
    python benchmarks/ragged_batch.py --prompts 64    # quicker

Random weights of the --preset shape (default: bench-cpu, the CPU-sized benchmark model), float32, greedy,
no stop ids: prompt i wants exactly wanted[i] new tokens, drawn uniformly from 8-256 (as completions ending
at their EOS would), its prompt uniformly from 16-512 random ids. Useful tokens/s = Σ wanted / wall time
(prefill included) after a warm-up run of the same job (compilation excluded; transformers, which does not
compile, runs once).

  * engine: `inference.engine.Engine`, --batch decode slots, each refilled as its request ends;
  * static batches: what infer.py did before the engine: batches of --batch prompts in input order, one
    prefill and an on-device decode loop until every row has its tokens (the batch runs to its longest);
  * transformers: LlamaForCausalLM.generate on the same batches, left-padded, to the batch's longest.

A second table: one decode step of --batch rows at several cache fills, attention reading the live blocks
of the cache (the engine's) against reading the whole cache.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from llama_jax import LoadedModel, create_model, make_mesh, preset  # noqa: E402
from llama_jax.inference.decode import bucket_length, decode_step, prefill, prefill_chunk  # noqa: E402
from llama_jax.inference.engine import Engine  # noqa: E402
from llama_jax.inference.scheduler import Request  # noqa: E402
from llama_jax.inference.slots import CACHE_BLOCK  # noqa: E402
from llama_jax.kv_cache import KVCache  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench-cpu")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="decode slots / static batch size")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-torch", action="store_true")
    return parser.parse_args()


def job(config, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, config.vocab_size, rng.integers(16, 513)).tolist() for _ in range(n)]
    return prompts, rng.integers(8, 257, n).tolist()


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _static_batch(graphdef, state, ids, lengths, limits, *, cache_len: int):
    """Greedy: prefill, then decode every row until the last row has its `limits` tokens; the tokens."""
    logits, cache = prefill(graphdef, state, ids, lengths, cache_len, prefill_chunk(ids.shape[0]))
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    tokens = jnp.zeros((ids.shape[0], cache_len), jnp.int32).at[:, 0].set(token)

    def unfinished(carry):
        return carry[0] < jnp.max(limits)

    def advance(carry):
        step, token, cache, tokens = carry
        logits, cache = decode_step(graphdef, state, token, cache)
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        return step + 1, token, cache, jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))

    return jax.lax.while_loop(unfinished, advance, (jnp.int32(1), token, cache, tokens))[3]


def static_batches(loaded: LoadedModel, prompts, wanted, batch: int) -> None:
    graphdef, state = nnx.split(loaded.model)
    max_new = 256
    for start in range(0, len(prompts), batch):
        rows = prompts[start : start + batch]
        bucket = bucket_length(max(map(len, rows)), loaded.config.max_seq_len - max_new)
        ids = np.zeros((batch, bucket), np.int32)
        lengths = np.ones(batch, np.int32)
        limits = np.zeros(batch, np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row)], lengths[i], limits[i] = row, len(row), wanted[start + i]
        with jax.set_mesh(loaded.mesh):
            _static_batch(graphdef, state, ids, lengths, limits, cache_len=bucket + max_new).block_until_ready()


def engine_job(engine: Engine, prompts, wanted) -> None:
    results = engine.generate([Request(tuple(p), w, stream=i) for i, (p, w) in enumerate(zip(prompts, wanted))])
    assert [len(r.token_ids) for r in results] == wanted


def torch_job(config, dtype: str, prompts, wanted, batch: int) -> None:
    import torch
    import transformers

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
    )
    model = transformers.LlamaForCausalLM(hf_config).to(getattr(torch, dtype)).eval()
    for start in range(0, len(prompts), batch):
        rows = prompts[start : start + batch]
        width = max(map(len, rows))
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):  # left padding
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        new = max(wanted[start : start + batch])
        with torch.inference_mode():
            model.generate(
                ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
            )


@functools.partial(jax.jit, static_argnames=("graphdef", "block"))
def _decode_steps(graphdef, state, cache, tokens, *, block):
    def one(carry, _):
        cache, tokens = carry
        logits, cache = nnx.merge(graphdef, state)(tokens[:, None], cache=cache, cache_block=block)
        return (cache, jnp.argmax(logits[:, 0], -1).astype(jnp.int32)), None

    return jax.lax.scan(one, (cache, tokens), length=8)[0][1]


def cache_reads(loaded: LoadedModel, batch: int, cache_len: int = 2048) -> None:
    """One decode step of `batch` rows at several cache fills: reading live blocks against the whole cache."""
    config = loaded.config
    graphdef, state = nnx.split(loaded.model)
    shape = (config.n_layers, batch, config.n_kv_heads, cache_len, config.head_dim)
    tokens = jnp.zeros((batch,), jnp.int32)
    print(
        f"\n| cache filled (of {cache_len}) | live blocks of {CACHE_BLOCK} ms/step | whole cache ms/step |"
        "\n|---|---|---|"
    )
    for filled in (128, 512, 1024, 1920):
        cache = KVCache(
            jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype), jnp.full((batch,), filled, jnp.int32)
        )
        times = [
            timed(lambda b=block, c=cache: _decode_steps(graphdef, state, c, tokens, block=b).block_until_ready())
            / 8
            * 1e3
            for block in (CACHE_BLOCK, None)
        ]
        print(f"| {filled} | {times[0]:.1f} | {times[1]:.1f} |")


def timed(fn, warm_up: bool = True) -> float:
    if warm_up:  # compile every shape the job uses
        fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    config = preset(args.preset).replace(dtype=args.dtype, param_dtype=args.dtype)
    mesh = make_mesh()
    loaded = LoadedModel(create_model(config, mesh), config, mesh)
    prompts, wanted = job(config, args.prompts)
    useful = sum(wanted)
    print(
        f"{args.preset} ({config.param_count() / 1e6:.1f}M params, {args.dtype}), {args.prompts} prompts of "
        f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, completions of {min(wanted)}-{max(wanted)} "
        f"({useful:,} tokens), batch/slots {args.batch}, device {jax.devices()[0].device_kind}"
    )
    engine = Engine(loaded, slots=args.batch, cache_len=512 + 256)
    rows = [
        ("llama_jax engine (continuous batching)", timed(lambda: engine_job(engine, prompts, wanted))),
        ("llama_jax static batches", timed(lambda: static_batches(loaded, prompts, wanted, args.batch))),
    ]
    if not args.no_torch:
        import transformers

        rows.append(
            (
                f"transformers {transformers.__version__} generate (static batches)",
                timed(lambda: torch_job(config, args.dtype, prompts, wanted, args.batch), warm_up=False),
            )
        )
    print("| path | seconds | useful tokens/s | engine speed-up |\n|---|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {useful / seconds:,.0f} | {seconds / rows[0][1]:.2f}x |")
    cache_reads(loaded, args.batch)


if __name__ == "__main__":
    main()
