"""A training run directory: created whole, refused when it holds anything else, resumed only by the same run.

    RUN_DIR/config.json            the model (checkpoint.py's format: `llama_jax.load(RUN_DIR)` and
    RUN_DIR/tokenizer.model        `infer.py --checkpoint RUN_DIR` use the newest step)
    RUN_DIR/train_config.json      the run's settings and fingerprint: what a rerun must match to resume
    RUN_DIR/checkpoints/           the checkpoints (checkpoints.py)
    RUN_DIR/metrics.jsonl, tensorboard/   the logs (metrics.py)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from llama_jax.checkpoint import write_config
from llama_jax.config import COMPUTE_FIELDS, ModelConfig
from llama_jax.staging import staged_output_dir
from llama_jax.train.config import TrainConfig

RUN_FILE = "train_config.json"
RUN_FORMAT = "llama_jax-train"
# Settings that change what a run computes; a rerun in the same run_dir must match them to resume.
TRAJECTORY_KEYS = ("init_from", "sft", "val_fraction", "steps", "batch_size", "seq_len", "seed", "lr", "warmup",
                   "min_lr_ratio", "weight_decay", "beta1", "beta2", "adam_eps", "grad_clip", "z_loss")


def run_fingerprint(config: TrainConfig, model_config: ModelConfig, corpus_key: str) -> dict[str, Any]:
    """What a rerun must match to resume: the model's shape, the corpus as tokenized (its key covers the
    data bytes, the tokenizer and the tokenizing options) and the optimisation settings."""
    model = {k: v for k, v in model_config.to_dict().items() if k not in COMPUTE_FIELDS}
    return {"model": model, "corpus": corpus_key, **{k: getattr(config, k) for k in TRAJECTORY_KEYS}}


def read_run(run_dir: Path) -> dict | None:
    """The stored settings of the run in `run_dir`; None for a new or empty directory. Anything else in
    the directory is refused: a run never writes over files it did not make."""
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return None
    run_file = run_dir / RUN_FILE
    if not run_dir.is_dir() or not run_file.is_file():
        raise ValueError(f"run_dir {run_dir} exists and is not a training run (no {RUN_FILE}); "
                         "choose a new run_dir")
    try:
        stored = json.loads(run_file.read_text())
    except json.JSONDecodeError:
        stored = None
    valid = isinstance(stored, dict) and stored.get("format") == RUN_FORMAT
    if not valid or not isinstance(stored.get("fingerprint"), dict):
        raise ValueError(f"{run_file} is corrupt; choose a new run_dir")
    return stored


def check_same_run(run_dir: Path, stored: dict, fingerprint: dict[str, Any]) -> None:
    """Refuse to resume a run whose settings differ in anything that changes its result."""
    old = stored["fingerprint"]
    differences = [f"{key}: {old.get(key)!r} there, {value!r} now"
                   for key, value in fingerprint.items() if old.get(key) != value]
    if differences:
        raise ValueError(f"run_dir {run_dir} holds a different run ({'; '.join(differences[:4])}"
                         f"{'; ...' if len(differences) > 4 else ''}); use a new run_dir, or the same settings "
                         "to resume it")


def create_run_dir(run_dir: Path, model: ModelConfig, tokenizer_path: Path, tokenizer_name: str,
                   chat_template: str | None, settings: dict, fingerprint: dict[str, Any]) -> None:
    """Write the run's files, assembled beside run_dir and renamed into place: a run directory either
    holds all of them or does not exist."""
    with staged_output_dir(run_dir) as staging:
        shutil.copyfile(tokenizer_path, staging / tokenizer_name)
        write_config(staging, model, tokenizer_name, chat_template)
        payload = {"format": RUN_FORMAT, "settings": settings, "fingerprint": fingerprint}
        (staging / RUN_FILE).write_text(json.dumps(payload, indent=2) + "\n")
