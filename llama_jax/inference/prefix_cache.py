"""Automatic prefix caching, the host side: which whole chunks of prompt tokens the engine keeps keys and values
for, and where in its pool.

    cache = PrefixCache(chunk=256, capacity=64)
    entries = cache.lookup(prompt_ids)     # pool entries of the leading chunks already kept: copy them in
    saved = cache.store(prompt_ids)        # {chunk index: pool entry} of its whole chunks not kept yet: copy out

A chunk is keyed by its tokens and the key of the chunk before it (exactly, not by a hash alone), so a chunk is
found only behind the very same prefix: its keys and values, which depend on every token before them, are the
ones this prompt would compute. Entries are evicted least recently used first, with the chunks that continue
them (they could no longer be reached). The prompt's last chunk is never taken from the cache, since its last
token must be computed for the first new token's logits; as the engine computes a prompt in these same chunks
whether or not some were cached, a request's tokens are the same with and without the cache.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

_ROOT = 0  # the key of "no chunk before"


@dataclasses.dataclass
class _Entry:
    key: int
    parent: int
    tokens: tuple[int, ...]
    slot: int  # in the pool
    children: set[int] = dataclasses.field(default_factory=set)


class PrefixCache:
    def __init__(self, chunk: int, capacity: int):
        """`capacity`: the pool's entries, each one chunk of `chunk` tokens."""
        self.chunk, self.capacity = chunk, capacity
        self._by_content: dict[tuple[int, tuple[int, ...]], _Entry] = {}
        self._by_key: collections.OrderedDict[int, _Entry] = collections.OrderedDict()  # least recent first
        self._free = list(range(capacity - 1, -1, -1))
        self._next_key = _ROOT + 1
        self.queried_tokens = 0  # prompt tokens that could have come from the cache
        self.hit_tokens = 0  # and did

    @property
    def used(self) -> int:
        return len(self._by_key)

    def lookup(self, prompt: Sequence[int]) -> list[int]:
        """Pool entries of the leading chunks of `prompt` that are kept, in order (most recently used now)."""
        reusable = (len(prompt) - 1) // self.chunk
        found = []
        for entry in self._chain(prompt, reusable):
            self._by_key.move_to_end(entry.key)
            found.append(entry.slot)
        self.queried_tokens += reusable * self.chunk
        self.hit_tokens += len(found) * self.chunk
        return found

    def store(self, prompt: Sequence[int]) -> dict[int, int]:
        """Keep the whole chunks of `prompt` that are not kept yet: {chunk index: pool entry} to copy them to.
        Older entries are evicted to make room, never this prompt's own chain."""
        whole = len(prompt) // self.chunk
        chain = self._chain(prompt, whole)
        for entry in chain:
            self._by_key.move_to_end(entry.key)
        protected = {entry.key for entry in chain}
        parent = chain[-1].key if chain else _ROOT
        placed = {}
        for index in range(len(chain), whole):
            slot = self._take_slot(protected)
            if slot is None:
                break
            tokens = tuple(prompt[index * self.chunk : (index + 1) * self.chunk])
            entry = _Entry(self._next_key, parent, tokens, slot)
            self._next_key += 1
            self._by_content[(parent, tokens)] = entry
            self._by_key[entry.key] = entry
            if parent != _ROOT:
                self._by_key[parent].children.add(entry.key)
            protected.add(entry.key)
            placed[index] = slot
            parent = entry.key
        return placed

    def _chain(self, prompt: Sequence[int], chunks: int) -> list[_Entry]:
        """The kept entries of prompt's chunks 0, 1, ... up to `chunks`, as far as they are kept."""
        found, parent = [], _ROOT
        for index in range(chunks):
            entry = self._by_content.get((parent, tuple(prompt[index * self.chunk : (index + 1) * self.chunk])))
            if entry is None:
                break
            found.append(entry)
            parent = entry.key
        return found

    def _take_slot(self, protected: set[int]) -> int | None:
        while not self._free:
            victim = next((e for e in self._by_key.values() if e.key not in protected), None)
            if victim is None:
                return None
            self._evict(victim)
        return self._free.pop()

    def _evict(self, entry: _Entry) -> None:
        for child in list(entry.children):
            self._evict(self._by_key[child])
        del self._by_key[entry.key]
        del self._by_content[(entry.parent, entry.tokens)]
        if entry.parent in self._by_key:
            self._by_key[entry.parent].children.discard(entry.key)
        self._free.append(entry.slot)
