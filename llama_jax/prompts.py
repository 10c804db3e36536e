"""Prompts in, records out: reading prompt files, turning prompts into ids, and the resumable JSONL output.

A prompt file is either JSONL (every line an object with a string `prompt`) or plain text with one
prompt per line (blank lines skipped; use JSONL for empty or multi-line prompts). The output file gets one
JSON record per prompt, in input order, appended and flushed batch by batch, so a crashed run loses only
the batch in flight and a rerun with the same output continues after the last complete record.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama_jax.tokenizer import Tokenizer


def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """Prompts from `--prompt` values, or from a file ("-" is stdin); ValueError when there are none."""
    if prompts and prompts_file is not None:
        raise ValueError("give prompts with --prompt or with --prompts FILE, not both")
    if prompts:
        return list(prompts)
    if prompts_file is None:
        raise ValueError("no prompts: give --prompt TEXT or --prompts FILE (- reads standard input)")
    name = "standard input" if prompts_file == "-" else prompts_file
    data = sys.stdin.buffer.read() if prompts_file == "-" else Path(prompts_file).read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark some editors write is not part of the prompt
    except UnicodeDecodeError as e:
        raise ValueError(f"{name} is not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    result = parse_prompts(text, name)
    if not result:
        raise ValueError(f"{name} holds no prompts")
    return result


def parse_prompts(text: str, name: str) -> list[str]:
    """JSONL when the first non-blank line starts with "{", else one prompt per non-blank line."""
    lines = [line.rstrip("\r") for line in text.split("\n")]
    first = next((line for line in lines if line.strip()), "")
    if not first.lstrip().startswith("{"):
        return [line for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{name} line {number}: a JSONL prompt file needs a string \"prompt\" field on every line")
        prompts.append(record["prompt"])
    return prompts


@dataclasses.dataclass(frozen=True)
class PromptEncoder:
    """Text → prompt ids (BOS first, or a chat template's ids), refusing prompts that leave no room for
    max_new_tokens within the model's max_seq_len."""

    tokenizer: Tokenizer
    chat_template: str | None
    max_seq_len: int
    max_new_tokens: int

    def encode(self, prompt: str, index: int = 0) -> list[int]:
        if self.chat_template:
            from llama_jax.chat import encode_dialog

            ids = encode_dialog(self.tokenizer, self.chat_template, [{"role": "user", "content": prompt}])
        else:
            ids = self.tokenizer.encode(prompt, bos=True)
        check_fits(len(ids), self.max_new_tokens, self.max_seq_len, index)
        return ids


def check_fits(n_tokens: int, max_new_tokens: int, max_seq_len: int, index: int = 0) -> None:
    """ValueError unless prompt `index` (0-based) of n_tokens leaves room for max_new_tokens."""
    needed = n_tokens + max_new_tokens
    if needed > max_seq_len:
        raise ValueError(f"prompt {index + 1} has {n_tokens} tokens; with max-new-tokens {max_new_tokens} it "
                         f"needs {needed} positions, but the model allows {max_seq_len}")


def chat_template_for(checkpoint_template: str | None, chat: bool) -> str | None:
    """The template to apply: the checkpoint's when chat is asked for, an error when it has none."""
    if chat and not checkpoint_template:
        raise ValueError("this checkpoint has no chat template (its config.json chat_template is null); "
                         "run without --chat")
    return checkpoint_template if chat else None


class JsonlOutput:
    """An output JSONL file that is appended to batch by batch and can be resumed.

    Opening it reads the records already there: they must be the first prompts' records, in order
    (anything else is an error, and the file is left untouched). A last line cut short by a crash is
    dropped; everything before it is kept.
    """

    def __init__(self, path: str | Path, prompts: Sequence[str]):
        self.path = Path(path)
        self.done = 0
        keep_bytes = 0
        if self.path.exists():
            data = self.path.read_bytes()
            keep_bytes = self._check_existing(data, prompts)
            if keep_bytes < len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(keep_bytes)
        self._file = open(self.path, "a", encoding="utf-8")

    def _check_existing(self, data: bytes, prompts: Sequence[str]) -> int:
        """How many bytes of complete, matching records the file starts with; sets self.done. Only the
        text after the last newline can be a record cut short (each record is written with its newline)."""
        lines = data.split(b"\n")[:-1]
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ValueError(f"{self.path} line {number} is not a JSON record; use a new --output") from None
            if number > len(prompts):
                raise ValueError(f"{self.path} holds more records than there are prompts; use a new --output")
            if not isinstance(record, dict) or record.get("prompt") != prompts[number - 1]:
                raise ValueError(f"{self.path} record {number} is not for prompt {number} of this input; "
                                 "use a new --output, or the same prompts to resume")
        self.done = len(lines)
        return sum(len(line) + 1 for line in lines)

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done += len(records)

    def close(self) -> None:
        self._file.close()
