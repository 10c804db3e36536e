"""The host side of every device call: requests and page tables packed into the numpy arrays a program takes.
The same functions build the arrays of a real call and, from no requests, the shapes a program is lowered
from, so a program compiled ahead of time is the one every call runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from llama_jax.inference.programs import DEVICE_STOP_IDS, Admission, Chunk, Prompts
from llama_jax.inference.sampling import RowSampling, SamplingParams
from llama_jax.inference.scheduler import Admitting
from llama_jax.inference.settings import MAX_STEPS


@dataclasses.dataclass(frozen=True)
class Packer:
    """Packs requests for an engine of `slots` decode slots whose page tables have `pages_per_seq` entries of a
    pool of `num_pages`, prompts prefilled in chunks of `chunk` tokens and padded with `pad_id`. A row whose
    slot is `slots` (out of range) is padding: the programs drop what it computes; a table entry of
    `num_pages` is no page (a write there is dropped)."""

    slots: int
    pages_per_seq: int
    num_pages: int
    chunk: int
    pad_id: int = 0

    def prompts(self, placed: Sequence[tuple[int, Sequence[int]]], rows: int, bucket: int, tables=None) -> Prompts:
        """A prefill's prompts: `placed` (slot, ids) pairs right-padded in `rows` rows of `bucket`, each with
        its slot's row of `tables` (the page pool's; None: shapes only)."""
        ids = np.full((rows, bucket), self.pad_id, np.int32)
        lengths = np.ones((rows,), np.int32)
        slots = np.full((rows,), self.slots, np.int32)
        rows_tables = self._no_pages(rows)
        for i, (slot, prompt) in enumerate(placed):
            ids[i, : len(prompt)], lengths[i], slots[i] = prompt, len(prompt), slot
            rows_tables[i] = tables[slot]
        return Prompts(ids, lengths, slots, rows_tables)

    def admission(self, placed: Sequence[tuple[int, Admitting]], rows: int) -> Admission:
        """An admission: the settings of `placed` (slot, admitting) pairs in `rows` rows. A slot checks the first
        DEVICE_STOP_IDS of its request's stop ids on the device; the scheduler checks them all."""
        slots = np.full((rows,), self.slots, np.int32)
        seeds, streams = np.zeros((rows,), np.uint32), np.zeros((rows,), np.int32)
        first_steps, max_tokens = np.zeros((rows,), np.int32), np.ones((rows,), np.int32)
        stop_ids = np.full((rows, DEVICE_STOP_IDS), -1, np.int32)
        logprobs = np.zeros((rows,), bool)
        for i, (slot, item) in enumerate(placed):
            request = item.request
            slots[i], seeds[i], streams[i], first_steps[i] = slot, request.seed, request.stream, item.first_step
            max_tokens[i], logprobs[i] = request.max_tokens, request.logprobs
            own = request.stop_ids[:DEVICE_STOP_IDS]
            stop_ids[i, : len(own)] = own
        sampling = RowSampling.of([a.request.sampling for _, a in placed] + [SamplingParams()] * (rows - len(placed)))
        return Admission(slots, seeds, streams, first_steps, sampling, max_tokens, stop_ids, logprobs)

    def chunk_of(self, slot: int, item: Admitting | None, start: int, bucket: int, tables=None) -> Chunk:
        """An extend call's piece of `item`'s ids from `start`, padded to `bucket`, with its slot's page table
        (no item: shapes)."""
        piece = item.ids[start : start + bucket] if item is not None else ()
        ids = np.full((1, bucket), self.pad_id, np.int32)
        ids[0, : len(piece)] = piece
        table = self._no_pages(1) if tables is None else tables[slot][None]
        return Chunk(
            ids,
            np.asarray([slot], np.int32),
            np.asarray([start], np.int32),
            np.asarray([len(piece)], np.int32),
            np.ascontiguousarray(table),
        )

    def tables(self, tables=None) -> np.ndarray:
        """Every slot's page table for a decode call (None: shapes only)."""
        return self._no_pages(self.slots) if tables is None else np.ascontiguousarray(tables)

    def _no_pages(self, rows: int) -> np.ndarray:
        return np.full((rows, self.pages_per_seq), self.num_pages, np.int32)

    def decode_inputs(self, active: Sequence[bool], steps: int, stop_early: bool) -> tuple:
        """A decode call's inputs: which slots decode, how many steps at most, whether to end at a finish."""
        if not 0 <= steps <= MAX_STEPS:
            raise ValueError(f"a decode call runs 0..{MAX_STEPS} steps, not {steps}")
        mask = np.zeros((self.slots,), bool)
        mask[: len(active)] = active
        return mask, np.int32(steps), np.bool_(stop_early)
