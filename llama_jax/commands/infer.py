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

    python infer.py --checkpoint DIR --prompts prompts.txt --json-schema person.json --temperature 0

holds every completion to a JSON schema (or --json-object, --regex, --choice, --grammar FILE.lark): the
grammar engine masks each step's disallowed tokens, so the text is valid by construction; a completion that
ran out of --max-new-tokens first says finish_reason "length".

    python infer.py --compile-for v5e-8 --model llama3-8b --mesh tensor=8 --max-num-seqs 32 --prompt-len 4096

compiles the engine's own programs for that setting (the prefill of each --prompt-len's bucket, the decode
loop of --max-num-seqs sequences over a cache of the longest prompt + --max-new-tokens) for a TPU slice on
this host (needs libtpu; no weights, no tokenizer) and prints per-chip memory, whether it fits, the attention
kernel and a roofline bound; the last line is JSON. Exit status 1: it does not fit.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    _add_structured_output_arguments(parser)
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


def _add_structured_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "structured outputs: every completion follows one (a grammar engine masks the tokens it does not allow)"
    ).add_mutually_exclusive_group()
    group.add_argument("--json-schema", metavar="FILE", help="JSON valid for the JSON schema in FILE")
    group.add_argument("--json-object", action="store_true", help="a JSON object")
    group.add_argument("--regex", metavar="PATTERN", help="text matching PATTERN (Rust regex syntax)")
    group.add_argument("--choice", action="append", metavar="TEXT", help="exactly one of these; repeat for each")
    group.add_argument("--grammar", metavar="FILE", help="text of the Lark grammar in FILE (llguidance's dialect)")


def structured_output(args: argparse.Namespace):
    """The Constraint the structured-output flags ask for, or None; a file that is not there or a schema that
    is not JSON is a ValueError naming the flag."""
    from llama_jax.inference.constraints import Constraint

    if args.json_schema is not None:
        text = _read_text(args.json_schema, "--json-schema")
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--json-schema {args.json_schema} is not JSON: {e}") from None
        return Constraint("json_schema", text)
    if args.json_object:
        return Constraint("json_object")
    if args.regex is not None:
        return Constraint("regex", args.regex)
    if args.choice:
        return Constraint("choice", json.dumps(args.choice))
    if args.grammar is not None:
        return Constraint("lark", _read_text(args.grammar, "--grammar"))
    return None


def _read_text(path: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _check_structured_output(job, constraint) -> None:
    """A grammar llguidance cannot compile is refused before any weights are read."""
    from llama_jax.inference.constraints import Grammars

    Grammars(job.model_dir.tokenizer(), job.model_dir.config.vocab_size).check(constraint)


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
    constraint = structured_output(args)
    if constraint is not None:
        _check_structured_output(job, constraint)
        job = dataclasses.replace(job, settings=dataclasses.replace(job.settings, constraint=constraint))
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
