"""The GPU benchmark: one table of what a GPU user compares, each number raced against PyTorch on the same GPU in
the same run, with the goals beside them.

    python benchmarks/gpu.py            # on a GPU: TinyLlama-1.1B shape, bf16 (about 8 minutes on an H100)
    python benchmarks/gpu.py --smoke    # anywhere: the same runs at toy sizes, to check the script works

It runs the project's own benchmarks, each in its own processes (one framework's memory and threads never
held while the other is measured), and reads their tables:

  * decode (`benchmarks/decode.py`): tokens/s of the engine at batch 1 and 64 against transformers' `generate`
    with the static cache; the batch-1 step's share of the HBM roofline (weights + live KV cache read per step
    over the data sheet's bandwidth). Goals: ≥ 80 % of the roofline at batch 1, ≥ 2× transformers at batch 64.
  * training (`benchmarks/train.py`): tokens/s and MFU of one full optimizer step against transformers +
    AdamW (bf16 autocast, SDPA), seq 2048, batch 8. Goals: MFU ≥ 50 % and above PyTorch's.
  * the ragged job (`benchmarks/ragged_batch.py`): useful tokens/s of the engine's continuous batching against
    transformers' continuous batching (`generate_batch`), 256 prompts of 16-512 tokens, completions of 8-256.

The last line is JSON: every number of the table, for the README and for comparing runs.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from baseline import number, table_rows  # noqa: E402

FULL = {
    "decode": ["--batches", "1", "64", "--prompt-len", "128", "--new-tokens", "256", "--no-baseline"],
    "train": ["--seq-len", "2048", "--batch-size", "8", "--steps", "10", "--warmup", "2"],
    "ragged": ["--preset", "tinyllama-1.1b", "--dtype", "bfloat16", "--prompts", "256", "--batch", "64"],
}
SMOKE = {
    "decode": ["--small", "--batches", "1", "4", "--prompt-len", "8", "--new-tokens", "4", "--dtype", "float32"],
    "train": ["--small", "--seq-len", "32", "--batch-size", "2", "--steps", "1", "--warmup", "1", "--dtype", "float32"],
    "ragged": ["--prompts", "2", "--batch", "2", "--max-new", "8"],
}
SMOKE_EXTRA = {"decode": ["--repeats", "1", "--no-baseline"], "train": [], "ragged": ["--no-baseline"]}
ROOFLINE = re.compile(r"= (\d+)% of the bandwidth roofline")


def run(name: str, script: str, argv: list[str], timeout: float) -> str:
    """A benchmark's stdout; its progress goes on stderr as it runs."""
    print(f"running {script} {' '.join(argv)} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(HERE / script), *argv], capture_output=True, text=True, timeout=timeout
    )
    if result.returncode:
        raise SystemExit(f"error: {script} failed:\n{result.stderr[-3000:]}")
    print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return result.stdout


def decode(output: str) -> dict:
    """Engine and HF-static tokens/s per batch, and the batch-1 roofline share, from decode.py's table."""
    rows = {int(row[0]): row for row in table_rows(output) if row[0].isdigit()}
    share = ROOFLINE.search(output)
    return {
        "decode": {batch: {"llama_jax": number(row[1]), "hf_static": number(row[3])} for batch, row in rows.items()},
        "roofline_share_batch_1": int(share.group(1)) / 100 if share else None,
    }


def train(output: str) -> dict:
    """Tokens/s and MFU of each framework, from train.py's table."""
    found = {}
    for row in table_rows(output)[1:]:  # after the header
        side = "llama_jax" if row[0].startswith("llama_jax") else "pytorch"
        found[side] = {"tokens_per_s": number(row[3]), "mfu": number(row[4].rstrip("%")) / 100}
    return {"train": found}


def ragged(output: str) -> dict:
    """Useful tokens/s of the engine and of transformers' continuous batching, from ragged_batch.py's table."""
    found = {}
    for row in table_rows(output):
        if row[0].startswith("llama_jax"):
            found["llama_jax"] = number(row[2])
        elif "continuous batching" in row[0]:
            found["hf_continuous"] = number(row[2])
    return {"ragged": found}


def table(results: dict, device: str) -> str:
    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "-"

    lines = [
        f"device: {device}",
        "| measure | llama_jax | PyTorch (transformers) | ratio | goal |",
        "|---|---|---|---|---|",
    ]
    for batch, row in sorted(results["decode"].items()):
        goal = "≥ 2x" if batch == 64 else ""
        lines.append(
            f"| decode tokens/s, batch {batch} | {row['llama_jax']:,.0f} | {row['hf_static']:,.0f} (static cache) "
            f"| {ratio(row['llama_jax'], row['hf_static'])} | {goal} |"
        )
    share = results["roofline_share_batch_1"]
    lines.append(
        f"| batch-1 decode step, share of HBM roofline | {share:.0%} | | | ≥ 80% |" if share is not None else ""
    )
    jax_train, torch_train = results["train"].get("llama_jax", {}), results["train"].get("pytorch", {})
    lines.append(
        f"| training tokens/s | {jax_train.get('tokens_per_s', 0):,.0f} | {torch_train.get('tokens_per_s', 0):,.0f} "
        f"| {ratio(jax_train.get('tokens_per_s'), torch_train.get('tokens_per_s'))} | |"
    )
    lines.append(
        f"| training MFU | {jax_train.get('mfu', 0):.1%} | {torch_train.get('mfu', 0):.1%} | "
        "| ≥ 50% and above PyTorch |"
    )
    rag = results["ragged"]
    lines.append(
        f"| ragged job, useful tokens/s | {rag.get('llama_jax', 0):,.0f} | {rag.get('hf_continuous', 0):,.0f} "
        f"(continuous batching) | {ratio(rag.get('llama_jax'), rag.get('hf_continuous'))} | |"
    )
    return "\n".join(line for line in lines if line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes on any device: checks the script, not speed")
    parser.add_argument("--timeout", type=float, default=400, help="seconds each benchmark may take")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    extra = SMOKE_EXTRA if args.smoke else {name: [] for name in FULL}
    results: dict = {}
    outputs = {}
    for name, script, read in (
        ("decode", "decode.py", decode),
        ("train", "train.py", train),
        ("ragged", "ragged_batch.py", ragged),
    ):
        outputs[name] = run(name, script, [*sizes[name], *extra[name]], args.timeout)
        results |= read(outputs[name])
    device = re.search(r"device: ([^;\n]+)", outputs["train"])
    print(table(results, device.group(1) if device else "?"))
    print(json.dumps({"smoke": args.smoke, **results}))


if __name__ == "__main__":
    main()
