"""Every speed figure in README's "Measured speed", from one command:

    python benchmarks/speed_tables.py            # ~10 min on a 2-core CPU

It runs, one after the other (so no two share the machine), the decode benchmark at batch 1 and 16 and the
training benchmark in float32 and bfloat16, each against transformers in the same run (bf16 training only
where the CPU has bf16 instructions), and prints their tables.
"""

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # runs from a checkout without `pip install -e .`

from llama_jax.hardware import cpu_flags  # noqa: E402

TRAIN = ["--seq-len", "256", "--batch-size", "8", "--steps", "5", "--warmup", "2", "--remat", "none"]


def native_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (always true enough on a GPU host: not this script's case)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    small = ["--small"]  # the CPU-sized shape; the benchmarks' defaults (TinyLlama-1.1B) are for accelerators
    runs = [
        ["decode.py", *small, "--batches", "1", "16", "--dtype", "float32", "--repeats", "3"],
        ["train.py", *small, *TRAIN, "--dtype", "float32"],
        # transformers' bf16 autocast on a CPU without bf16 instructions (AVX2 only, as this project's box)
        # takes over a minute per step: the bf16 row is llama_jax alone unless the CPU has AVX-512 BF16 / AMX.
        ["train.py", *small, *TRAIN, "--dtype", "bfloat16", *([] if native_bf16() else ["--no-torch"])],
    ]
    for run in runs:
        print(f"\n$ python benchmarks/{' '.join(run)}", flush=True)
        subprocess.run([sys.executable, str(HERE / run[0]), *run[1:]], check=True)


if __name__ == "__main__":
    main()
