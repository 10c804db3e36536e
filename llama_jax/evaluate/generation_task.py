"""A generation task: prompts with reference answers, completed by the model and scored (text_metrics.py).

Records are JSONL, `{"prompt": ..., "reference": ...}` or `{"prompt": ..., "references": [...]}`. Completions
come from the batch engine in input order; with an output file each record is written as soon as it is
scored (prompt, references, completion, finish_reason, scores), and a rerun with the same settings scores
only the records not yet there, reading the finished ones back for the corpus scores.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from llama_jax.evaluate.text_metrics import TextScorer


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    prompt: str
    references: tuple[str, ...]


def read_task(path: str | Path) -> list[TaskRecord]:
    """The records of a JSONL task file; the first bad line is a ValueError naming it."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path} line {number} is not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
            raise ValueError(f'{path} line {number} has no "prompt" string')
        references = [data["reference"]] if "reference" in data else data.get("references")
        if not isinstance(references, list) or not references or not all(isinstance(r, str) for r in references):
            raise ValueError(
                f'{path} line {number} needs a "reference" string or a non-empty "references" list of strings'
            )
        records.append(TaskRecord(data["prompt"], tuple(references)))
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def run_task(
    loaded,
    records: list[TaskRecord],
    prompt_ids: list[list[int]],
    settings,
    engine,
    scorer: TextScorer,
    stop_strings: tuple[str, ...],
    output=None,
    progress: bool = True,
    first: int | None = None,
) -> dict[str, Any]:
    """Complete and score the records from `first` on (default: those not yet in `output`, a
    results_file.JsonlOutput, or None) with the generation `settings` on an engine of `engine` settings;
    returns the summary over all records: `examples` and one key per metric (0-100). (The processes of a
    multi-host job other than 0 have no output: they compute the same completions and score what they saw.)"""
    from llama_jax.inference.batch import generate_in_order

    if first is None:
        first = output.done if output else 0
    scored: list[dict[str, Any]] = read_done(output.path, first) if output else []

    def write(ready) -> None:
        batch = []
        for index, result in ready:
            record = records[index]
            batch.append(
                {
                    "prompt": record.prompt,
                    "references": list(record.references),
                    "completion": result.text,
                    "finish_reason": result.finish_reason,
                    "scores": scorer.example(result.text, record.references),
                }
            )
        scored.extend(batch)
        if output:
            output.write(batch)

    if first < len(records):
        generate_in_order(
            loaded,
            prompt_ids,
            settings,
            write,
            engine=engine,
            first=first,
            stop_strings=stop_strings,
            progress=progress,
        )
    summary = scorer.corpus(
        [r["completion"] for r in scored], [r["references"] for r in scored], [r["scores"] for r in scored]
    )
    return {"examples": len(scored), "generated": len(records) - first, **summary}


def read_done(path: Path, count: int) -> list[dict[str, Any]]:
    """The first `count` records of a results file (already checked by JsonlOutput)."""
    if count == 0:
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(count)]
