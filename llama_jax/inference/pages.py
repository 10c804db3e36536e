"""The page pool, the host side: which pages of the KV cache each sequence holds.

    pages = PagePool(num_pages=512, page_size=16, slots=8, pages_per_seq=64)
    pages.grow(3, 40)            # slot 3 holds pages for its first 40 positions (False: not enough free pages)
    pages.share(3, (7, 8))       # or starts with pages a cached prefix holds (their references counted)
    pages.table                  # (slots, pages_per_seq) int32: what each device call is given
    pages.release(3)             # its pages go back, those nobody else references to the free list

A page is referenced by the sequences whose tables hold it and by the prefix cache (`prefix_cache.py`); it is
free when nobody does. Free pages are taken lowest first, so every process of a multi-host job, making the
same requests, hands out the same pages. Table entries past a sequence's pages hold `num_pages`: out of the
pool, so a device write there is dropped.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np


class PagePool:
    def __init__(self, num_pages: int, page_size: int, slots: int, pages_per_seq: int):
        self.num_pages, self.page_size, self.pages_per_seq = num_pages, page_size, pages_per_seq
        self.table = np.full((slots, pages_per_seq), num_pages, np.int32)
        self.held = [0] * slots  # pages in each slot's table
        self._refs = np.zeros((num_pages,), np.int32)
        self._free = list(range(num_pages))  # a heap: the lowest free page first

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, positions: int) -> int:
        return min(-(-positions // self.page_size), self.pages_per_seq)

    def missing(self, slot: int, positions: int) -> int:
        """Pages `slot` lacks to hold its first `positions` positions."""
        return max(0, self.pages_for(positions) - self.held[slot])

    def grow(self, slot: int, positions: int) -> bool:
        """Give `slot` fresh pages up to its first `positions` positions; False (and nothing taken) when the
        free pages are too few."""
        need = self.missing(slot, positions)
        if need > len(self._free):
            return False
        for _ in range(need):
            page = heapq.heappop(self._free)
            self._refs[page] = 1
            self.table[slot, self.held[slot]] = page
            self.held[slot] += 1
        return True

    def share(self, slot: int, pages: Sequence[int]) -> None:
        """Put `pages` (a cached prefix's) next in `slot`'s table, referenced by it too."""
        for page in pages:
            self._refs[page] += 1
            self.table[slot, self.held[slot]] = page
            self.held[slot] += 1

    def pages_of(self, slot: int) -> list[int]:
        return self.table[slot, : self.held[slot]].tolist()

    def reference(self, pages: Sequence[int]) -> None:
        """One more holder of `pages` (the prefix cache keeping them)."""
        for page in pages:
            self._refs[page] += 1

    def unreference(self, pages: Sequence[int]) -> None:
        """One holder fewer; a page nobody holds is free again."""
        for page in pages:
            self._refs[page] -= 1
            if self._refs[page] == 0:
                heapq.heappush(self._free, page)

    def release(self, slot: int) -> None:
        """`slot` holds nothing any more (its request ended, or was preempted)."""
        self.unreference(self.pages_of(slot))
        self.table[slot] = self.num_pages
        self.held[slot] = 0
