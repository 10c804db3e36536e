"""Pretrain or fine-tune a LLaMA model.

    python train.py                                      # the default job: a small model on TinyShakespeare
    python train.py --config configs/tiny_test.yaml steps=50 run_dir=runs/try
    python train.py --config configs/sft_example.yaml init_from=models/stories260K
    python train.py --config configs/llama3_8b_v5p.yaml --compile-for v5p-128    # will it fit? (needs libtpu)
    python train.py --config configs/llama3_8b_h100.yaml --compile-for 8xH100    # (needs the gpu-compile extra)
    python train.py data='/data/*.jsonl' tokenizer=tokenizer.model --write-token-store gs://BUCKET/corpus

Settings are `key=value` overrides on top of the YAML file on top of the defaults (listed below, and in
configs/default.yaml). Rerunning the same command resumes from the run's newest checkpoint. Progress goes to
stderr, TensorBoard event files and metrics.jsonl (and a loss-curve PNG) in the run directory; stdout gets
a few sample generations and, as its last line, a JSON report:
{"step", "train_loss", "eval_loss", "eval_perplexity", "vocab_size", "checkpoint", ...}.

--compile-for TARGET compiles the train and eval steps for a TPU slice (v4-N, v5p-N, v5e-N, v6e-N), several
slices joined over DCN (2xv5p-128: the recipe's mesh is one slice's, the data axis spans the slices) or the
GPUs of one host (1xH100 to 8xH100, 8xH200) on this host, reading no data or weights, and prints per-chip
memory, whether it fits, the attention kernel, a roofline bound on step time and MFU, and across slices the
bytes each chip sends over DCN per step; the last line is JSON. Exit status 1: it does not fit.

--write-token-store URL tokenizes the configured data once into a tensorstore token store (gs://, file://
or a new local directory) that the hosts of a pod read with data=URL, each only its own rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llama_jax.commands.cli import ArgumentParser, program_name, run_cli
from llama_jax.commands.common import add_compile_for_argument, run_on_this_host
from llama_jax.train.config import describe_settings, load_train_config

PROGRAM = "python train.py"
PREEMPTED_STATUS = 143  # 128 + SIGTERM: the job did not finish, a scheduler should run it again
DOES_NOT_FIT_STATUS = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog=program_name(PROGRAM),
        description=__doc__,
        epilog="settings (key=value):\n" + describe_settings(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="a YAML file of settings (configs/*.yaml)")
    add_compile_for_argument(parser)
    parser.add_argument(
        "--write-token-store",
        metavar="URL",
        help="tokenize the data into a token store at URL (gs://, file://, a new directory)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings over the file's")
    args = parser.parse_intermixed_args(argv)
    if args.config is not None and "=" in args.config and not Path(args.config).is_file():
        parser.error(f"--config needs a YAML file, got {args.config!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    config = load_train_config(args.config, args.overrides)
    if args.compile_for is not None:
        return compile_for(config, args.compile_for)
    if args.write_token_store is not None:
        return write_token_store(config, args.write_token_store)
    job = (config.distributed.coordinator, config.distributed.num_processes, config.distributed.process_id)
    if None not in job or job == (None, None, None):  # a half-given job is refused by `multihost.initialize`
        status = run_on_this_host(job, "llama_jax.commands.train", argv, program_name(PROGRAM))
        if status is not None:
            return status
    from llama_jax.train import multihost
    from llama_jax.train.trainer import run

    multihost.initialize(config.distributed)  # before anything touches a device
    result = run(config)
    samples = result.pop("samples")
    for i, sample in enumerate(samples, 1):
        print(f"--- sample {i}: {sample['prompt']!r} ---\n{sample['prompt']}{sample['completion']}\n")
    print(json.dumps(result), flush=True)
    return PREEMPTED_STATUS if result["preempted"] else 0


def compile_for(config, target_name: str) -> int:
    from llama_jax.aot import report_json, report_table
    from llama_jax.hardware import compile_target
    from llama_jax.train.compile import compile_training

    target = compile_target(target_name)
    reports = compile_training(config, target)
    print(report_table(target, reports))
    summary = report_json(target, reports)
    print(json.dumps(summary), flush=True)
    if not summary["fits"]:
        too_big = [r.name for r in reports if not r.fits]
        print(
            f"error: {', '.join(too_big)} {'does' if len(too_big) == 1 else 'do'} not fit in the memory of one chip "
            f"of {target.name}: lower the per-chip batch, "
            "add remat, or shard more (mesh.fsdp, mesh.tensor)",
            file=sys.stderr,
        )
        return DOES_NOT_FIT_STATUS
    return 0


def write_token_store(config, location: str) -> int:
    from llama_jax.model_dir import read_model_dir
    from llama_jax.train.data import build_token_store
    from llama_jax.train.init_from import chat_template, resolve_tokenizer

    url = location if "://" in location else Path(location).absolute().as_uri()
    source = read_model_dir(config.init_from) if config.init_from else None
    config = resolve_tokenizer(config, source)
    print(json.dumps(build_token_store(config, chat_template(config, source), url)))
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":  # a multi-host job's process (`hosts.py`)
    cli()
