"""lm-evaluation-harness loglikelihood requests per second: llama_jax's backend beside the harness's own `hf`
backend (transformers) on the same weights, on this machine, in the same run.

    python benchmarks/harness.py [--repeats 3] [--batch-size 16]

The requests are tests/harness_tasks/story_choice.jsonl's multiple-choice pairs (40 contexts x 4 endings),
repeated --repeats times: a few hundred (context, continuation) loglikelihoods, as a HellaSwag-style task
asks. Two models: the real stories260K (260K parameters) and a random ~24M-parameter model on the same
tokenizer (dim 512, 8 layers, 8 heads over 4 KV heads), each exported with `convert to-hf` for the hf
backend. Both backends score in float32 with the same batch size; llama_jax is timed cold (its compiles
included) and warm (the same requests again), transformers once (it does not compile).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def requests(repeats: int):
    from lm_eval.api.instance import Instance

    docs = [json.loads(line) for line in (REPO / "tests" / "harness_tasks" / "story_choice.jsonl").open()]
    pairs = [(doc["context"], " " + choice) for doc in docs for choice in doc["choices"]] * repeats
    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


def models(workdir: Path) -> dict[str, Path]:
    from flax import nnx

    from llama_jax import create_model, make_mesh, preset
    from llama_jax.convert import convert_llama2c
    from llama_jax.model_dir import write_model_dir

    stories = convert_llama2c(
        REPO / "assets" / "stories260K.bin", REPO / "assets" / "tok512.bin", workdir / "stories260K"
    )
    config = preset("bench-cpu").replace(vocab_size=512, dim=512, n_layers=8, ffn_dim=1408, max_seq_len=512)
    params = nnx.to_pure_dict(nnx.state(create_model(config, make_mesh())))
    random13m = write_model_dir(workdir / "random", config, params, REPO / "assets" / "tok512.bin")
    return {"stories260K": stories, f"random {config.param_count() / 1e6:.0f}M": random13m}


def timed(lm, work) -> tuple[float, list]:
    start = time.perf_counter()
    out = lm.loglikelihood(work, disable_tqdm=True)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from llama_jax import load
    from llama_jax.convert import export_hf
    from llama_jax.evaluate.harness import LlamaJaxLM

    work = requests(args.repeats)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model_dir in models(Path(tmp)).items():
            hf_dir = export_hf(model_dir, Path(tmp) / f"{model_dir.name}-hf")
            ours = LlamaJaxLM(load(model_dir, dtype="float32"), batch_size=args.batch_size)
            cold, mine = timed(ours, work)
            warm, _ = timed(ours, work)
            hf = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=args.batch_size, device="cpu")
            hf_s, theirs = timed(hf, work)
            worst = max(abs(a[0] - b[0]) / max(abs(b[0]), 1e-9) for a, b in zip(mine, theirs))
            rows.append((name, cold, warm, hf_s, worst))
    import torch
    import transformers

    print(
        f"{len(work)} loglikelihood requests, batch {args.batch_size}, float32; lm-eval {lm_eval.__version__}, "
        f"transformers {transformers.__version__}, torch {torch.__version__}, {os.cpu_count()} CPU cores"
    )
    print(
        "| model | llama_jax cold req/s | llama_jax warm req/s | hf backend req/s | warm / hf | cold / hf "
        "| max rel. diff |"
    )
    print("|---|---|---|---|---|---|---|")
    n = len(work)
    for name, cold, warm, hf_s, worst in rows:
        print(
            f"| {name} | {n / cold:,.0f} | {n / warm:,.0f} | {n / hf_s:,.0f} | {hf_s / warm:.2f}x | "
            f"{hf_s / cold:.2f}x | {worst:.1e} |"
        )


if __name__ == "__main__":
    main()
