"""Fine-tuning on this machine: full fine-tuning vs LoRA vs QLoRA, speed and memory, through train.py itself.

    python benchmarks/finetune_speed.py [--preset bench-cpu] [--steps 30] [--seq-len 256] [--batch-size 8]

One random model directory (the preset's shape, float32, the LLaMA 2 tokenizer) is the init_from of three
runs of `train.py` on the bundled TinyShakespeare, each in its own subprocess, one after the other:
  * full:  every parameter trained (AdamW moments for all of them);
  * lora:  rank-16 adapters on q, k, v, o, gate, up, down; the base frozen;
  * qlora: the same adapters on an int8 base (per-channel scales).
Reported per run: the trained parameters, the median tokens/s of train.py's log intervals after the first
(the first includes compiling), the run's peak resident memory (the child's ru_maxrss from wait4) and the
size of its final checkpoint. On an accelerator the memory that matters is HBM per chip:
benchmarks/finetune_memory.py compiles Llama 3 8B for TPU chips for that.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flax import nnx  # noqa: E402

from llama_jax.config import LORA_TARGETS, preset  # noqa: E402
from llama_jax.lora import split_adapters  # noqa: E402
from llama_jax.model import abstract_state, create_model  # noqa: E402
from llama_jax.model_dir import write_model_dir  # noqa: E402

# Meta's LLaMA 2 tokenizer is not bundled (its license): the folder LLAMA_JAX_META_TOKENIZERS names holds it
# (assets/README.md); --tokenizer names another.
META_TOKENIZERS = Path(os.environ.get("LLAMA_JAX_META_TOKENIZERS", "."))
ADAPTERS = ["lora.rank=16", f"lora.targets={','.join(LORA_TARGETS)}"]
MODES = {"full": [], "lora": ADAPTERS, "qlora": [*ADAPTERS, "lora.int8_base=true"]}


def trained_parameters(config, mode: str) -> int:
    if mode == "full":
        return config.param_count()
    adapted = config.replace(lora_rank=16, lora_targets=tuple(LORA_TARGETS))
    adapters, _ = split_adapters(nnx.to_pure_dict(abstract_state(adapted)[1]))
    return sum(a.size for module in adapters["layers"].values() for a in module.values())


def run_mode(base: Path, run_dir: Path, mode: str, args) -> dict:
    settings = [
        f"init_from={base}",
        "data=tinyshakespeare.txt",
        f"steps={args.steps}",
        f"seq_len={args.seq_len}",
        f"batch_size={args.batch_size}",
        "log_every=5",
        "eval_every=100000",
        "checkpoint_every=100000",
        "samples=0",
        "warmup=2",
        f"run_dir={run_dir}",
        *MODES[mode],
    ]
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "train.py", *settings], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{mode} run failed:\n{stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if r.get("split") == "train" and "tokens_per_s" in r][1:]
    checkpoint = sum(f.stat().st_size for f in (run_dir / "checkpoints").rglob("*") if f.is_file())
    return {
        "tokens_per_s": statistics.median(speeds),
        "peak_rss": usage.ru_maxrss * 1024,
        "checkpoint": checkpoint,
        "wall_s": time.perf_counter() - start,
        "loss": [r["loss"] for r in records if r.get("split") == "train"][-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench-cpu", help="model shape (a llama_jax preset)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokenizer", type=Path, default=META_TOKENIZERS / "llama2_tokenizer.model")
    args = parser.parse_args()
    config = preset(args.preset)
    with tempfile.TemporaryDirectory(prefix="finetune_speed-") as tmp:
        base = Path(tmp) / "base"
        write_model_dir(base, config, nnx.to_pure_dict(nnx.state(create_model(config))), args.tokenizer)
        print(
            f"{args.preset}: {config.param_count() / 1e6:.1f}M parameters, float32; batch {args.batch_size} x "
            f"{args.seq_len} tokens, {args.steps} steps\n"
        )
        print("| mode | trained parameters | tokens/s | vs full | peak RSS GiB | checkpoint MB | last loss |")
        print("|---|---|---|---|---|---|---|")
        full_speed = None
        for mode in MODES:
            result = run_mode(base, Path(tmp) / mode, mode, args)
            full_speed = full_speed or result["tokens_per_s"]
            print(
                f"| {mode} | {trained_parameters(config, mode):,} | {result['tokens_per_s']:,.0f} | "
                f"{result['tokens_per_s'] / full_speed:.2f}x | {result['peak_rss'] / 2**30:.2f} | "
                f"{result['checkpoint'] / 1e6:.1f} | {result['loss']:.3f} |",
                flush=True,
            )
            shutil.rmtree(Path(tmp) / mode)


if __name__ == "__main__":
    main()
