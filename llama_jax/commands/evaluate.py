"""`python -m llama_jax.evaluate`: scoring a model (installed as `llama-jax-eval`).

    python -m llama_jax.evaluate --checkpoint DIR --data FILE [--max-model-len N] [--dtype float32]
                                 [--batch-size B] [--mesh data=..,fsdp=..,tensor=..]
    python -m llama_jax.evaluate --held-out RUN_DIR [--dtype float32] [--mesh ...]
    python -m llama_jax.evaluate generate --checkpoint DIR --data TASK.jsonl [--output OUT.jsonl]
                                 [--metrics bleu,rouge,exact_match] [--chat] [--stop TEXT] [--max-num-seqs N]
                                 [sampling flags]
    python -m llama_jax.evaluate harness --checkpoint DIR --tasks hellaswag,arc_easy [--num-fewshot N]
                                 [--limit N] [--include-path DIR] [--output FILE] [--batch-size B]
                                 [--max-model-len N]

Perplexity of FILE as one document (llama_jax/evaluate/perplexity.py says how), or of the validation rows a
training run held out, exactly as its evaluation scored them (llama_jax/evaluate/held_out.py); the last
stdout line is JSON with `perplexity`, `nll_per_token` and `tokens`.

`generate` completes each record's prompt (greedy unless told otherwise) and scores the completions against
the references: corpus BLEU (sacrebleu), ROUGE-1/2/L/Lsum F1 (rouge-score, stemmed) and exact match, 0-100
(llama_jax/evaluate/text_metrics.py). The last stdout line is JSON with `examples` and one key per metric.

`harness` runs lm-evaluation-harness tasks with llama_jax as the model (llama_jax/evaluate/harness.py; needs
`pip install -e ".[eval]"`): the harness's table, then as the last stdout line JSON {"results": {TASK:
{METRIC: value}}} in the harness's own metric names.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

from llama_jax.commands.cli import ArgumentParser, program_name, run_cli
from llama_jax.commands.common import (
    add_generation_arguments,
    add_job_arguments,
    add_max_model_len_argument,
    add_model_arguments,
    generation_job,
    job_process,
    join_job,
    load_from,
    mesh_from,
    run_settings,
    text_model_dir,
)

PROG = "python -m llama_jax.evaluate"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "generate":
        return generate(argv[1:], argv)
    if argv and argv[0] == "harness":
        return harness(argv[1:], argv)
    return perplexity(argv[1:] if argv and argv[0] == "perplexity" else argv, argv)


def _on_every_host(args: argparse.Namespace, command: list[str]) -> int | None:
    """This host's share of a multi-host job: its work in a child process (the exit status), or None to go
    on here, joined. Every process scores the same inputs in lockstep; process 0 reads them and prints."""
    status = job_process(args, "llama_jax.commands.evaluate", command, program_name(PROG))
    if status is None:
        join_job(args)
    return status


def perplexity(argv: list[str], command: list[str]) -> int:
    parser = ArgumentParser(
        prog=program_name(PROG), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser, checkpoint_required=False)
    parser.add_argument("--data", help="UTF-8 text file, scored as one document")
    parser.add_argument(
        "--held-out",
        metavar="RUN_DIR",
        help="instead: the training run's own validation rows, scored by its newest checkpoint",
    )
    add_max_model_len_argument(parser, "--seq-len", "window length (default: the model's max_seq_len)")
    parser.add_argument("--batch-size", type=int, help="windows per step (default: one per data-parallel device)")
    add_job_arguments(parser)
    args = parser.parse_args(argv)
    if args.held_out is not None:
        if args.checkpoint or args.data or args.max_model_len or args.batch_size:
            raise ValueError(
                "--held-out scores the run's own rows: drop --checkpoint, --data, --max-model-len, --batch-size"
            )
    elif not (args.checkpoint and args.data):
        raise ValueError(
            "give --checkpoint DIR --data FILE, or --held-out RUN_DIR (or a subcommand: generate, harness)"
        )
    status = _on_every_host(args, command)
    if status is not None:
        return status
    from llama_jax.distributed import is_leader

    mesh = mesh_from(args)
    if args.held_out is not None:
        from llama_jax.evaluate.held_out import held_out_loss

        report = held_out_loss(args.held_out, mesh, args.dtype, args.quantize)
    else:
        report = _perplexity_of_file(args, mesh)
    if is_leader():
        print(json.dumps(report))
    return 0


def _perplexity_of_file(args: argparse.Namespace, mesh) -> dict:
    from llama_jax.distributed import Shared, is_leader
    from llama_jax.evaluate.perplexity import perplexity, windows

    model_dir = text_model_dir(args.checkpoint, "cannot encode the data")
    tokenizer = model_dir.tokenizer()
    max_len = model_dir.config.max_seq_len
    seq_len = max_len if args.max_model_len is None else args.max_model_len
    if not 2 <= seq_len <= max_len:
        raise ValueError(f"--max-model-len must be between 2 and the model's max_seq_len {max_len}, got {seq_len}")
    text = Shared("perplexity").value(lambda: _document(args.data))
    ids = tokenizer.encode(text, bos=True)
    batch_size = args.batch_size
    if batch_size is None:
        batch_size = min(mesh.shape["data"] * mesh.shape["fsdp"], len(windows(ids, seq_len)))
    if batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    return perplexity(load_from(args, mesh), ids, seq_len, batch_size, progress=is_leader())


def _document(path: str) -> str:
    text = Path(path).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"data file {path} is empty")
    return text


def generate(argv: list[str], command: list[str]) -> int:
    parser = ArgumentParser(
        prog=f"{program_name(PROG)} generate",
        description="Complete a task's prompts and score them against its references.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--data",
        required=True,
        metavar="TASK.jsonl",
        help='records {"prompt": ..., "reference": ...} or {"prompt": ..., "references": [...]}',
    )
    parser.add_argument(
        "--output",
        metavar="OUT.jsonl",
        help="per-example records and scores; an existing file of the same settings is resumed",
    )
    parser.add_argument(
        "--metrics", default="bleu,rouge,exact_match", help="comma-separated: bleu, rouge, exact_match (default: all)"
    )
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="a string that ends a completion (not included); repeat for several",
    )
    add_generation_arguments(parser, temperature=0.0, max_new_tokens=64)
    add_job_arguments(parser)
    args = parser.parse_args(argv)
    status = _on_every_host(args, command)
    if status is not None:
        return status
    # Everything a user can get wrong is checked before the parameters load.
    from llama_jax.distributed import Shared, is_leader
    from llama_jax.evaluate.generation_task import TaskRecord, read_task, run_task
    from llama_jax.evaluate.text_metrics import TextScorer, parse_metrics
    from llama_jax.inference.results_file import JsonlOutput

    metrics = parse_metrics(args.metrics)
    if any(not stop for stop in args.stop):
        raise ValueError("--stop needs a non-empty string")
    shared = Shared("evaluate-generate")
    task = shared.value(lambda: [[r.prompt, list(r.references)] for r in read_task(args.data)])
    records = [TaskRecord(prompt, tuple(references)) for prompt, references in task]
    job = generation_job(args, [record.prompt for record in records], "cannot encode the prompts")
    scorer = TextScorer(metrics)
    output = None

    def resume_point() -> int:
        nonlocal output
        stored = {**run_settings(args, job.model_dir, job.settings), "stop": args.stop, "metrics": list(metrics)}
        output = JsonlOutput(args.output, [r.prompt for r in records], stored, writer="evaluate generate")
        return output.done

    first = shared.value(resume_point) if args.output else 0
    try:
        loaded = None if first == len(records) else load_from(args, job.mesh)
        stops = tuple(args.stop)
        summary = run_task(
            loaded, records, job.prompt_ids, job.settings, job.engine, scorer, stops, output, is_leader(), first
        )
    finally:
        if output:
            output.close()
    if not is_leader():
        return 0
    if "bleu_signature" in summary:
        print(f"sacrebleu signature: {summary['bleu_signature']}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def harness(argv: list[str], command: list[str]) -> int:
    parser = ArgumentParser(
        prog=f"{program_name(PROG)} harness", description="Run lm-evaluation-harness tasks with a llama_jax model."
    )
    add_model_arguments(parser)
    parser.add_argument("--tasks", required=True, help="comma-separated harness task names, e.g. hellaswag,arc_easy")
    parser.add_argument("--num-fewshot", type=int, metavar="N", help="few-shot examples (default: each task's own)")
    parser.add_argument(
        "--limit",
        type=float,
        metavar="N",
        help="only the first N documents of each task (a fraction below 1: that share)",
    )
    parser.add_argument("--include-path", metavar="DIR", help="a folder of extra task YAMLs")
    parser.add_argument("--output", metavar="FILE.json", help="the harness's full results (and per-sample logs)")
    parser.add_argument(
        "--batch-size", type=int, default=16, metavar="B", help="requests scored per forward pass (default 16)"
    )
    add_max_model_len_argument(parser, "--max-length", "context length (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="the harness's seeds (few-shot sampling)")
    add_job_arguments(parser)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    status = _on_every_host(args, command)
    if status is not None:
        return status
    # Every process builds the same tasks (their documents, few-shot examples, seeds) and asks the model the
    # same questions in the same order, so their scoring runs in lockstep; process 0 prints and writes.
    from llama_jax.distributed import Shared, is_leader
    from llama_jax.evaluate.harness import evaluate_tasks, find_tasks, metric_values, write_results

    Shared("harness").value(lambda: _new_output(args.output))
    tasks, task_manager = find_tasks(args.tasks, args.include_path)
    mesh = mesh_from(args)
    text_model_dir(args.checkpoint, "the harness works on text")
    loaded = load_from(args, mesh)
    # The harness's progress bars ignore TQDM_DISABLE: the other processes' are kept off their hosts' terminals.
    quiet = contextlib.nullcontext() if is_leader() else contextlib.redirect_stderr(io.StringIO())
    with quiet:
        results = evaluate_tasks(
            loaded,
            tasks,
            task_manager,
            batch_size=args.batch_size,
            max_length=args.max_model_len,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            seed=args.seed,
            log_samples=bool(args.output),
        )
    if not is_leader():
        return 0
    from lm_eval.utils import make_table

    print(make_table(results))
    if args.output:
        write_results(results, args.output)
    print(json.dumps({"results": metric_values(results)}))
    return 0


def _new_output(path: str | None) -> None:
    if path and Path(path).exists():
        raise ValueError(f"{path} exists; choose another output file")


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":  # a multi-host job's process (`hosts.py`)
    cli()
