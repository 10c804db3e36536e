"""lm-evaluation-harness loglikelihood requests per second: llama_jax's backend beside the harness's own `hf`
backend (transformers) on the same weights, on this machine, in the same run.

    python benchmarks/harness.py [--repeats 3] [--batch-size 16]

Requests: tests/harness_tasks/story_choice.jsonl's multiple-choice pairs (40 contexts x 4 one-word endings),
repeated --repeats times, as a HellaSwag-style task asks; and for the long-context row, 40 contexts of about
2,000 tokens of TinyShakespeare text with 4 endings each (MMLU-style: long shared contexts). Models, each exported
with `convert to-hf` for the hf backend, on the tok512 tokenizer:

  * the real stories260K (260K parameters, vocabulary 512);
  * random weights of the bench-cpu shape (19.3M parameters, dim 256, 4 layers, a 32,000-word vocabulary:
    the output layer is most of the model, as in small real models);
  * the same with a 2,048-token context, on the long requests.

Both backends score in float32 with the same batch size; llama_jax is timed cold (its compiles included) and
warm (the same requests again), transformers once (it does not compile). Both answer a request group whose
model inputs are the same (a context's one-token endings) with one row.
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


def instances(pairs):
    from lm_eval.api.instance import Instance

    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


def story_choice(repeats: int) -> list:
    docs = [json.loads(line) for line in (REPO / "tests" / "harness_tasks" / "story_choice.jsonl").open()]
    return instances([(doc["context"], " " + choice) for doc in docs for choice in doc["choices"]] * repeats)


def long_contexts(tokens: int = 2000) -> list:
    """40 distinct contexts of about `tokens` tok512 tokens (consecutive TinyShakespeare text), 4 endings each."""
    from llama_jax.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(REPO / "assets" / "tok512.bin")
    words = (REPO / "llama_jax" / "data" / "tinyshakespeare.txt").read_text().split()
    per_token = len(words[:20_000]) / len(tokenizer.encode(" ".join(words[:20_000]), bos=False))
    span = int(tokens * per_token * 0.95)
    endings = [" happy", " sad", " big", " little"]
    pairs = []
    for i in range(40):
        start = i * span
        pairs += [(" ".join(words[start : start + span]), ending) for ending in endings]
    return instances(pairs)


def models(workdir: Path) -> list[tuple[str, Path]]:
    from flax import nnx

    from llama_jax import create_model, make_mesh, preset
    from llama_jax.convert import convert_llama2c
    from llama_jax.model_dir import write_model_dir

    stories = convert_llama2c(
        REPO / "assets" / "stories260K.bin", REPO / "assets" / "tok512.bin", workdir / "stories260K"
    )
    out = [("stories260K", stories)]
    for context in (512, 2048):
        config = preset("bench-cpu").replace(dtype="float32", param_dtype="float32", max_seq_len=context)
        params = nnx.to_pure_dict(nnx.state(create_model(config, make_mesh())))
        directory = write_model_dir(workdir / f"random{context}", config, params, REPO / "assets" / "tok512.bin")
        out.append((f"random {config.param_count() / 1e6:.1f}M, vocab 32000, context {context}", directory))
    return out


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

    short, long = story_choice(args.repeats), long_contexts()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model_dir in models(Path(tmp)):
            work = long if name.endswith("2048") else short
            hf_dir = export_hf(model_dir, Path(tmp) / f"{model_dir.name}-hf")
            ours = LlamaJaxLM(load(model_dir, dtype="float32"), batch_size=args.batch_size)
            cold, mine = timed(ours, work)
            warm, _ = timed(ours, work)
            hf = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=args.batch_size, device="cpu")
            hf_s, theirs = timed(hf, work)
            worst = max(abs(a[0] - b[0]) / max(abs(b[0]), 1e-9) for a, b in zip(mine, theirs))
            same_greedy = sum(a[1] == b[1] for a, b in zip(mine, theirs)) / len(work)
            rows.append((name, len(work), cold, warm, hf_s, worst, same_greedy))
            print(f"  {name}: warm {len(work) / warm:,.0f} req/s, hf {len(work) / hf_s:,.0f} req/s", file=sys.stderr)
    import torch
    import transformers

    print(
        f"batch {args.batch_size}, float32; lm-eval {lm_eval.__version__}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores"
    )
    print(
        "| model | requests | llama_jax cold req/s | llama_jax warm req/s | hf backend req/s | warm / hf | cold / hf "
        "| max rel. diff | same is_greedy |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, cold, warm, hf_s, worst, same_greedy in rows:
        print(
            f"| {name} | {n} | {n / cold:,.0f} | {n / warm:,.0f} | {n / hf_s:,.0f} | {hf_s / warm:.2f}x | "
            f"{hf_s / cold:.2f}x | {worst:.1e} | {same_greedy:.0%} |"
        )


if __name__ == "__main__":
    main()
