"""Training throughput: llama_jax's train step beside transformers (PyTorch) on the same model and batch.

    python benchmarks/train.py                    # TinyLlama-1.1B shape, seq 2048, bf16 compute (a GPU)
    python benchmarks/train.py --small --seq-len 256 --batch-size 8 --dtype float32   # a CPU-sized run

Both sides start from the same weights (llama_jax initialises them, `convert to-hf` hands them to
transformers) and train on the same random token ids, so their first-step losses agree; each iteration is one
full optimizer step: forward, next-token cross-entropy, backward, global-norm clipping at 1.0, AdamW.
llama_jax: float32 parameters, `--dtype` compute, the `--remat` policy and attention implementation (cuDNN
flash on GPU), one jitted donated step. transformers: LlamaForCausalLM with float32 parameters under
torch.autocast(--dtype), SDPA attention, torch.optim.AdamW (fused on CUDA). Each framework runs in its own
subprocess, one after the other, so neither holds memory or threads while the other is measured. Reported:
the median step time of --steps steps after --warmup.

    MFU = tokens/s × (6·N + 12·n_layers·seq_len·n_heads·head_dim) / (devices × peak FLOP/s)

with N the parameters taking part in matmuls (all but the input embedding table); see llama_jax/flops.py.
Peak: --peak-tflops, else the device's dense bf16 peak (H100 SXM: 989 TFLOP/s). A CPU has no published
peak, and its float32 and bf16 peaks differ: it is measured, as the best FLOP/s of a 2048 x 2048 matmul in
the compute dtype by either framework in the same run; say so when reporting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout without `pip install -e .`

from llama_jax.config import REMAT_POLICIES  # noqa: E402
from llama_jax.hardware import host_cpu  # noqa: E402

SMALL = "bench-cpu"  # the preset --small selects


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tinyllama-1.1b", help="model shape (a llama_jax preset)")
    parser.add_argument("--small", action="store_true", help=f"the CPU-sized preset {SMALL!r} instead")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (over all devices)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype")
    parser.add_argument("--remat", default="save_dots", choices=list(REMAT_POLICIES))
    parser.add_argument("--attention", default="auto", help="llama_jax attention: auto (cuDNN on GPU), xla, cudnn")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="per-device peak (default: by device kind)")
    parser.add_argument(
        "--torch-checkpointing",
        action="store_true",
        help="gradient checkpointing for transformers (when its activations do not fit)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--framework", choices=["jax", "torch"], help=argparse.SUPPRESS)  # the subprocesses
    parser.add_argument("--weights-dir", help=argparse.SUPPRESS)  # where the jax side leaves the initial weights
    return parser.parse_args(argv)


def model_config(args):
    from llama_jax.config import preset

    config = preset(SMALL if args.small else args.preset)
    return config.replace(max_seq_len=max(config.max_seq_len, args.seq_len))


MATMUL = 2048  # the square matmul that measures a CPU's peak


def token_batch(args, vocab_size: int):
    """The same (batch, seq_len + 1) random ids on both sides: inputs are [:, :-1], targets [:, 1:]."""
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab_size, (args.batch_size, args.seq_len + 1), dtype=np.int32)


def measure_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from llama_jax.attention import choose_implementation
    from llama_jax.convert.to_hf import export_hf
    from llama_jax.model import create_model
    from llama_jax.model_dir import write_model_dir
    from llama_jax.sharding import make_mesh
    from llama_jax.train.batching import FIELDS, batch_sharding
    from llama_jax.train.config import TrainConfig
    from llama_jax.train.objectives import NextTokenLoss
    from llama_jax.train.optimizer import make_optimizer
    from llama_jax.train.state import init_state, state_layout
    from llama_jax.train.step import make_train_step

    config = model_config(args).replace(dtype=args.dtype, remat=args.remat, attention=args.attention)
    train_config = TrainConfig(steps=1000, warmup=10, batch_size=args.batch_size, seq_len=args.seq_len)
    mesh = make_mesh()
    optimizer = make_optimizer(train_config)
    layout = state_layout(config, optimizer, mesh)
    model = create_model(config, mesh)
    params = nnx.to_pure_dict(nnx.state(model))
    if not args.no_torch:  # the starting weights, for transformers
        write_model_dir(Path(args.weights_dir) / "model", config.replace(dtype="float32"), params)
        export_hf(Path(args.weights_dir) / "model", Path(args.weights_dir) / "hf")
    train_state = init_state(params, optimizer, layout.shardings)
    del model, params
    shape = (1, args.batch_size, args.seq_len)
    step = make_train_step(layout, optimizer, mesh, shape, NextTokenLoss())
    ids = token_batch(args, config.vocab_size)[None]
    host = {
        "inputs": ids[..., :-1],
        "targets": ids[..., 1:],
        "positions": np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), shape),
        "segments": np.ones(shape, np.int32),
        "loss_mask": np.ones(shape, np.float32),
    }
    batch = {name: jax.device_put(host[name], batch_sharding(mesh, shape)) for name in FIELDS}
    times, losses = [], []
    with jax.set_mesh(mesh):
        for _ in range(args.warmup + args.steps):
            start = time.perf_counter()
            train_state, metrics = step(train_state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
            losses.append(float(metrics["loss"]))
    device = jax.devices()[0]
    a = jnp.ones((MATMUL, MATMUL), args.dtype)
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    matmul_s = min(timed(lambda: jax.block_until_ready(matmul(a))) for _ in range(5))
    attention = choose_implementation(config.attention, config.dtype)
    return {
        "framework": "llama_jax",
        "step_s": statistics.median(times[args.warmup :]),
        "first_loss": losses[0],
        "loss": losses[-1],
        "devices": jax.device_count(),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "matmul_flops": 2 * MATMUL**3 / matmul_s,
        "detail": f"{args.dtype} compute, remat={args.remat}, {attention} attention",
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_torch(args) -> dict:
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = LlamaForCausalLM.from_pretrained(
        Path(args.weights_dir) / "hf", dtype=torch.float32, attn_implementation="sdpa"
    ).to(device)
    if args.torch_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1, fused=cuda
    )
    ids = torch.from_numpy(token_batch(args, model.config.vocab_size)).long().to(device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    # The matmul as the training step runs it: float32 tensors under autocast (a plain bf16 `a @ a` takes a slow
    # reference kernel on CPUs without native bf16, minutes for one product).
    a = torch.ones((MATMUL, MATMUL), dtype=torch.float32, device=device)

    def matmul():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            a @ a
        if cuda:
            torch.cuda.synchronize()

    matmul()
    matmul_s = min(timed(matmul) for _ in range(5))
    kind = torch.cuda.get_device_name() if cuda else "cpu"
    precision = f"{args.dtype} autocast" if dtype != torch.float32 else "float32"
    checkpointing = ", grad checkpointing" if args.torch_checkpointing else ""
    return {
        "framework": f"transformers {transformers.__version__}",
        "first_loss": losses[0],
        "loss": losses[-1],
        "step_s": statistics.median(times[args.warmup :]),
        "devices": 1,
        "device_kind": kind,
        "platform": device.type,
        "matmul_flops": 2 * MATMUL**3 / matmul_s,
        "detail": f"{precision}, sdpa attention{checkpointing}",
    }


def run_subprocess(framework: str, argv: list[str], weights_dir: str) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, *argv, "--framework", framework, "--weights-dir", weights_dir],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if result.returncode:
        raise SystemExit(f"{framework} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.framework:
        measure = measure_jax if args.framework == "jax" else measure_torch
        print(json.dumps(measure(args)))
        return
    from llama_jax import flops

    argv = sys.argv[1:]
    with tempfile.TemporaryDirectory() as weights_dir:
        results = [run_subprocess("jax", argv, weights_dir)]
        if not args.no_torch:
            results.append(run_subprocess("torch", argv, weights_dir))
    config = model_config(args)
    per_token = flops.training_flops_per_token(config, args.seq_len)
    kind = results[0]["device_kind"]
    peak = flops.peak_flops(kind, args.peak_tflops)
    peak_note = f"--peak-tflops {args.peak_tflops}" if args.peak_tflops else f"{kind} bf16 dense"
    if peak is None:
        peak = max(r["matmul_flops"] for r in results)
        peak_note = f"measured: the best {MATMUL}x{MATMUL} {args.dtype} matmul, " + ", ".join(
            f"{r['framework'].split()[0]} {r['matmul_flops'] / 1e9:.0f} GFLOP/s" for r in results
        )
    shape = SMALL if args.small else args.preset
    print(
        f"model {shape}: {config.param_count() / 1e6:.1f}M params, {flops.matmul_params(config) / 1e6:.1f}M in "
        f"matmuls; batch {args.batch_size} x seq {args.seq_len}; "
        f"{per_token / 1e9:.3f} GFLOP/token (6N + 12*L*T*H*Dh)"
    )
    print(
        f"peak {peak / 1e12:.3f} TFLOP/s per device ({peak_note}); device: {kind}"
        f"{f' ({host_cpu()})' if kind == 'cpu' else ''}; "
        f"median of {args.steps} steps after {args.warmup} warm-up; same initial weights and batch"
    )
    print(
        f"| {'framework':<22} | {'setup':<46} | {'step (s)':>8} | {'tokens/s':>10} | {'MFU':>6} "
        f"| {'step-1 loss':>11} | {'last loss':>9} |"
    )
    print(f"|{'-' * 24}|{'-' * 48}|{'-' * 10}|{'-' * 12}|{'-' * 8}|{'-' * 13}|{'-' * 11}|")
    for r in results:
        tokens_per_s = args.batch_size * args.seq_len / r["step_s"]
        mfu = tokens_per_s * per_token / (r["devices"] * peak)
        print(
            f"| {r['framework']:<22} | {r['detail']:<46} | {r['step_s']:>8.3f} | {tokens_per_s:>10,.0f} | "
            f"{100 * mfu:>5.1f}% | {r['first_loss']:>11.4f} | {r['loss']:>9.4f} |"
        )


if __name__ == "__main__":
    main()
