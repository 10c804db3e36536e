"""Peak memory of the converters on a ~1.1B-parameter checkpoint (TinyLlama-1.1B's shape, random bf16).

    python benchmarks/convert_memory.py [--workdir DIR] [--keep]

Writes a Hugging Face directory (config.json + sharded bf16 safetensors, with numpy: no torch), runs
`python -m llama_jax.convert hf` on it, then `to-hf` on the result, then `merge-lora` of a LoRA run on it
(rank-16 random adapters on all seven projections, written as train.py writes a run), each in a
subprocess, and prints each one's peak resident memory (the child's own ru_maxrss from wait4) against the
model's size. A command that held two copies of the model would show a ratio above 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flax import nnx  # noqa: E402

from llama_jax.config import LORA_TARGETS, PRESETS  # noqa: E402
from llama_jax.convert.safetensors_io import TensorSource, shard_plan, write_file  # noqa: E402
from llama_jax.convert.to_hf import hf_config  # noqa: E402
from llama_jax.convert.weights import hf_name, weights_for  # noqa: E402
from llama_jax.lora import split_adapters  # noqa: E402
from llama_jax.model import abstract_state  # noqa: E402
from llama_jax.model_dir import CHECKPOINTS_DIR, PARAMS_DIR, read_model_dir, write_config  # noqa: E402
from llama_jax.param_io import save_params  # noqa: E402

SHARD_BYTES = 10**9
# Meta's LLaMA 2 tokenizer is not bundled (its license): the folder LLAMA_JAX_META_TOKENIZERS names holds it
# (assets/README.md); --tokenizer names another.
META_TOKENIZERS = Path(os.environ.get("LLAMA_JAX_META_TOKENIZERS", "."))


def write_random_hf(directory: Path, tokenizer: Path) -> int:
    """A TinyLlama-shaped checkpoint with random bf16 weights; returns its weight bytes."""
    config = PRESETS["tinyllama-1.1b"]
    rng = np.random.default_rng(0)
    bf16 = np.dtype(ml_dtypes.bfloat16)

    def random_tensor(shape):
        return lambda: (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(bf16)

    tensors = [
        TensorSource(hf_name(w, layer), w.torch_shape(config), bf16, random_tensor(w.torch_shape(config)))
        for w in weights_for(config)
        for layer in (range(config.n_layers) if w.per_layer else [None])
    ]
    directory.mkdir(parents=True)
    shards = shard_plan(tensors, SHARD_BYTES)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_file(directory / name, shard)
        weight_map.update({t.name: name for t in shard})
    total = sum(t.nbytes for t in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(hf_config(config, "bfloat16", 1, 2)))
    shutil.copyfile(tokenizer, directory / "tokenizer.model")
    return total


def write_random_lora_run(base: Path, run_dir: Path, rank: int = 16) -> None:
    """A LoRA run directory on `base` as train.py leaves one: config.json naming the base, the tokenizer, and
    one step's adapters (random A and B, so the merge does real work)."""
    source = read_model_dir(base)
    config = source.config.replace(lora_rank=rank, lora_alpha=2.0 * rank, lora_targets=tuple(LORA_TARGETS))
    adapters, _ = split_adapters(nnx.to_pure_dict(abstract_state(config)[1]))
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(lambda a: 0.01 * rng.standard_normal(a.shape, dtype=np.float32), adapters)
    run_dir.mkdir(parents=True)
    shutil.copyfile(source.tokenizer_path, run_dir / source.tokenizer_path.name)
    write_config(run_dir, config, source.tokenizer_path.name, source.chat_template, lora_base=base)
    save_params(run_dir / CHECKPOINTS_DIR / "1" / PARAMS_DIR, adapters)


def peak_rss(*args: str | Path) -> tuple[int, float]:
    """Run `python -m llama_jax.convert ARGS`; its peak RSS in bytes and its wall time."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "llama_jax.convert", *map(str, args)], cwd=REPO, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"conversion failed: {args}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--tokenizer", type=Path, default=META_TOKENIZERS / "llama2_tokenizer.model")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="convert_memory-", dir=args.workdir))
    try:
        print(f"writing a random TinyLlama-1.1B checkpoint under {workdir} ...", file=sys.stderr)
        model_bytes = write_random_hf(workdir / "hf", args.tokenizer)
        rows = [
            (
                "convert hf (bf16 safetensors -> model dir)",
                *peak_rss("hf", workdir / "hf", "--out", workdir / "converted"),
            ),
            (
                "to-hf (model dir -> bf16 safetensors)",
                *peak_rss("to-hf", workdir / "converted", "--out", workdir / "exported"),
            ),
        ]
        write_random_lora_run(workdir / "converted", workdir / "lora_run")
        rows.append(
            (
                "merge-lora (base + rank-16 adapters on q,k,v,o,gate,up,down -> model dir)",
                *peak_rss("merge-lora", workdir / "lora_run", "--out", workdir / "merged"),
            )
        )
        print(
            f"\nmodel: {PRESETS['tinyllama-1.1b'].param_count() / 1e9:.2f}B parameters, bf16, "
            f"{model_bytes / 2**30:.2f} GiB of weights\n"
        )
        print("| command | model GiB | peak RSS GiB | peak / model | wall s |")
        print("|---|---|---|---|---|")
        for name, rss, seconds in rows:
            print(
                f"| {name} | {model_bytes / 2**30:.2f} | {rss / 2**30:.2f} | {rss / model_bytes:.2f} | {seconds:.1f} |"
            )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
