"""Compile every recipe in configs/ for the hardware it names — a TPU slice, slices over DCN, or H100s — and the
serving settings below, from this host (needs libtpu and JAX's CUDA plugin: pip install -e ".[tpu,gpu-compile]";
no TPU, no GPU): the tables in README.

    python benchmarks/compile_recipes.py                 # all of them: ~1-2 min of compiling each on 2 CPU cores
    python benchmarks/compile_recipes.py llama3_8b_v5p   # recipes (and settings) whose name contains this

Each compile runs `train.py --compile-for` / `infer.py --compile-for` in its own process, as a user would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# Serving settings: llama3-8b in bf16, 8-way tensor parallel over one host's TPU chips, or on one H100.
SERVING = [
    (
        "llama3-8b serving",
        "v5e-8",
        [
            "--model",
            "llama3-8b",
            "--mesh",
            "tensor=8",
            "--max-num-seqs",
            "32",
            "--prompt-len",
            "2048",
            "--max-new-tokens",
            "512",
        ],
    ),
    (
        "llama3-8b serving",
        "v6e-8",
        [
            "--model",
            "llama3-8b",
            "--mesh",
            "tensor=8",
            "--max-num-seqs",
            "64",
            "--prompt-len",
            "4096",
            "--max-new-tokens",
            "1024",
        ],
    ),
    (
        "llama3-8b serving",
        "1xH100",
        ["--model", "llama3-8b", "--max-num-seqs", "64", "--prompt-len", "4096", "--max-new-tokens", "1024"],
    ),
]
# The chunked loss against whole-sequence float32 logits, on the recipe whose logits are largest.
EXTRA = [("llama3_8b_v5p.yaml", ["loss_chunk=0"], "loss over the whole 8192 x 128256 logits")]
# The same recipe across two slices: its mesh is one slice's, the data axis spans both.
OTHER_TARGETS = [("llama3_8b_v5p.yaml", "2xv5p-128")]


def compile_once(command: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HOME": str(Path.home())},
    )
    seconds = time.perf_counter() - start
    lines = result.stdout.strip().splitlines()
    if result.returncode not in (0, 1) or not lines:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1]), seconds


def rows(name: str, report: dict, seconds: float) -> list[str]:
    out = []
    for function, r in report["functions"].items():
        out.append(
            f"| {name} | {report['target']} | {function} | {r['temporaries_gib']:.1f} | {r['per_chip_gib']:.1f} "
            f"| {r['hbm_gib']:.2f} "
            f"| {'yes' if r['fits'] else '**no**'} | {r['attention']} | {r['mfu_bound']:.0%} "
            f"| {r['tokens_per_second_bound']:,.0f} | {r['dcn_gib_per_chip'] if report['slices'] > 1 else '-'} "
            f"| {seconds:.0f} |"
        )
    return out


def main() -> None:
    wanted = sys.argv[1].lower() if len(sys.argv) > 1 else ""
    print(
        "| recipe | target | function | temporaries GiB | peak GiB per chip | usable memory GiB | fits | attention "
        "| MFU bound | tokens/s bound | DCN GiB sent per chip | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    jobs = []
    for path in sorted((REPO / "configs").glob("*.yaml")):
        hardware = str((yaml.safe_load(path.read_text()) or {}).get("hardware", ""))
        if hardware not in ("", "cpu") and wanted in path.name.lower():
            command = ["train.py", "--config", f"configs/{path.name}", "--compile-for"]
            jobs.append((path.stem, [*command, hardware]))
            for file, extra, note in EXTRA:
                if file == path.name:
                    jobs.append((f"{path.stem} ({note})", [*command, hardware, *extra]))
            for file, target in OTHER_TARGETS:
                if file == path.name:
                    jobs.append((path.stem, [*command, target]))
    for name, target, args in SERVING:
        if wanted in name.lower() or wanted in target.lower():
            jobs.append((name, ["infer.py", "--compile-for", target, *args]))
    for name, command in jobs:
        report, seconds = compile_once(command)
        print("\n".join(rows(name, report, seconds)), flush=True)


if __name__ == "__main__":
    main()
