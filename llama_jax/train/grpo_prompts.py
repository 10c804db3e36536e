"""GRPO's prompts (`objective=grpo`): the records of `data=`, encoded as the model sees them, split into training
and held-out prompts, and drawn for each step as a pure function of (seed, step).

    prompts = PromptSet.read(files, tokenizer, chat_template, val_fraction, max_completion_length, max_len)
    prompts.train(step, count, seed)   # the step's prompts: PromptRecords, each drawn once per epoch
    prompts.held_out                   # the last val_fraction of the records, in file order

A record is `{"prompt": ..., FIELD: ...}` (`sources.grpo_records`); its prompt is encoded as SFT encodes one (BOS +
text, or the user's message in the chat template), and its other fields reach the reward functions. A prompt
that leaves no room for `max_completion_length` tokens in a row is an error naming its record, before anything
trains: GRPO never cuts a prompt short without saying so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llama_jax.tokenizers import Tokenizer
from llama_jax.train.batching import permuted_indices
from llama_jax.train.examples import encode_prompt
from llama_jax.train.rewards import CALL_KEYWORDS, RESERVED_FIELDS, Rewards, RewardSpec
from llama_jax.train.sources import corpus_hash, grpo_records


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    where: str  # file:line, for messages
    prompt: str  # as written in the record: what reward functions get as `prompts`
    ids: tuple[int, ...]  # encoded: BOS + text, or the chat template's user turn
    fields: dict[str, Any]  # the record's other fields, by name


@dataclasses.dataclass(frozen=True)
class PromptSet:
    records: tuple[PromptRecord, ...]
    n_train: int
    key: str  # the records as encoded: the files, the tokenizer and the template (the run's fingerprint)

    @classmethod
    def read(
        cls,
        files: list[Path],
        tokenizer: Tokenizer,
        tokenizer_path: Path,
        chat_template: str | None,
        val_fraction: float,
        max_completion_length: int,
        max_len: int,
    ) -> PromptSet:
        """Every record of `files`, encoded; the last round(n × val_fraction) (at least one) held out. `max_len`:
        the tokens a prompt and its completion share (`rollouts.rollout_positions`)."""
        records = []
        for where, prompt, fields in grpo_records(files):
            ids = tuple(encode_prompt(tokenizer, prompt, chat_template))
            if len(ids) + max_completion_length > max_len:
                raise ValueError(
                    f"{where}: the prompt is {len(ids)} tokens; with grpo.max_completion_length "
                    f"{max_completion_length} it needs {len(ids) + max_completion_length} tokens, a row holds "
                    f"{max_len} (seq_len + 1; raise seq_len or shorten the prompt)"
                )
            records.append(PromptRecord(where, prompt, ids, fields))
        n_val = max(1, round(len(records) * val_fraction))
        if len(records) - n_val < 1:
            raise ValueError(
                f"GRPO data holds {len(records)} prompt record(s); training and held-out prompts need one each"
            )
        digest = hashlib.sha256(corpus_hash(files).encode())
        digest.update(Path(tokenizer_path).read_bytes())
        digest.update(json.dumps({"chat_template": chat_template, "objective": "grpo"}).encode())
        return cls(tuple(records), len(records) - n_val, digest.hexdigest())

    @property
    def held_out(self) -> tuple[PromptRecord, ...]:
        return self.records[self.n_train :]

    def train(self, step: int, count: int, seed: int) -> list[PromptRecord]:
        """Step `step`'s `count` prompts: a pure function of (seed, step), every training prompt once per epoch."""
        return [self.records[int(i)] for i in permuted_indices(step, count, self.n_train, seed)]

    def check_fields(self, specs: Sequence[RewardSpec], rewards: Rewards) -> None:
        """What the reward functions read, checked on every record before anything trains: no field named as a
        call's keyword, every field a function requires present in the records, and a built-in's field (all but
        regex) in each record — a record drawn hours into a run must not be the first to fail."""
        names = {name for record in self.records for name in record.fields}
        for record in self.records:
            reserved = sorted(RESERVED_FIELDS & record.fields.keys())
            if reserved:
                raise ValueError(
                    f"{record.where}: no field may be named {reserved[0]}: reward functions take that keyword"
                )
        for spec, reward in zip(specs, rewards.functions):
            for name in sorted(reward.required - set(CALL_KEYWORDS) - names):
                fields = ", ".join(sorted(names)) or "none besides prompt"
                raise ValueError(f"reward {spec.text} takes {name}, which no record has (their fields: {fields})")
            if spec.builtin not in (None, "regex"):
                lacking = next((r for r in self.records if r.fields.get(spec.argument) is None), None)
                if lacking is not None:
                    raise ValueError(
                        f"{lacking.where}: reward {spec.text} compares with {spec.argument}, which this record lacks"
                    )

    def describe(self) -> str:
        lengths = np.array([len(r.ids) for r in self.records])
        return (
            f"GRPO: {self.n_train:,} training and {len(self.held_out):,} held-out prompts of "
            f"{lengths.min()}-{lengths.max()} tokens"
        )
