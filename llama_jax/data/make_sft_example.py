"""Writes sft_example.jsonl: "is this a question?" records cut from tinyshakespeare.txt.

    python -m llama_jax.data.make_sft_example      # rewrites llama_jax/data/sft_example.jsonl

Each record's prompt asks whether a line that opens a speech is a question; the response is "Yes" for the
240 lines (drawn with a fixed seed) that end in "?" and "No" for 240 that end in "." or "!". The task is
small enough for the 2M-parameter default model and it generalises: the held-out records ask about lines
the fine-tuning never saw, so they are answered right only if the model learned the task, not the lines.
(Two tasks tried first do not generalise at this size, held-out answers staying at chance after 150
steps: naming a line's speaker among 12, and repeating a line's last word.)
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORDS, MIN_CHARS, SEED = 480, 30, 0


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, first line) of every speech: a block "NAME:\\nline\\n..." between blank lines."""
    found = []
    for block in text.split("\n\n"):
        lines = block.strip().split("\n")
        if len(lines) >= 2 and re.fullmatch(r"[A-Z][A-Z ]+:", lines[0]) and len(lines[1]) >= MIN_CHARS:
            found.append((lines[0][:-1], lines[1].strip()))
    return found


def main() -> None:
    lines = sorted({line for _, line in speeches((HERE / "tinyshakespeare.txt").read_text())})
    rng = random.Random(SEED)
    questions = rng.sample([line for line in lines if line.endswith("?")], RECORDS // 2)
    statements = rng.sample([line for line in lines if line.endswith((".", "!"))], RECORDS // 2)
    records = [
        {"prompt": f"Is this a question? {line}", "response": answer}
        for group, answer in ((questions, "Yes"), (statements, "No"))
        for line in group
    ]
    rng.shuffle(records)
    with (HERE / "sft_example.jsonl").open("w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


if __name__ == "__main__":
    main()
