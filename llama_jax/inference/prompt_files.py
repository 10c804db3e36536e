"""Prompt files: JSONL (every line an object with a string `prompt`) or plain text with one prompt per line
(blank lines skipped; use JSONL for empty or multi-line prompts); "-" reads standard input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

STDIN = "-"


def read_prompt_file(prompts_file: str) -> list[str]:
    """The prompts of a file (STDIN: standard input); ValueError when it holds none or is not UTF-8 text."""
    name = "standard input" if prompts_file == STDIN else prompts_file
    data = sys.stdin.buffer.read() if prompts_file == STDIN else Path(prompts_file).read_bytes()
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
            raise ValueError(f'{name} line {number}: a JSONL prompt file needs a string "prompt" field on every line')
        prompts.append(record["prompt"])
    return prompts
