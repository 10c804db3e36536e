"""The device side of continuous batching as the scheduler sees it: what goes into a slot (`Admitting`) and the
calls it makes (`Backend`: `slots.SlotBackend` on the model, a deterministic fake in `tests/test_scheduler.py`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from llama_jax.inference.types import Request


@dataclasses.dataclass(frozen=True)
class Admitting:
    """A request going into a slot: the ids to prefill — its prompt, and after a preemption the tokens it had
    made too — and the sampling step its next token is drawn at."""

    ids: tuple[int, ...]
    request: Request
    first_step: int = 0


class Backend(Protocol):
    """The device side: prompts into slots and their pages, and decode steps over all slots."""

    slots: int
    chunk: int  # prompts longer than this are prefilled chunk by chunk; cached prefixes are whole chunks
    num_pages: int  # of the page pool
    page_size: int
    pages_per_seq: int  # a page table's length
    prefix_chunks: int  # chunks the prefix cache may keep (0: no prefix cache)
    mask_words: int  # int32 words of a grammar mask: one bit per token of the model's vocabulary
    follows_in_loop: bool  # the decode loop can ask for the next grammar masks between its steps

    def bucket(self, n: int) -> int:
        """The prompt-length bucket of an n-token prompt: prompts of one bucket are prefilled together."""

    def insert(
        self,
        slots: Sequence[int],
        items: Sequence[Admitting],
        bucket: int,
        tables: np.ndarray,
        allowed: Sequence[np.ndarray | None],
    ) -> tuple[list[int], list[float]]:
        """Prefill `items` (of at most `chunk` ids, all of bucket `bucket`) into `slots`, whose pages `tables`
        gives: each one's next token (among those its mask in `allowed` lets through, None: any) and its
        log-probability."""

    def extend(
        self, slot: int, item: Admitting, start: int, tables: np.ndarray, allowed: np.ndarray | None
    ) -> tuple[int, float] | None:
        """Prefill the chunk of `item`'s ids from `start` into `slot`; at their end, its next token (as
        `allowed` lets) and its log-probability."""

    def decode(
        self,
        steps: int,
        active: Sequence[bool],
        stop_early: bool,
        tables: np.ndarray,
        allowed: np.ndarray | None,
        follow: Callable[[np.ndarray, np.ndarray], np.ndarray] | None,
    ) -> tuple[list[list[int]], list[list[float]], int]:
        """Up to `steps` decode steps of the `active` slots, fewer when `stop_early` and a slot's request
        ends (a stop id or its budget): (slots, steps run) tokens and log-probabilities (free slots' are junk),
        and the steps run. `allowed` (slots, mask_words): the grammar masks of the slots' next tokens, None
        when none is constrained; `follow(tokens, advancing) -> masks` gives the next ones after each step
        (None: a call with a constrained slot runs one step)."""
