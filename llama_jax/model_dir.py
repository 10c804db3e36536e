"""The model directory format: write one, read what its config.json says, restore its parameters.

    DIR/config.json      {"format": "llama_jax", "model": {ModelConfig}, "tokenizer": "tokenizer.model",
                          "chat_template": "llama3" | "llama2" | null}
    DIR/tokenizer.*      the tokenizer file, copied
    DIR/params/          an orbax checkpoint of the parameter tree (nested dict of arrays)
    DIR/checksums.json   {"format": 2, "params": each parameter's checksum (`integrity.py`), checked when it is
                          read back, "files": SHA-256 of config.json and the tokenizer, checked when the
                          directory is read}

A training run directory has the same config.json and tokenizer, and its orbax `CheckpointManager`
steps under DIR/checkpoints/<step>/params (checksums in the step's meta); `ModelDir.restore_params` takes
either, and from a run the newest step that is intact. Turning a directory into a runnable model (mesh,
dtype, LoRA merge, int8) is `loading.py`'s job.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
from pathlib import Path

import jax

from llama_jax.config import ModelConfig
from llama_jax.errors import errors_naming
from llama_jax.integrity import Checksums, changed_files, damage, file_digest, host_checksums
from llama_jax.param_io import read_json_item, restore_params, save_params
from llama_jax.staging import staged_output_dir
from llama_jax.tokenizers import Tokenizer, load_tokenizer

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
CHECKSUMS_FILE = "checksums.json"
CHECKSUMS_FORMAT = 2  # 1 (no "format" key): the parameters' checksums only
CHECKPOINTS_DIR = "checkpoints"
META_ITEM = "meta"  # a training step's JSON item: step, data position, checksums, ...
FORMAT = "llama_jax"
log = logging.getLogger("llama_jax")
# A model may have embedding rows past its tokenizer's last id: checkpoints round the vocabulary up for fast
# matmuls (Hugging Face's resize_token_embeddings(pad_to_multiple_of=64 or 128), Megatron's 128 × tensor
# parallelism), and tokens a Hugging Face tokenizer.json adds are rows its tokenizer.model lacks (32,001 rows
# for 32,000 pieces). Those rows are padding; this many or more past the last id is another model's tokenizer.
PADDING_ROWS = 1024


def write_model_dir(
    out_dir: str | Path,
    config: ModelConfig,
    params: dict,
    tokenizer_file: str | Path | None = None,
    chat_template: str | None = None,
    hf_repo: str | None = None,
) -> Path:
    """Write a model directory (config.json, tokenizer file, params/) atomically. `hf_repo`: the Hugging Face
    repository id the weights came from, when known (an export of adapters trained on it names it)."""
    tokenizer_name = None
    if tokenizer_file is not None:
        tokenizer = load_tokenizer(tokenizer_file)
        check_tokenizer_fits(tokenizer, config)  # refused before writing, not when an id cannot be decoded
        tokenizer_name = tokenizer.file_name
    with staged_output_dir(out_dir) as staging, errors_naming(Path(out_dir).absolute()):
        if tokenizer_name is not None:
            shutil.copyfile(tokenizer_file, staging / tokenizer_name)
        write_config(staging, config, tokenizer_name, chat_template, hf_repo=hf_repo)
        save_params(staging / PARAMS_DIR, params)
        covered = [CONFIG_FILE, *([tokenizer_name] if tokenizer_name else [])]
        checksums = {
            "format": CHECKSUMS_FORMAT,
            "params": host_checksums(params),
            "files": {name: file_digest(staging / name) for name in covered},
        }
        (staging / CHECKSUMS_FILE).write_text(json.dumps(checksums) + "\n")
    return Path(out_dir).absolute()


def write_config(
    directory: Path,
    config: ModelConfig,
    tokenizer_name: str | None,
    chat_template: str | None,
    lora_base: Path | None = None,
    hf_repo: str | None = None,
) -> None:
    """config.json. A LoRA run's (config.lora enabled) names the model directory its adapters sit on; a
    converted model, the Hugging Face repository it came from when known."""
    payload = {"format": FORMAT, "model": config.to_dict(), "tokenizer": tokenizer_name, "chat_template": chat_template}
    if lora_base is not None:
        payload["lora_base"] = str(Path(lora_base).absolute())
    if hf_repo is not None:
        payload["hf_repo"] = hf_repo
    (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")


@dataclasses.dataclass(frozen=True)
class ModelDir:
    """What a model directory's config.json says."""

    path: Path
    config: ModelConfig
    tokenizer_path: Path | None
    chat_template: str | None
    lora_base: Path | None = None  # a LoRA run: the model directory its adapters were trained on
    hf_repo: str | None = None  # converted from this Hugging Face repository ("owner/name")

    def tokenizer(self) -> Tokenizer | None:
        """The directory's tokenizer (None if it has none), refused when the model cannot embed its ids."""
        if self.tokenizer_path is None:
            return None
        tokenizer = load_tokenizer(self.tokenizer_path)
        check_tokenizer_fits(tokenizer, self.config)
        return tokenizer

    def params_paths(self) -> list[Path]:
        """Where parameters are, newest first: the directory's params/, or its training steps'."""
        direct = self.path / PARAMS_DIR
        if direct.is_dir():
            return [direct]
        steps = sorted((int(p.name) for p in (self.path / CHECKPOINTS_DIR).glob("*") if p.name.isdigit()), reverse=True)
        found = [self.path / CHECKPOINTS_DIR / str(step) / PARAMS_DIR for step in steps]
        found = [path for path in found if path.is_dir()]
        if not found:
            raise ValueError(f"{self.path} holds no parameters (no {PARAMS_DIR}/ and no {CHECKPOINTS_DIR}/<step>/)")
        return found

    @property
    def params_path(self) -> Path:
        """The newest parameters (what a reader should identify the model by)."""
        return self.params_paths()[0]

    def checksums(self, params_path: Path) -> Checksums | None:
        """The checksums written with the parameters at `params_path`; None where none were (older files)."""
        if params_path.parent == self.path:
            stored = _read_checksums(self.path)
            if stored is None:
                return None
            return stored["params"] if "format" in stored else stored
        meta = params_path.parent / META_ITEM
        return read_json_item(meta).get("checksums", {}).get("params") if meta.is_dir() else None

    def restore_params(self, target: dict) -> dict:
        """The newest intact parameters, restored into `target`'s shapes, dtypes and shardings. A damaged
        step of a training run (bytes changed since they were written, values not finite, files cut short)
        is skipped with a warning; none intact is an error."""
        problems = []
        stored_dtype = self.config.param_dtype
        paths = self.params_paths()
        for number, path in enumerate(paths, start=1):
            try:
                params = restore_params(path, target)
                # Restored into another dtype (load(dtype=...)) the bytes differ: only finiteness is checked.
                same_dtype = all(str(a.dtype) == stored_dtype for a in jax.tree.leaves(target))
                reason = damage(params, self.checksums(path) if same_dtype else None)
            except ValueError as e:
                reason = str(e).removeprefix(f"{path}: ")
            if reason is None:
                return params
            problems.append(f"{path}: {reason}")
            if number < len(paths):
                log.warning("%s is damaged (%s); reading the checkpoint before it", path, reason)
        raise ValueError(
            f"{self.path} holds no intact parameters: {problems[0]}"
            f"{f' (and {len(problems) - 1} older)' if len(problems) > 1 else ''}"
        )


