"""The host side of every device call: requests packed into the numpy arrays a program takes. The same
functions build the arrays of a real call and, from no requests, the shapes a program is lowered from, so a
program compiled ahead of time is the one every call runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from llama_jax.inference.programs import DEVICE_STOP_IDS, Admission, Chunk, Prompts
from llama_jax.inference.sampling import RowSampling, SamplingParams
from llama_jax.inference.settings import MAX_STEPS
from llama_jax.inference.types import Request


@dataclasses.dataclass(frozen=True)
class Packer:
    """Packs requests for an engine of `slots` decode slots of `cache_len` positions, prompts prefilled in
    chunks of `chunk` tokens and padded with `pad_id`. A row whose slot is `slots` (out of range) is padding:
    the programs drop what it computes."""

    slots: int
    cache_len: int
    chunk: int
    pad_id: int = 0

    def prompts(self, placed: Sequence[tuple[int, Sequence[int]]], rows: int, bucket: int) -> Prompts:
        """A prefill's prompts: `placed` (slot, prompt ids) pairs right-padded in `rows` rows of `bucket`."""
        ids = np.full((rows, bucket), self.pad_id, np.int32)
        lengths = np.ones((rows,), np.int32)
        slots = np.full((rows,), self.slots, np.int32)
        for i, (slot, prompt) in enumerate(placed):
            ids[i, : len(prompt)], lengths[i], slots[i] = prompt, len(prompt), slot
        return Prompts(ids, lengths, slots)

    def admission(self, placed: Sequence[tuple[int, Request]], rows: int) -> Admission:
        """An admission: the settings of `placed` (slot, request) pairs in `rows` rows. A slot checks the first
        DEVICE_STOP_IDS of its request's stop ids on the device; the scheduler checks them all."""
        slots = np.full((rows,), self.slots, np.int32)
        seeds, streams = np.zeros((rows,), np.uint32), np.zeros((rows,), np.int32)
        max_tokens = np.ones((rows,), np.int32)
        stop_ids = np.full((rows, DEVICE_STOP_IDS), -1, np.int32)
        logprobs = np.zeros((rows,), bool)
        for i, (slot, request) in enumerate(placed):
            slots[i], seeds[i], streams[i] = slot, request.seed, request.stream
            max_tokens[i], logprobs[i] = request.max_tokens, request.logprobs
            own = request.stop_ids[:DEVICE_STOP_IDS]
            stop_ids[i, : len(own)] = own
        sampling = RowSampling.of([r.sampling for _, r in placed] + [SamplingParams()] * (rows - len(placed)))
        return Admission(slots, seeds, streams, sampling, max_tokens, stop_ids, logprobs)

    def chunk_of(self, slot: int, request: Request | None, start: int, bucket: int) -> Chunk:
        """An extend call's piece of `request`'s prompt from `start`, padded to `bucket` (no request: shapes)."""
        piece = request.prompt_ids[start : start + bucket] if request is not None else ()
        ids = np.full((1, bucket), self.pad_id, np.int32)
        ids[0, : len(piece)] = piece
        return Chunk(
            ids, np.asarray([slot], np.int32), np.asarray([start], np.int32), np.asarray([len(piece)], np.int32)
        )

    def entries(self, entries: dict[int, int]) -> np.ndarray:
        """Prefix pool entries by chunk index (-1: none), one per chunk of a slot."""
        array = np.full((self.cache_len // self.chunk,), -1, np.int32)
        for index, entry in entries.items():
            array[index] = entry
        return array

    def decode_inputs(self, active: Sequence[bool], steps: int, stop_early: bool) -> tuple:
        """A decode call's inputs: which slots decode, how many steps at most, whether to end at a finish."""
        if not 0 <= steps <= MAX_STEPS:
            raise ValueError(f"a decode call runs 0..{MAX_STEPS} steps, not {steps}")
        mask = np.zeros((self.slots,), bool)
        mask[: len(active)] = active
        return mask, np.int32(steps), np.bool_(stop_early)
