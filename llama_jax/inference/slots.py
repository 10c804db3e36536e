"""Continuous batching, the device side: the engine's arrays — the page pool of every sequence's keys and values
and the slots' sampling state — and the calls that run its programs on them.

    backend = SlotBackend.of(loaded, settings)           # settings resolved (`EngineSettings.resolve`)
    first, logprobs = backend.insert([3, 5], [a, b], bucket=64, tables=pages.table)   # short prompts, slots 3, 5
    result = backend.extend(2, long_one, 512, pages.table)   # its next chunk; at its end, its first token
    tokens, logprobs, steps = backend.decode(32, active=[s in (2, 3, 5) for s in range(8)], stop_early=False,
                                             tables=pages.table, allowed=None)   # allowed: grammar masks

The scheduler decides which pages each slot holds (`pages.py`) and passes the page tables with every call. A
prompt of at most `chunk` tokens is prefilled whole, with prompts of its length bucket (1 or `prefill_rows`
rows); a longer one chunk by chunk (`chunk` tokens each, at fixed positions 0, chunk, 2·chunk, ...): its first
chunk like a short prompt, the rest through the model's cache path, so that the engine can decode the other
slots between them. Which programs exist and how they are compiled is `compiled.EnginePrograms`; how requests
become their inputs is `packing.Packer`.

A slot's tokens are those it would get alone: a prompt is its row's only content, chunk boundaries do not move,
no block size depends on the rows beside it, and decoding's blocks a sequence cannot see add nothing to it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.inference.backend import Admitting
from llama_jax.inference.compiled import EnginePrograms
from llama_jax.inference.constraints import follow_in_loop, stop_following
from llama_jax.inference.settings import EngineSettings
from llama_jax.inference.types import Program
from llama_jax.loading import LoadedModel


class SlotBackend:
    """The model behind a `scheduler.Scheduler`: `slots` requests decode together, their keys and values in a
    pool of `num_pages` pages of `page_size` positions."""

    def __init__(self, programs: EnginePrograms, state, pad_id: int):
        self.programs, self.state = programs, state
        self.pool, self.slot_state = jax.tree.map(_zeros, programs.shapes)
        self.packer = dataclasses.replace(programs.packer, pad_id=pad_id)
        settings = programs.settings
        self.slots, self.chunk = programs.slots, programs.chunk
        self.num_pages, self.page_size = settings.num_pages, settings.block_size
        self.pages_per_seq, self.prefix_chunks = self.packer.pages_per_seq, settings.prefix_cache_chunks
        self.mask_words = self.packer.mask_words

    @classmethod
    def of(
        cls,
        loaded: LoadedModel,
        settings: EngineSettings,
        on_compile: Callable[[Program], None] | None = None,
        adapters: Sequence[str] = (),
    ) -> SlotBackend:
        """A backend over `loaded`'s parameters with an empty pool as `settings` (resolved) size it; `adapters`
        names the LoRA adapters of its bank, in order (`adapters.with_adapters`)."""
        graphdef, state = nnx.split(loaded.model)
        text_vocab = loaded.tokenizer.vocab_size if loaded.tokenizer is not None else 0
        # On a multi-host job each process's callback would see only its own rows: one-step calls there.
        follows = jax.process_count() == 1
        programs = EnginePrograms(
            graphdef, state, loaded.config, loaded.mesh, settings, on_compile, tuple(adapters), text_vocab, follows
        )
        pad_id = loaded.tokenizer.pad_id if loaded.tokenizer is not None else 0
        return cls(programs, state, pad_id)

    def bucket(self, n: int) -> int:
        return self.programs.bucket(n)

    def insert(
        self,
        slots: Sequence[int],
        items: Sequence[Admitting],
        bucket: int,
        tables: np.ndarray,
        allowed: Sequence[np.ndarray | None] = (),
    ) -> tuple[list[int], list[float]]:
        """Prefill whole prompts of at most `chunk` ids, all of `bucket`, into `slots`' pages: their next
        tokens, each among those its grammar mask `allowed` lets through (None: any)."""
        firsts, logprobs = [], []
        step = self.programs.prefill_rows
        allowed = list(allowed) + [None] * (len(items) - len(allowed))
        for start in range(0, len(items), step):
            group, group_slots = items[start : start + step], slots[start : start + step]
            rows = self.programs.prefill_rows_for(len(group))
            placed = list(zip(group_slots, group))
            prompts = self.packer.prompts(placed, rows, bucket, tables)
            logits = self._prefill(prompts, rows, bucket)
            token, logprob = self._admit(logits, placed, rows, allowed[start : start + step])
            firsts += np.asarray(token)[: len(group)].tolist()
            logprobs += np.asarray(logprob)[: len(group)].tolist()
        return firsts, logprobs

    def extend(
        self, slot: int, item: Admitting, start: int, tables: np.ndarray, allowed: np.ndarray | None = None
    ) -> tuple[int, float] | None:
        """Put the chunk of `item`'s ids from `start` (a multiple of `chunk`; the sequence holds the ids before
        it) into `slot`'s pages. At the ids' end: the next token (among those `allowed` lets through) and its
        log-probability."""
        ids = item.ids
        end = min(start + self.chunk, len(ids))
        if start == 0:  # the first chunk: as a short prompt, with the platform's flash attention
            first = dataclasses.replace(item, ids=ids[:end])
            prompts = self.packer.prompts([(slot, first)], 1, self.chunk, tables)
            logits = self._prefill(prompts, 1, self.chunk)
        else:
            bucket = self.programs.bucket(end - start)
            extend = self.programs.executable(Program("extend", 1, bucket))
            self.pool, logits = extend(self.state, self.pool, self.packer.chunk_of(slot, item, start, bucket, tables))
        if end < len(ids):
            return None
        token, logprob = self._admit(logits, [(slot, item)], 1, [allowed])
        return int(np.asarray(token)[0]), float(np.asarray(logprob)[0])

    def decode(
        self,
        steps: int,
        active: Sequence[bool],
        stop_early: bool,
        tables: np.ndarray,
        allowed: np.ndarray | None = None,
        follow: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    ) -> tuple[list[list[int]], list[list[float]], int]:
        """Up to `steps` (≤ MAX_STEPS) decode steps of the `active` slots; fewer when `stop_early` and a slot
        ends. `allowed`: each slot's grammar mask of its next token (None: no slot constrained); `follow(tokens,
        advancing) -> masks`: the host side of the grammars, asked after each step (None: the call ends after
        one step when a slot is constrained). Returns each slot's tokens and log-probabilities and the number of
        steps run. The step runs the first slots as far as the last active one (the scheduler fills the lowest
        free slots first)."""
        last = max((slot for slot, on in enumerate(active) if on), default=0)
        rows = next(r for r in self.programs.decode_rows if r > last)
        decode = self.programs.executable(Program("decode", rows))
        follower = follow_in_loop(follow) if follow is not None else 0
        try:
            inputs = self.packer.decode_inputs(active, steps, stop_early, allowed, follower)
            self.pool, self.slot_state, tokens, logprobs, ran = decode(
                self.state, self.pool, self.slot_state, self.packer.tables(tables), *inputs
            )
            ran = int(ran)  # (waits for the call: the follower answers until it ends)
        finally:
            stop_following(follower)
        idle = [[] for _ in range(self.slots - rows)]
        return np.asarray(tokens)[:, :ran].tolist() + idle, np.asarray(logprobs)[:, :ran].tolist() + idle, ran

    @property
    def follows_in_loop(self) -> bool:
        """Whether the decode loop can ask this process for grammar masks between its steps."""
        return self.programs.follows_in_loop

    def _prefill(self, prompts, rows: int, bucket: int):
        prefill = self.programs.executable(Program("prefill", rows, bucket))
        self.pool, logits = prefill(self.state, self.pool, prompts)
        return logits

    def _admit(self, logits, placed: list[tuple[int, Admitting]], rows: int, allowed: Sequence[np.ndarray | None]):
        admit = self.programs.executable(Program("admit", rows))
        admission = self.packer.admission(placed, rows, allowed)
        self.slot_state, token, logprob = admit(self.slot_state, logits, admission)
        return token, logprob


def _zeros(shape: jax.ShapeDtypeStruct):
    """An array of `shape`'s shape, dtype and sharding, zero (random keys: any valid keys), created by the
    devices that hold it: its sharding may span other processes' devices too."""
    return _zeros_program(shape.shape, shape.dtype, shape.sharding)()


@functools.lru_cache(maxsize=64)
def _zeros_program(shape: tuple[int, ...], dtype, sharding):
    """The compiled maker of `_zeros`, kept: an engine made again for the same shapes (GRPO makes one per rollout
    on the new parameters) would otherwise compile each of its arrays' makers again, ~0.8 s an engine on CPU."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        make = lambda: jax.random.split(jax.random.key(0), shape[0])  # noqa: E731
    else:
        make = lambda: jnp.zeros(shape, dtype)  # noqa: E731
    return jax.jit(make, out_shardings=sharding)
