"""Batch generation from a model directory.

    python infer.py --checkpoint DIR --prompts prompts.txt --output out.jsonl
    python infer.py --checkpoint DIR --prompt "Once upon a time" --temperature 0
    cat prompts.jsonl | python infer.py --checkpoint DIR --prompts - --chat

Prompts come from --prompt (repeatable), a file (one prompt per line, or JSONL with a "prompt" field) or
standard input. Each output line is a JSON record, in input order: prompt, completion, token_ids (the
generated ids; a stop id that ends generation is not included) and finish_reason ("stop" | "length");
`--format text` prints each prompt followed by its completion as plain text instead, a blank line after each.
BOS is prepended to every prompt. With --output, records are written batch by batch as they finish, and
rerunning the same command continues after the records already there.

    python infer.py --compile-for v5e-8 --model llama3-8b --mesh tensor=8 --max-num-seqs 32 --prompt-len 4096

compiles the engine's own programs for that setting (the prefill of each --prompt-len's bucket, the decode
loop of --max-num-seqs sequences over a cache of the longest prompt + --max-new-tokens) for a TPU slice on
this host (needs libtpu; no weights, no tokenizer) and prints per-chip memory, whether it fits, the attention
kernel and a roofline bound; the last line is JSON. Exit status 1: it does not fit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llama_jax.commands.cli import ArgumentParser, program_name, run_cli
from llama_jax.commands.common import (
    add_compile_for_argument,
    add_generation_arguments,
    add_job_arguments,
    add_model_arguments,
    compile_engine_for,
    engine_settings,
    generation_job,
    job_process,
    join_job,
    load_from,
    run_settings,
)
from llama_jax.errors import errors_naming

PROGRAM = "python infer.py"
STDOUT = "standard output"  # where records go without --output
PROMPT_LEN_HELP = (
    "prompt lengths whose prefill to compile (default 1024); the cache holds the longest + --max-new-tokens"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog=program_name(PROGRAM),
        description="Generate completions of prompts with a llama_jax model directory.",
    )
    add_model_arguments(parser, checkpoint_required=False)
    parser.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt; repeat for several")
    parser.add_argument(
        "--prompts", metavar="FILE", help='one prompt per line, or JSONL with a "prompt" field; - reads standard input'
    )
    parser.add_argument(
        "--output",
        metavar="FILE.jsonl",
        help="where records go (default: standard output); an existing file is resumed",
    )
    parser.add_argument(
        "--format",
        choices=("jsonl", "text"),
        default="jsonl",
        help="jsonl: one JSON record per prompt (default); text: each prompt and its completion as plain text, "
        "separated by blank lines (standard output only)",
    )
    add_generation_arguments(parser, temperature=0.6, max_new_tokens=256)
    add_job_arguments(parser)
    compile_group = parser.add_argument_group("compiling for a TPU slice or GPUs instead of generating")
    add_compile_for_argument(compile_group)
    compile_group.add_argument(
        "--model", metavar="NAME", help="a preset, model YAML or model directory (only its config.json is read)"
    )
    compile_group.add_argument("--prompt-len", type=int, nargs="+", default=[1024], metavar="P", help=PROMPT_LEN_HELP)
    args = parser.parse_args(argv)
    if args.compile_for is None and args.checkpoint is None:
        parser.error("the following arguments are required: --checkpoint")
    if args.format == "text" and args.output:
        parser.error("--format text prints to standard output; --output writes JSONL records")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.compile_for is not None:
        return compile_for(args)
    status = job_process(args, "llama_jax.commands.infer", argv, program_name(PROGRAM))
    if status is not None:
        return status
    join_job(args)
    # Everything a user can get wrong is checked before the parameters are loaded and anything compiles. On a
    # multi-host job process 0 reads the prompts and the output (every process runs the same engine steps over
    # them) and writes the records; the other processes write nothing.
    from llama_jax.distributed import Shared, is_leader
    from llama_jax.inference.results_file import JsonlOutput

    shared = Shared("infer")
    prompts = shared.value(lambda: read_prompts(args))
    job = generation_job(args, prompts, "infer.py needs one to read text prompts")
    output = None

    def resume_point() -> int:
        nonlocal output
        output = JsonlOutput(args.output, prompts, run_settings(args, job.model_dir, job.settings))
        return output.done

    first = shared.value(resume_point) if args.output else 0
    if first == len(prompts):
        if is_leader():
            print(f"all {len(prompts)} records are already in {args.output}", file=sys.stderr)
        return 0
    try:
        summary = run_generation(args, job, prompts, first, output)
    finally:
        if output:
            output.close()
    if is_leader():
        print(summary, file=sys.stderr)
    return 0


def read_prompts(args: argparse.Namespace) -> list[str]:
    """Prompts from --prompt values, or from --prompts FILE ("-" is standard input)."""
    from llama_jax.inference.prompt_files import read_prompt_file

    if args.prompt and args.prompts is not None:
        raise ValueError("give prompts with --prompt or with --prompts FILE, not both")
    if args.prompt:
        return list(args.prompt)
    if args.prompts is None:
        raise ValueError("no prompts: give --prompt TEXT or --prompts FILE (- reads standard input)")
    return read_prompt_file(args.prompts)


def run_generation(args, job, prompts, first, output) -> str:
    """Run prompts[first:] through the engine and write their records in input order (process 0 of a
    multi-host job; the others only compute); returns a summary line."""
    from tqdm import tqdm

    from llama_jax.distributed import is_leader
    from llama_jax.inference.batch import generate_in_order

    leader = is_leader()

    def write(ready) -> None:
        if not leader:
            return
        records = [
            {
                "prompt": prompts[index],
                "completion": result.text,
                "token_ids": result.token_ids,
                "finish_reason": result.finish_reason,
            }
            for index, result in ready
        ]
        if output:
            output.write(records)
            return
        if args.format == "text":
            text = "".join(f"{r['prompt']}{r['completion']}\n\n" for r in records)
        else:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with errors_naming(STDOUT):  # redirected to a file on a full disk, say: the error line names where
            sys.stdout.write(text)
            sys.stdout.flush()

    def compiling(program) -> None:
        if leader:
            tqdm.write(f"compiling {program.describe()}", file=sys.stderr)

    loaded = load_from(args, job.mesh)
    progress = args.prompts is not None and leader
    status = generate_in_order(
        loaded,
        job.prompt_ids,
        job.settings,
        write,
        engine=job.engine,
        first=first,
        progress=progress,
        on_compile=compiling,
    )
    return (
        f"{len(prompts) - first} completions{f' written to {args.output}' if output else ''}; "
        f"{status.max_num_seqs} decode slots; prompt buckets compiled: {status.prefill_buckets()}"
    )


def compile_for(args: argparse.Namespace) -> int:
    from llama_jax.config import load_model_config
    from llama_jax.model_dir import read_model_dir

    source = args.model or args.checkpoint
    if source is None:
        raise ValueError("--compile-for needs --model NAME (a preset, model YAML or model directory)")
    model = read_model_dir(source).config if Path(source, "config.json").is_file() else load_model_config(source)
    needed = max(args.prompt_len) + args.max_new_tokens
    if needed > model.max_seq_len:
        raise ValueError(
            f"--prompt-len + --max-new-tokens = {needed} exceeds the model's max_seq_len {model.max_seq_len}"
        )
    settings = engine_settings(args, max_model_len=needed)
    return compile_engine_for(args.compile_for, model, args.mesh, settings, args.prompt_len, args.dtype, args.quantize)


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":  # a multi-host job's process (`hosts.py`)
    cli()
