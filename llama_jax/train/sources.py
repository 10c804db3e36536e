"""A corpus's source files and what they hold: documents to pretrain on, SFT and preference records.

Pretraining reads text files (one document each, or split at a separator) and JSONL `{"text": ...}` records.
Supervised fine-tuning (SFT) reads JSONL prompt/response records:

    {"prompt": "What is the capital of France?", "response": "Paris."}

Direct Preference Optimization (`objective=dpo`) reads JSONL preference records:

    {"prompt": "Is this a question? ...", "chosen": "Yes", "rejected": "No"}

GRPO (`objective=grpo`) reads JSONL prompt records, whose other fields reach the reward functions:

    {"prompt": "Is this a question? ...", "answer": "Yes"}

A file or record of another shape is one error that names it (`file:line`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

BUNDLED_DATA = Path(__file__).resolve().parents[1] / "data"


def data_files(spec: str) -> list[Path]:
    """The files of a comma-separated list of paths and globs, each glob sorted, duplicates dropped. A name that
    matches nothing here but a file of llama_jax/data/ is that bundled file (the default corpus)."""
    files: list[Path] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        matches = sorted(glob.glob(os.path.expanduser(part), recursive=True))
        if not matches and (BUNDLED_DATA / part).is_file():
            matches = [str(BUNDLED_DATA / part)]
        if not matches:
            raise FileNotFoundError(f"no data file matches {part}")
        for match in map(Path, matches):
            if match.is_dir():
                raise ValueError(f"data {match} is a directory; name its files, e.g. {match}/*.txt")
            if match not in files:
                files.append(match)
    return files


def corpus_hash(files: list[Path]) -> str:
    """sha256 of the files' kinds and contents (not their names: a moved corpus is the same corpus)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(b"jsonl" if is_jsonl(path) else b"text")
        digest.update(path.stat().st_size.to_bytes(8, "little"))
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def documents(files: list[Path], doc_separator: str | None = None) -> Iterator[str]:
    """Pretraining documents: a text file is one document (or several, split at `doc_separator`); a
    JSONL file holds one {"text": ...} record per line."""
    for path in files:
        if is_jsonl(path):
            for where, record in jsonl_records(path):
                problem = _field_problem(record, ("text",))
                if problem is not None:
                    raise ValueError(f'{where}: {problem}; expected a JSON object with a string "text" field')
                yield record["text"]
        else:
            text = path.read_text(encoding="utf-8")
            yield from text.split(doc_separator) if doc_separator else [text]


def jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each non-empty line of a JSONL file; one clear error for a bad line."""
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object")
            yield where, record


def _field_problem(record: dict, names: tuple[str, ...]) -> str | None:
    """What is wrong with the fields `names` of `record`, which must be strings, in words; None if nothing."""
    for name in names:
        if name not in record:
            return f'the "{name}" field is missing'
        value = record[name]
        if not isinstance(value, str):
            return f'"{name}" is {_json_kind(value)}, not a string'
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON may escape half of a UTF-16 pair ("\ud800"), which is no text
            return f'"{name}" is not text: it holds {value[e.start : e.end]!r}, half of a UTF-16 surrogate pair'
    return None


def _json_kind(value) -> str:
    """A JSON value's kind as a sentence says it: `"prompt" is a number, not a string`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    kinds = {int: "a number", float: "a number", list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def sft_records(files: list[Path]) -> Iterator[tuple[str, str, str]]:
    """(where, prompt, response) for every record; one clear error for a file or record of another shape."""
    for path in files:
        if not is_jsonl(path):
            raise ValueError(f'SFT data must be JSONL files of {{"prompt": ..., "response": ...}} records; got {path}')
        for where, record in jsonl_records(path):
            problem = _field_problem(record, ("prompt", "response"))
            if problem is not None:
                raise ValueError(f'{where}: {problem}; an SFT record needs string "prompt" and "response" fields')
            yield where, record["prompt"], record["response"]


def sft_texts(files: list[Path]) -> Iterator[str]:
    """The texts of all records (to train a tokenizer on)."""
    for _, prompt, response in sft_records(files):
        yield prompt
        yield response


def dpo_records(files: list[Path]) -> Iterator[tuple[str, str, str, str]]:
    """(where, prompt, chosen, rejected) for every preference record; one clear error for anything else."""
    for path in files:
        if not is_jsonl(path):
            raise ValueError(
                f'DPO data must be JSONL files of {{"prompt": ..., "chosen": ..., "rejected": ...}} records; got {path}'
            )
        for where, record in jsonl_records(path):
            problem = _field_problem(record, ("prompt", "chosen", "rejected"))
            if problem is not None:
                raise ValueError(
                    f'{where}: {problem}; a DPO record needs string "prompt", "chosen" and "rejected" fields'
                )
            fields = [record[name] for name in ("prompt", "chosen", "rejected")]
            if not fields[1].strip() or not fields[2].strip():
                raise ValueError(f"{where}: the chosen or the rejected response is empty")
            yield where, *fields


def grpo_records(files: list[Path]) -> Iterator[tuple[str, str, dict]]:
    """(where, prompt, the record's other fields) for every prompt record; one clear error for anything else."""
    for path in files:
        if not is_jsonl(path):
            raise ValueError(f'GRPO data must be JSONL files of {{"prompt": ..., FIELD: ...}} records; got {path}')
        for where, record in jsonl_records(path):
            problem = _field_problem(record, ("prompt",)) or ("" if record["prompt"].strip() else '"prompt" is empty')
            if problem:
                raise ValueError(f'{where}: {problem}; a GRPO record needs a non-empty string "prompt" field')
            prompt = record.pop("prompt")
            yield where, prompt, record
