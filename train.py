"""Pretrain or fine-tune a LLaMA model.

    python train.py                                      # the default job: a small model on TinyShakespeare
    python train.py --config configs/tiny_test.yaml steps=50 run_dir=runs/try
    python train.py --config configs/sft_example.yaml init_from=models/stories260k

Settings are `key=value` overrides on top of the YAML file on top of the defaults (configs/default.yaml
lists every key). Rerunning the same command resumes from the run's newest checkpoint. Progress goes to
stderr; stdout gets a few sample generations and, as its last line, a JSON report:
{"step", "train_loss", "eval_loss", "eval_perplexity", "vocab_size", "checkpoint", ...}.
"""
from __future__ import annotations

import json
import sys

from llama_jax.cli import run_cli
from llama_jax.train import multihost
from llama_jax.train.config import load_train_config
from llama_jax.train.trainer import run

PREEMPTED_STATUS = 143  # 128 + SIGTERM: the job did not finish, a scheduler should run it again


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """(config file, key=value overrides) from `[--config FILE] [key=value ...]` in any order."""
    config_file, overrides = None, []
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            config_file = next(args, None)
            if config_file is None or "=" in config_file:
                raise ValueError("--config needs a YAML file")
        elif arg.startswith("--config="):
            config_file = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ValueError(f"unknown option {arg!r}; usage: python train.py [--config FILE] [key=value ...]")
        else:
            overrides.append(arg)
    return config_file, overrides


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        return 0
    config_file, overrides = parse_args(argv)
    config = load_train_config(config_file, overrides)
    multihost.initialize(config.distributed)  # before anything touches a device
    result = run(config)
    samples = result.pop("samples")
    for i, sample in enumerate(samples, 1):
        print(f"--- sample {i}: {sample['prompt']!r} ---\n{sample['prompt']}{sample['completion']}\n")
    print(json.dumps(result), flush=True)
    return PREEMPTED_STATUS if result["preempted"] else 0


if __name__ == "__main__":
    run_cli(main)