def read_model_dir(path: str | Path) -> ModelDir:
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(
            f"{path} is not a llama_jax model directory (no {CONFIG_FILE}); "
            "convert weights with `python -m llama_jax.convert`"
        )
    _check_model_files(path)
    try:
        payload = json.loads(config_file.read_text())
        config = ModelConfig.from_dict(payload["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{config_file} is corrupt: {e}") from None
    tokenizer = payload.get("tokenizer")
    if tokenizer is not None and (
        not isinstance(tokenizer, str) or Path(tokenizer).name != tokenizer or tokenizer in ("", ".", "..")
    ):
        raise ValueError(f"{config_file} is corrupt: its tokenizer {tokenizer!r} must be a file name inside {path}")
    lora_base = payload.get("lora_base")
    if config.lora.enabled and not isinstance(lora_base, str):
        raise ValueError(f"{config_file} is corrupt: a LoRA run must name its base model directory (lora_base)")
    return ModelDir(
        path,
        config,
        path / tokenizer if tokenizer else None,
        payload.get("chat_template"),
        Path(lora_base) if config.lora.enabled else None,
        payload.get("hf_repo") if isinstance(payload.get("hf_repo"), str) else None,
    )


def _read_checksums(path: Path) -> dict | None:
    file = path / CHECKSUMS_FILE
    if not file.is_file():
        return None
    try:
        stored = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is corrupt: {e}") from None
    if not isinstance(stored, dict) or ("format" in stored and not isinstance(stored.get("params"), dict)):
        raise ValueError(f"{file} is corrupt: no parameter checksums")
    return stored


def _check_model_files(path: Path) -> None:
    """A model directory's config.json and tokenizer are what was written with its weights (a one-character
    edit of norm_eps changes every generation); without checksums.json nothing can be verified: say so."""
    if not (path / PARAMS_DIR).is_dir():
        return  # a training run: its steps carry their own checksums
    stored = _read_checksums(path)
    if stored is None:
        _warn_once(
            f"{path} has no {CHECKSUMS_FILE}: its weights, config and tokenizer cannot be verified, so damaged "
            "files would go unnoticed (a directory written by llama_jax has one; convert the weights again)"
        )
        return
    changed = changed_files(path, stored.get("files", {}))
    if changed:
        raise ValueError(
            f"{path}: {' and '.join(changed)} changed since the model was written ({CHECKSUMS_FILE} says otherwise); "
            'restore the original, or if the change is yours, remove its entry under "files" in checksums.json'
        )


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def check_tokenizer_fits(tokenizer: Tokenizer, config: ModelConfig) -> None:
    """ValueError when the tokenizer and the model cannot belong together: the tokenizer makes ids the model
    has no embedding for, or the model has more rows past the tokenizer's last id than padding explains (it
    would generate ids that decode to nothing: a 32,000-row model with a 512-piece tokenizer)."""
    problem = vocabulary_mismatch(tokenizer.vocab_size, config.vocab_size)
    if problem is not None:
        raise ValueError(f"tokenizer {tokenizer.path} {problem}")


def vocabulary_mismatch(tokens: int, rows: int) -> str | None:
    """Why a tokenizer of `tokens` ids and a model of `rows` embeddings cannot belong together, or None. Rows
    past the tokenizer's last id are padding when fewer than PADDING_ROWS."""
    if tokens > rows:
        return f"has {tokens} tokens, more than the model's {rows} embeddings: it belongs to another model"
    if rows - tokens >= PADDING_ROWS:
        return (
            f"has {tokens} tokens but the model {rows} embeddings, {rows - tokens} past its last id where padding "
            f"adds fewer than {PADDING_ROWS}: it belongs to another model"
        )
    return None


def lora_base_dir(run: ModelDir) -> ModelDir:
    """The model directory a LoRA run's adapters sit on (its config.json's lora_base)."""
    if run.lora_base is None:
        raise ValueError(f"{run.path} is not a LoRA run (its config.json names no lora_base)")
    if not (run.lora_base / CONFIG_FILE).is_file():
        raise ValueError(f"{run.path} holds LoRA adapters of {run.lora_base}, which is no longer a model directory")
    return read_model_dir(run.lora_base)
