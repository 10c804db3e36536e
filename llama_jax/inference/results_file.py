"""The resumable results file of batch generation: one JSON record per prompt, in input order, appended and
flushed batch by batch, so a crashed run loses only the batch in flight and a rerun with the same output
continues after the last complete record.

    OUT.jsonl           the records
    OUT.jsonl.run.json  what made them (checkpoint, sampling settings, ...), held locked by the writer

The second file is what makes a file ours: an existing output without it was not written by infer.py (or
`evaluate generate`) and is never touched, one whose settings differ is never mixed with other results, and
while one process writes to an output another is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama_jax.errors import errors_naming

RUN_SUFFIX = ".run.json"
FORMAT = "llama_jax-infer"


class JsonlOutput:
    """An output JSONL file that is appended to batch by batch and can be resumed by the same settings.

    Opening it reads the records already there: they must be the first prompts' records, in order
    (anything else is an error, and the file is left untouched). A last line cut short by a crash is
    dropped; everything before it is kept.
    """

    def __init__(self, path: str | Path, prompts: Sequence[str], settings: dict[str, Any], writer: str = "infer.py"):
        """`writer`: the command that writes such files, as error messages name it."""
        self.path, self.writer = Path(path), writer
        self.run_path = self.path.with_name(self.path.name + RUN_SUFFIX)
        if self.path.exists() and not self.run_path.is_file():
            raise ValueError(
                f"{self.path} exists and was not written by {writer} (no {self.run_path.name} beside "
                "it); choose another output file"
            )
        # Files this process creates are removed again if it ends without writing a record (a refused or
        # failed run leaves nothing that would block the corrected rerun).
        self._created = not self.path.exists() and not self.run_path.exists()
        self._lock = self._take_lock()
        with errors_naming(self.path):
            try:
                stored = self._lock.read()
                if self.path.exists() and self.path.stat().st_size > 0:
                    self._check_settings(stored, settings)
                else:  # new, or a run that ended before its first record: these settings now
                    self._lock.truncate(0)
                    self._lock.write(json.dumps({"format": FORMAT, "settings": settings}, indent=2) + "\n")
                    self._lock.flush()
                self.done = 0
                if self.path.exists():
                    data = self.path.read_bytes()
                    keep_bytes = self._check_existing(data, prompts)
                    if keep_bytes < len(data):
                        with open(self.path, "r+b") as f:
                            f.truncate(keep_bytes)
                self._file = open(self.path, "a", encoding="utf-8")
            except BaseException:
                self._discard_if_created()
                self._lock.close()
                raise

    def _take_lock(self):
        lock = open(self.run_path, "a+", encoding="utf-8")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ValueError(
                f"{self.path} is being written by another {self.writer}; wait for it or choose another output file"
            ) from None
        lock.seek(0)
        return lock

    def _check_settings(self, stored: str, settings: dict[str, Any]) -> None:
        try:
            old = json.loads(stored)["settings"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{self.run_path} is corrupt; choose another output file") from None
        differences = [
            f"{key}: {old.get(key)!r} there, {value!r} now" for key, value in settings.items() if old.get(key) != value
        ]
        if differences:
            raise ValueError(
                f"{self.path} holds results of other settings ({'; '.join(differences[:3])}); rerun "
                "with the same settings to resume, or choose another output file"
            )

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
                raise ValueError(
                    f"{self.path} record {number} is not for prompt {number} of this input; "
                    "use another output file, or the same prompts to resume"
                )
        self.done = len(lines)
        return sum(len(line) + 1 for line in lines)

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        """Append `records` and flush them to the disk. A failed write (a full disk) names the output."""
        with errors_naming(self.path):
            self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            self._file.flush()
            os.fsync(self._file.fileno())
        self.done += len(records)

    def close(self) -> None:
        with errors_naming(self.path):
            self._file.close()
        if self.done == 0:
            self._discard_if_created()
        self._lock.close()

    def _discard_if_created(self) -> None:
        """Remove the files this process created (and wrote no record to)."""
        if self._created:
            self.path.unlink(missing_ok=True)
            self.run_path.unlink(missing_ok=True)
