"""Automatic prefix caching, the host side: which whole chunks of prompt tokens the engine keeps the keys and
values of, and in which pages of the page pool (`pages.py`).

    cache = PrefixCache(chunk=256, capacity=64, pages=pool)
    pages = cache.lookup(prompt_ids)       # the pages of its leading chunks already kept: a sequence shares them
    cache.store(prompt_ids, slot_pages)    # keep its whole chunks not kept yet: the sequence's own pages
    cache.evict_oldest()                   # give pages back when a running sequence needs them

A chunk is keyed by its tokens and the key of the chunk before it (exactly, not by a hash alone), so a chunk is
found only behind the very same prefix: its keys and values, which depend on every token before them, are the
ones this prompt would compute. A kept chunk is a reference to the pages its first sequence wrote (no copy);
a sequence that finds it shares them, read-only: it writes only positions after its prompt's cached chunks,
which start a page of their own. Entries are evicted least recently used first, with the chunks that continue
them (they could no longer be reached): when more than `capacity` would be kept, or when a running sequence
needs pages. The prompt's last chunk is never taken from the cache, since its last token must be computed for
the first new token's logits; as the engine computes a prompt in these same chunks whether or not some were
cached, a request's tokens are the same with and without the cache.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

from llama_jax.inference.pages import PagePool

_ROOT = 0  # the key of "no chunk before"


@dataclasses.dataclass
class _Entry:
    key: int
    parent: int
    tokens: tuple[int, ...]
    pages: tuple[int, ...]  # of the page pool: the chunk's positions in order
    children: set[int] = dataclasses.field(default_factory=set)


class PrefixCache:
    def __init__(self, chunk: int, capacity: int, pages: PagePool):
        """`capacity`: chunks of `chunk` tokens it keeps at most (their pages stay out of the free pool)."""
        self.chunk, self.capacity, self.pages = chunk, capacity, pages
        self._by_content: dict[tuple[int, tuple[int, ...]], _Entry] = {}
        self._by_key: collections.OrderedDict[int, _Entry] = collections.OrderedDict()  # least recent first
        self._next_key = _ROOT + 1
        self.queried_tokens = 0  # prompt tokens that could have come from the cache
        self.hit_tokens = 0  # and did

    @property
    def used(self) -> int:
        return len(self._by_key)

    def lookup(self, prompt: Sequence[int]) -> list[int]:
        """The pages of the leading chunks of `prompt` that are kept, in order (most recently used now)."""
        reusable = (len(prompt) - 1) // self.chunk
        found = []
        for entry in self._chain(prompt, reusable):
            self._by_key.move_to_end(entry.key)
            found += entry.pages
        self.queried_tokens += reusable * self.chunk
        self.hit_tokens += len(found) * self.pages.page_size
        return found

    def store(self, prompt: Sequence[int], pages: Sequence[int]) -> None:
        """Keep the whole chunks of `prompt` not kept yet, in `pages` — the pages of a sequence that holds the
        prompt, in order. Older entries are evicted to make room, never this prompt's own chain."""
        whole = len(prompt) // self.chunk
        per_chunk = self.chunk // self.pages.page_size
        chain = self._chain(prompt, whole)
        for entry in chain:
            self._by_key.move_to_end(entry.key)
        protected = {entry.key for entry in chain}
        parent = chain[-1].key if chain else _ROOT
        for index in range(len(chain), whole):
            if not self._room(protected):
                break
            tokens = tuple(prompt[index * self.chunk : (index + 1) * self.chunk])
            held = tuple(pages[index * per_chunk : (index + 1) * per_chunk])
            self.pages.reference(held)
            entry = _Entry(self._next_key, parent, tokens, held)
            self._next_key += 1
            self._by_content[(parent, tokens)] = entry
            self._by_key[entry.key] = entry
            if parent != _ROOT:
                self._by_key[parent].children.add(entry.key)
            protected.add(entry.key)
            parent = entry.key

    def evict_oldest(self) -> bool:
        """Drop the least recently used entry (and what continues it): False when nothing is kept."""
        if not self._by_key:
            return False
        self._evict(next(iter(self._by_key.values())))
        return True

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

    def _room(self, protected: set[int]) -> bool:
        """Whether one more chunk may be kept, evicting unprotected entries to stay within the capacity."""
        while len(self._by_key) >= self.capacity:
            victim = next((e for e in self._by_key.values() if e.key not in protected), None)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _evict(self, entry: _Entry) -> None:
        for child in list(entry.children):
            self._evict(self._by_key[child])
        del self._by_key[entry.key]
        del self._by_content[(entry.parent, entry.tokens)]
        if entry.parent in self._by_key:
            self._by_key[entry.parent].children.discard(entry.key)
        self.pages.unreference(entry.pages)
