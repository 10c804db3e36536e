"""What the command lines share: the model flags and loading a model from them; the generation flags and the
settings they make; compiling the engine for a TPU slice or GPUs.

    --checkpoint DIR --dtype D --quantize int8 --mesh data=..,fsdp=..,tensor=..   (infer, evaluate, serve)
    --max-new-tokens --temperature --top-p --top-k --seed --batch-size --chat --stop-id   (infer, evaluate generate)

Nothing here imports JAX at module level: `--help` and a mistyped flag answer before JAX starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llama_jax.config import DTYPES, QUANTIZE_MODES

CHECKPOINT_HELP = "a model directory (from llama_jax.convert) or a training run directory"


def add_model_arguments(parser: argparse.ArgumentParser, *, checkpoint_required: bool = True) -> None:
    """--checkpoint, --dtype, --quantize, --mesh."""
    parser.add_argument("--checkpoint", metavar="DIR", required=checkpoint_required, help=CHECKPOINT_HELP)
    parser.add_argument("--dtype", choices=DTYPES, help="parameter and compute dtype (default: the checkpoint's)")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        default="none",
        help="int8: projection weights stored int8 with per-channel scales (half of bf16's bytes)",
    )
    parser.add_argument(
        "--mesh",
        default="",
        metavar="data=..,tensor=..",
        help="device mesh, e.g. data=2,tensor=4 (default: data-parallel over all devices)",
    )


def mesh_from(args: argparse.Namespace):
    """The device mesh --mesh describes (checked before anything is loaded)."""
    from llama_jax.sharding import MeshConfig, make_mesh

    return make_mesh(MeshConfig.parse(args.mesh))


def load_from(args: argparse.Namespace, mesh, checkpoint: str | Path | None = None):
    """The model of --checkpoint (or `checkpoint`) on `mesh`, in --dtype, quantized as --quantize says."""
    from llama_jax.loading import load

    return load(checkpoint or args.checkpoint, mesh=mesh, dtype=args.dtype, quantize=args.quantize)


def text_model_dir(path: str | Path, purpose: str):
    """The model directory at `path`, refused in one line when it has no tokenizer: `purpose` says why the
    command needs one ("infer.py reads text prompts")."""
    from llama_jax.model_dir import read_model_dir

    model_dir = read_model_dir(path)
    if model_dir.tokenizer_path is None:
        raise ValueError(f"{path} has no tokenizer file; {purpose}")
    return model_dir


def add_generation_arguments(parser: argparse.ArgumentParser, temperature: float, max_new_tokens: int) -> None:
    """The generation settings' flags: infer.py's defaults sample, `evaluate generate`'s are greedy and shorter."""
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        metavar="N",
        help=f"most tokens generated per prompt (default {max_new_tokens})",
    )
    parser.add_argument(
        "--temperature", type=float, default=temperature, metavar="T", help=f"0 is greedy (default {temperature:g})"
    )
    parser.add_argument(
        "--top-p", type=float, default=0.9, metavar="P", help="nucleus mass in (0, 1]; 1 turns it off (default 0.9)"
    )
    parser.add_argument(
        "--top-k", type=int, default=0, metavar="K", help="keep the K most likely tokens; 0 turns it off (default)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="a prompt's samples depend only on the seed and its position in the input",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        metavar="B",
        help="decode slots: prompts decoded together, each refilled when its completion ends "
        "(default 8; results never depend on it)",
    )
    parser.add_argument(
        "--chat", action="store_true", help="wrap each prompt as a user message in the checkpoint's chat template"
    )
    parser.add_argument(
        "--stop-id",
        type=int,
        action="append",
        default=[],
        metavar="ID",
        help="an extra token id that ends a completion (the tokenizer's EOS always does)",
    )


def generation_settings(args: argparse.Namespace):
    """The settings, checked once here (their errors name the setting: top_p for --top-p)."""
    from llama_jax.inference.sampling import SamplingParams
    from llama_jax.inference.settings import GenerationSettings

    return GenerationSettings(
        args.max_new_tokens,
        SamplingParams(args.temperature, args.top_k, args.top_p),
        args.seed,
        args.batch_size,
        args.chat,
        tuple(args.stop_id),
    )


def run_settings(args: argparse.Namespace, model_dir, settings) -> dict:
    """What the records of an output depend on: a rerun must match it to add to them. (Not the batch size
    or the mesh: a prompt's tokens do not depend on them.)"""
    sampling = settings.sampling
    return {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "params": str(model_dir.params_path.resolve()),
        "dtype": args.dtype,
        "quantize": args.quantize,
        "chat": settings.chat,
        "max_new_tokens": settings.max_new_tokens,
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "seed": settings.seed,
        "stop_ids": sorted(settings.stop_ids),
    }


def compile_engine_for(
    target_name: str,
    model,
    mesh: str,
    slots: int,
    prompt_lens: list[int],
    max_new_tokens: int,
    dtype: str | None,
    prefill_chunk: int | None = None,
    prefix_cache_tokens: int | None = None,
) -> int:
    """infer.py and serve --compile-for: the engine's programs compiled for a TPU slice or GPUs (its prefix pool as the
    engine would size it); prints the table and, last, the JSON report. Exit status 1 when they do not fit."""
    import json
    import sys

    from llama_jax.aot import report_json, report_table
    from llama_jax.hardware import compile_target
    from llama_jax.inference.compile import compile_inference
    from llama_jax.inference.engine import default_prefix_cache_tokens
    from llama_jax.inference.slots import PREFILL_CHUNK
    from llama_jax.sharding import MeshConfig

    target = compile_target(target_name)
    dtype = dtype or "bfloat16"
    model = model.replace(dtype=dtype, param_dtype=dtype)
    chunk = prefill_chunk or PREFILL_CHUNK
    cache_len = max(prompt_lens) + max_new_tokens
    if prefix_cache_tokens is None:
        prefix_cache_tokens = default_prefix_cache_tokens(slots, cache_len, chunk)
    reports = compile_inference(
        model, target, MeshConfig.parse(mesh), slots, prompt_lens, max_new_tokens, chunk, prefix_cache_tokens // chunk
    )
    print(report_table(target, reports))
    summary = report_json(target, reports)
    print(json.dumps(summary), flush=True)
    if not summary["fits"]:
        print(
            f"error: this setting does not fit in the memory of one chip of {target.name}: fewer decode slots, "
            "a shorter context, or shard more (--mesh tensor=N)",
            file=sys.stderr,
        )
        return 1
    return 0


def describe_program(program: tuple) -> str:
    """An engine program (`slots.SlotBackend.programs`) in words, for the status line of its compile."""
    if program[0] == "prefill":
        _, rows, bucket = program
        return f"the prefill of {rows} prompt{'s' if rows > 1 else ''} of up to {bucket} tokens"
    if program[0] == "admit":
        return f"the sampling of the first token of {program[1]} prompt{'s' if program[1] > 1 else ''}"
    return "the decode loop"
