"""The resumable results file of batch generation: one JSON record per prompt, in input order, appended and
flushed batch by batch, so a crashed run loses only the batch in flight and a rerun with the same output
continues after the last complete record."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
                raise ValueError(f"{self.path} line {number} is not a JSON record; use another output file") from None
            if number > len(prompts):
                raise ValueError(f"{self.path} holds more records than there are prompts; use another output file")
            if not isinstance(record, dict) or record.get("prompt") != prompts[number - 1]:
                raise ValueError(f"{self.path} record {number} is not for prompt {number} of this input; "
                                 "use another output file, or the same prompts to resume")
        self.done = len(lines)
        return sum(len(line) + 1 for line in lines)

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done += len(records)

    def close(self) -> None:
        self._file.close()
