"""The host side of every device call: requests and page tables packed into the numpy arrays a program takes.
The same functions build the arrays of a real call and, from no requests, the shapes a program is lowered
from, so a program compiled ahead of time is the one every call runs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from llama_jax.inference.backend import Admitting
from llama_jax.inference.programs import DEVICE_STOP_IDS, Admission, Chunk, Prompts
from llama_jax.inference.sampling import RowSampling, SamplingParams
from llama_jax.inference.settings import MAX_STEPS
from llama_jax.inference.types import Request


@dataclasses.dataclass(frozen=True)
class Packer:
    """Packs requests for an engine of `slots` decode slots whose page tables have `pages_per_seq` entries of a
    pool of `num_pages`, prompts prefilled in chunks of `chunk` tokens and padded with `pad_id`. A row whose
    slot is `slots` (out of range) is padding: the programs drop what it computes; a table entry of
    `num_pages` is no page (a write there is dropped). A grammar mask has `mask_words` int32 words a row (all
    ones: unconstrained); a request's adapter is its index in `adapters` plus one (0: the base model)."""

    slots: int
    pages_per_seq: int
    num_pages: int
    chunk: int
    mask_words: int
    adapters: tuple[str, ...] = ()
    pad_id: int = 0

    def adapter_index(self, request: Request | None) -> int:
        if request is None or request.adapter is None:
            return 0
        return self.adapters.index(request.adapter) + 1

    @functools.cached_property
    def unconstrained(self) -> np.ndarray:
        """Every slot's mask, all ones: what a decode call without a constrained request takes (made once)."""
        return np.full((self.slots, self.mask_words), -1, np.int32)

    def prompts(self, placed: Sequence[tuple[int, Admitting]], rows: int, bucket: int, tables=None) -> Prompts:
        """A prefill's prompts: `placed` (slot, admitting) pairs right-padded in `rows` rows of `bucket`, each
        with its slot's row of `tables` (the page pool's; None: shapes only)."""
        ids = np.full((rows, bucket), self.pad_id, np.int32)
        lengths = np.ones((rows,), np.int32)
        slots = np.full((rows,), self.slots, np.int32)
        adapters = np.zeros((rows,), np.int32)
        rows_tables = self._no_pages(rows)
        for i, (slot, item) in enumerate(placed):
            ids[i, : len(item.ids)], lengths[i], slots[i] = item.ids, len(item.ids), slot
            adapters[i] = self.adapter_index(item.request)
            rows_tables[i] = tables[slot]
        return Prompts(ids, lengths, slots, rows_tables, adapters)

    def admission(
        self, placed: Sequence[tuple[int, Admitting]], rows: int, allowed: Sequence[np.ndarray | None] = ()
    ) -> Admission:
        """An admission: the settings of `placed` (slot, admitting) pairs in `rows` rows, and the grammar
        masks of their first tokens (`allowed`, None or missing: unconstrained). A slot checks the first
        DEVICE_STOP_IDS of its request's stop ids on the device; the scheduler checks them all."""
        slots = np.full((rows,), self.slots, np.int32)
        seeds, streams = np.zeros((rows,), np.uint32), np.zeros((rows,), np.int32)
        first_steps, max_tokens = np.zeros((rows,), np.int32), np.ones((rows,), np.int32)
        stop_ids = np.full((rows, DEVICE_STOP_IDS), -1, np.int32)
        logprobs = np.zeros((rows,), bool)
        masks = np.full((rows, self.mask_words), -1, np.int32)
        adapters = np.zeros((rows,), np.int32)
        for i, (slot, item) in enumerate(placed):
            request = item.request
            slots[i], seeds[i], streams[i], first_steps[i] = slot, request.seed, request.stream, item.first_step
            max_tokens[i], logprobs[i] = request.max_tokens, request.logprobs
            own = request.stop_ids[:DEVICE_STOP_IDS]
            stop_ids[i, : len(own)] = own
            adapters[i] = self.adapter_index(request)
            if i < len(allowed) and allowed[i] is not None:
                masks[i] = allowed[i]
        sampling = RowSampling.of([a.request.sampling for _, a in placed] + [SamplingParams()] * (rows - len(placed)))
        return Admission(slots, seeds, streams, first_steps, sampling, max_tokens, stop_ids, logprobs, masks, adapters)

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
            np.asarray([self.adapter_index(item.request if item is not None else None)], np.int32),
        )

    def tables(self, tables=None) -> np.ndarray:
        """Every slot's page table for a decode call (None: shapes only)."""
        return self._no_pages(self.slots) if tables is None else np.ascontiguousarray(tables)

    def _no_pages(self, rows: int) -> np.ndarray:
        return np.full((rows, self.pages_per_seq), self.num_pages, np.int32)

    def decode_inputs(
        self,
        active: Sequence[bool],
        steps: int,
        stop_early: bool,
        allowed: np.ndarray | None = None,
        follower: int = 0,
    ) -> tuple:
        """A decode call's inputs: which slots decode, how many steps at most, whether to end at a finish,
        each slot's grammar mask (slots, mask_words) when some request is constrained, and the number of the
        host's follower of those grammars (`constraints.follow_in_loop`; 0: none)."""
        if not 0 <= steps <= MAX_STEPS:
            raise ValueError(f"a decode call runs 0..{MAX_STEPS} steps, not {steps}")
        mask = np.zeros((self.slots,), bool)
        mask[: len(active)] = active
        allowed = self.unconstrained if allowed is None else allowed
        return mask, np.int32(steps), np.bool_(stop_early), allowed, np.int32(follower)
