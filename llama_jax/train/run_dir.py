"""A training run directory: created whole, written by one process at a time, resumed only by the same run.

RUN_DIR/config.json            the model (model_dir.py's format: `llama_jax.load(RUN_DIR)` and
RUN_DIR/tokenizer.model        `infer.py --checkpoint RUN_DIR` use the newest intact step)
RUN_DIR/train_config.json      the run's settings and fingerprint: what a rerun must match to resume
RUN_DIR/.lock                  held (flock) by the process training in it
RUN_DIR/checkpoints/           the checkpoints (checkpoints.py); damaged ones are moved to damaged/
RUN_DIR/metrics.jsonl, tensorboard/   the logs (metrics.py)
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, TextIO

from llama_jax.config import COMPUTE_FIELDS, ModelConfig
from llama_jax.errors import errors_naming
from llama_jax.model_dir import CHECKPOINTS_DIR, CONFIG_FILE, write_config
from llama_jax.staging import staged_output_dir
from llama_jax.train.config import TrainConfig
from llama_jax.train.rewards import RewardSpec, parse_reward_specs

RUN_FILE = "train_config.json"
RUN_FORMAT = "llama_jax-train"
LOCK_FILE = ".lock"
# Settings that change what a run computes; a rerun in the same run_dir must match them to resume.
TRAJECTORY_KEYS = (
    "init_from",
    "sft",
    "val_fraction",
    "steps",
    "batch_size",
    "seq_len",
    "seed",
    "lr",
    "warmup",
    "min_lr_ratio",
    "weight_decay",
    "beta1",
    "beta2",
    "adam_eps",
    "grad_clip",
    "z_loss",
)


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """What a run directory holds besides its checkpoints and logs."""

    model: ModelConfig
    tokenizer_path: Path  # copied in as tokenizer_name
    tokenizer_name: str
    chat_template: str | None
    settings: dict[str, Any]
    fingerprint: dict[str, Any]
    lora_base: Path | None = None  # LoRA: the init_from directory the adapters sit on

    def write(self, directory: Path) -> None:
        shutil.copyfile(self.tokenizer_path, directory / self.tokenizer_name)
        write_config(directory, self.model, self.tokenizer_name, self.chat_template, self.lora_base)
        payload = {"format": RUN_FORMAT, "settings": self.settings, "fingerprint": self.fingerprint}
        (directory / RUN_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def run_fingerprint(config: TrainConfig, model_config: ModelConfig, corpus_key: str) -> dict[str, Any]:
    """What a rerun must match to resume: the model's shape, the corpus as tokenized (its key covers the
    data bytes, the tokenizer and the tokenizing options) and the optimisation settings."""
    model = {k: v for k, v in model_config.to_dict().items() if k not in COMPUTE_FIELDS}
    fingerprint = {"model": model, "corpus": corpus_key, **{k: getattr(config, k) for k in TRAJECTORY_KEYS}}
    if config.objective != "lm":  # (absent for next-token runs, so that runs made before DPO existed still resume)
        fingerprint |= {"objective": config.objective, "dpo": dataclasses.asdict(config.dpo)}
    if config.objective == "grpo":  # what samples and scores the rollouts
        reward = [_reward_fingerprint(spec) for spec in parse_reward_specs(config.reward)]
        weights = config.reward_weights
        fingerprint |= {"grpo": dataclasses.asdict(config.grpo), "reward": reward, "reward_weights": weights}
    return fingerprint


def _reward_fingerprint(spec: RewardSpec) -> str:
    """A reward= entry as the run depends on it: a built-in as written; a file's function by the SHA-256 of the
    file's bytes (an edited reward is another run; the same file moved is not)."""
    if spec.path is None:
        return spec.text
    return f"sha256:{hashlib.sha256(spec.path.read_bytes()).hexdigest()}:{spec.argument}"


def open_run_dir(run_dir: Path, files: RunFiles) -> TextIO:
    """Create `run_dir` for this run, or check that it holds this run, and lock it: the returned open lock
    file keeps any other process out until it is closed (or this one dies).

    A directory that holds anything else is refused and left as it is. One that holds the settings of a run
    that never saved a checkpoint (say, refused by a check after it was created) takes the new settings;
    model files missing from it are written again."""
    if _read_run(run_dir) is None:
        try:
            with staged_output_dir(run_dir) as staging, errors_naming(run_dir):
                files.write(staging)
                (staging / LOCK_FILE).touch()
        except (ValueError, OSError):
            if not run_dir.is_dir():
                raise
            # another process created it since the check above: the lock below decides who trains
    lock = _lock(run_dir)
    stored = _read_run(run_dir)
    if stored["fingerprint"] != files.fingerprint and has_checkpoints(run_dir):
        lock.close()
        raise ValueError(_different_run(run_dir, stored["fingerprint"], files.fingerprint))
    if (
        stored["fingerprint"] != files.fingerprint
        or not (run_dir / CONFIG_FILE).is_file()
        or not (run_dir / files.tokenizer_name).is_file()
    ):
        files.write(run_dir)
    lock.truncate(0)  # who holds it, for the message another process gets
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def check_run_dir(run_dir: Path) -> None:
    """ValueError unless `run_dir` is new, empty or a training run: checked first, before any slow work."""
    _read_run(run_dir)


def _read_run(run_dir: Path) -> dict | None:
    """The stored settings of the run in `run_dir`; None for a new or empty directory. Anything else in
    the directory is refused: a run never writes over files it did not make."""
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return None
    run_file = run_dir / RUN_FILE
    if not run_dir.is_dir() or not run_file.is_file():
        raise ValueError(f"run_dir {run_dir} exists and is not a training run (no {RUN_FILE}); choose a new run_dir")
    try:
        stored = json.loads(run_file.read_text())
    except json.JSONDecodeError:
        stored = None
    valid = isinstance(stored, dict) and stored.get("format") == RUN_FORMAT
    if not valid or not isinstance(stored.get("fingerprint"), dict):
        raise ValueError(f"{run_file} is corrupt; choose a new run_dir")
    return stored


def _lock(run_dir: Path) -> TextIO:
    lock = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise ValueError(
            f"run_dir {run_dir} is in use by another training process (pid {holder}); wait for "
            "it to finish or choose another run_dir"
        ) from None
    return lock


def has_checkpoints(run_dir: Path) -> bool:
    return any(p.name.isdigit() for p in (run_dir / CHECKPOINTS_DIR).glob("*"))


def _different_run(run_dir: Path, old: dict[str, Any], new: dict[str, Any]) -> str:
    differences = [
        f"{key}: {old.get(key)!r} there, {value!r} now" for key, value in new.items() if old.get(key) != value
    ]
    return (
        f"run_dir {run_dir} holds a different run ({'; '.join(differences[:4])}"
        f"{'; ...' if len(differences) > 4 else ''}); use a new run_dir, or the same settings to resume it"
    )
