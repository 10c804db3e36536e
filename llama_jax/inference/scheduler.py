"""Continuous batching, the host side: which request gets which decode slot and which pages, and when a request
is done.

    scheduler = Scheduler(backend, max_queue=64, steps_per_dispatch=8, text=decoder)
    handle = scheduler.submit_all([Request(prompt_ids, max_tokens=64, ...)], on_event)   # on_event(0, event)
    while scheduler.busy: scheduler.step()      # admissions, prefill chunks, then one multi-step decode call

Each step admits queued requests into free slots, first come first served, while the page pool (`pages.py`)
holds their prompts beside what the running ones need next: prompts of at most one chunk are prefilled whole,
those of one length bucket together; a longer prompt takes its slot, shares the pages of the chunks of its
prefix the prefix cache holds (`prefix_cache.py`), and is prefilled chunk by chunk, `PREFILL_BUDGET` chunks'
worth of prompt tokens per step (the oldest prompt first; one's last, partial chunk and the next one's first
share a step), so that the slots already decoding keep producing between them (chunked prefill). Then the step
gives every running slot the pages of its next `steps` tokens and runs up to `steps_per_dispatch` decode steps
of every live slot in one call to the backend — at most `INTERLEAVED_STEPS` while a prompt is being prefilled,
fewer when requests are waiting and a slot finishes so that they get it at once — and hands each request its
new tokens, finishing it at a stop id, a stop string or its token budget (or when cancelled), which frees its
slot and pages.

A request constrained by a grammar (`constraints.py`) has a follower that gives the mask of its next token and
takes each token: its admission samples under its first mask; a decode call while one is running takes every
slot's mask and, between its steps, asks the scheduler for the next ones (`_advance_grammars`, called from the
device loop) — or, where the backend cannot call back (a multi-host job), runs one step. The others' tokens are
unchanged. Its text is complete when its grammar is: it finishes then with "stop".

When the pool runs out, the prefix cache gives back its least recently used pages first; then the newest
sequence is preempted: its pages go back and it waits at the head of the queue, to be prefilled again — its
prompt and the tokens it had made — and go on from the step it had reached (vLLM's recompute preemption). Its
tokens are the ones it would have made: its sampling depends on its seed, stream and step only, and a prompt's
keys and values do not depend on how they were computed beyond float rounding (which the tests show does not
change the tokens).

The rules live here, in plain Python, so they are tested with a deterministic fake backend
(`tests/test_scheduler.py`); `slots.SlotBackend` runs them on the model. The engine (`engine.py`) is the only
user of this class.
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Callable, Sequence

import numpy as np

from llama_jax.inference.backend import Admitting, Backend
from llama_jax.inference.constraints import Constraint, Follower, fill_masks
from llama_jax.inference.pages import PagePool
from llama_jax.inference.prefix_cache import PrefixCache
from llama_jax.inference.types import Event, Handle, QueueFull, Request

# While prompts are being prefilled, a step computes about PREFILL_BUDGET chunks of them, then INTERLEAVED_STEPS
# decode steps of the running slots: on the CPU benchmark model (16 slots, chunks of 256) each half takes about
# as long as the other, so streams keep at least half their speed while long prompts arrive, and those prompts
# half of the device (benchmarks/serve_chunked_prefill.py).
PREFILL_BUDGET = 2
INTERLEAVED_STEPS = 8


class _Live:
    """A submitted request as the scheduler follows it."""

    def __init__(self, request: Request, on_event: Callable[[Event], None], handle: Handle):
        self.request, self.on_event, self.handle = request, on_event, handle
        self.token_ids: list[int] = []  # generated so far (stop ids excluded)
        self.logprobs: list[float] = []
        self.text = ""  # what has been handed out
        self.prefilled = 0  # of `admitting.ids` in its slot so far (a prompt prefilled chunk by chunk)
        self.order = 0  # when it arrived: the newest in a slot is preempted first
        self.admitting = Admitting(request.prompt_ids, request)
        self.grammar: Follower | None = None  # a constrained request's place in its grammar

    @property
    def cancelled(self) -> bool:
        return self.handle.cancelled

    def resume(self) -> None:
        """Preempted: prefill its prompt and the tokens it made again, and sample on from its step."""
        self.admitting = Admitting(self.request.prompt_ids + tuple(self.token_ids), self.request, len(self.token_ids))
        self.prefilled = 0


class Scheduler:
    def __init__(
        self,
        backend: Backend,
        *,
        max_queue: int,
        steps_per_dispatch: int,
        text: Callable[[Sequence[int], Sequence[int]], str],
        follow: Callable[[Constraint], Follower] | None = None,
    ):
        """`text(prompt_ids, generated_ids)`: the text the generated ids add after the prompt; `follow(constraint)`:
        a follower of a constrained request's grammar (`constraints.Grammars.follow`)."""
        self.backend = backend
        self.follow = follow
        self.max_queue = max_queue
        self.steps_per_dispatch = steps_per_dispatch
        self.text = text
        self.queue: collections.deque[_Live] = collections.deque()
        self.prefilling: dict[int, _Live] = {}  # slot -> request whose prompt is going in, oldest first
        self.running: dict[int, _Live] = {}  # slot -> request
        self.lock = threading.Lock()  # submit() and cancel() come from other threads than step()
        self.pages = PagePool(backend.num_pages, backend.page_size, backend.slots, backend.pages_per_seq)
        self.prefix = PrefixCache(backend.chunk, backend.prefix_chunks, self.pages) if backend.prefix_chunks else None
        self.preemptions = 0
        self._arrivals = itertools.count()

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.prefilling or self.running)

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Handle:
        return self.submit_all([request], lambda _, event: on_event(event))

    def submit_all(self, requests: Sequence[Request], on_event: Callable[[int, Event], None]) -> Handle:
        """Queue all of `requests` or none (QueueFull); request i's events go to on_event(i, event)."""
        handle = Handle()
        live = [self._live(r, lambda event, i=i: on_event(i, event), handle) for i, r in enumerate(requests)]
        with self.lock:
            if len(self.queue) + len(live) > self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are waiting already")
            for one in live:
                one.order = next(self._arrivals)
            self.queue.extend(live)
        return handle

    def enqueue(self, request: Request, on_event: Callable[[Event], None], handle: Handle) -> None:
        """Queue a request whose admission was decided elsewhere (`lockstep.py`: by process 0 of a job)."""
        live = self._live(request, on_event, handle)
        with self.lock:
            live.order = next(self._arrivals)
            self.queue.append(live)

    def _live(self, request: Request, on_event: Callable[[Event], None], handle: Handle) -> _Live:
        live = _Live(request, on_event, handle)
        if request.constraint is not None:
            if self.follow is None:
                raise ValueError("this engine has no tokenizer to follow a grammar with")
            live.grammar = self.follow(request.constraint)
        return live

    def _mask(self, live: _Live) -> np.ndarray | None:
        """The grammar mask of a constrained request's next token (None: unconstrained)."""
        if live.grammar is None:
            return None
        row = np.empty((self.backend.mask_words,), np.int32)
        live.grammar.fill(row)
        return row

    def held(self) -> tuple[int, int]:
        """(requests in a slot, cache positions their pages hold)."""
        live = len(self.running) + len(self.prefilling)
        return live, self.pages.in_use * self.pages.page_size

    def step(self) -> None:
        """Admit what fits, prefill a chunk, then decode: one pass of the engine's loop."""
        self._drop_cancelled()
        self._admit()
        self._prefill_chunks()
        if not self.running:
            return
        steps = min(self.steps_per_dispatch, INTERLEAVED_STEPS) if self.prefilling else self.steps_per_dispatch
        constrained = any(live.grammar is not None for live in self.running.values())
        in_loop = constrained and self.backend.follows_in_loop
        if constrained and not in_loop:
            steps = 1  # the host computes each next mask between calls
        self._make_room(steps)
        if not self.running:
            return
        active = [slot in self.running for slot in range(self.backend.slots)]
        allowed = self._masks(self.backend.slots) if constrained else None
        follow = self._advance_grammars if in_loop else None
        tokens, logprobs, _ = self.backend.decode(steps, active, bool(self.queue), self.pages.table, allowed, follow)
        for slot, live in list(self.running.items()):
            self._deliver(slot, live, tokens[slot], logprobs[slot], followed=in_loop)

    def _masks(self, rows: int) -> np.ndarray:
        """The grammar masks of the first `rows` slots' next tokens (all ones for an unconstrained one)."""
        masks = np.full((rows, self.backend.mask_words), -1, np.int32)
        fill_masks([(live.grammar, slot) for slot, live in self.running.items() if slot < rows and live.grammar], masks)
        return masks

    def _advance_grammars(self, tokens: np.ndarray, advancing: np.ndarray) -> np.ndarray:
        """The decode loop's question after each step (from another thread, while `step` waits for the call):
        each constrained slot that goes on takes its token; every slot's next mask."""
        for slot, live in self.running.items():
            if slot < len(tokens) and advancing[slot] and live.grammar is not None:
                live.grammar.accept(int(tokens[slot]))
        return self._masks(len(tokens))

    def _drop_cancelled(self) -> None:
        with self.lock:
            waiting = [h for h in self.queue if h.cancelled]
            for live in waiting:
                self.queue.remove(live)
        for live in waiting:
            live.on_event(Event([], "", [], "cancelled"))
        for slot, live in list(self.prefilling.items()):
            if live.cancelled:
                del self.prefilling[slot]
                self.pages.release(slot)
                live.on_event(Event([], "", [], "cancelled"))
        for slot, live in list(self.running.items()):
            if live.cancelled:
                self._finish(slot, live, [], "cancelled")

    def _admit(self) -> None:
        """First come, first served: the longest-waiting request is always admitted first, once the pool holds
        its prompt beside the next pages of the sequences already in; short prompts behind it in the same prompt
        bucket join its prefill while slots and pages remain. A long prompt takes a slot of its own and the
        pages of the chunks of its prefix that the cache holds."""
        free = self._free()
        while free:
            with self.lock:
                if not self.queue:
                    return
                head = self.queue[0]
                ids = head.admitting.ids
                chunked = len(ids) > self.backend.chunk
                if not self._room_for(self.backend.chunk if chunked else self._next_call(len(ids))):
                    return  # it waits for pages; nobody overtakes it
                group = [self.queue.popleft()]
                if not chunked:
                    self.pages.grow(free[0], len(ids))
                    bucket = self._bucket(head)
                    for live in [h for h in self.queue if self._fits(h) and self._bucket(h) == bucket]:
                        others = [(s, self._next_call(len(h.admitting.ids))) for s, h in zip(free, group)]
                        if len(group) == len(free) or not self._room_for(
                            self._next_call(len(live.admitting.ids)), others
                        ):
                            break
                        self.pages.grow(free[len(group)], len(live.admitting.ids))
                        self.queue.remove(live)
                        group.append(live)
            if chunked:
                self._start_chunked(free[0], head)
            else:
                slots = free[: len(group)]
                items, masks = [h.admitting for h in group], [self._mask(h) for h in group]
                first, logprobs = self.backend.insert(slots, items, bucket, self.pages.table, masks)
                for slot, live, token, logprob in zip(slots, group, first, logprobs):
                    self.running[slot] = live
                    self._deliver(slot, live, [token], [logprob])
            free = self._free()

    def _next_call(self, prompt: int) -> int:
        """Positions the next decode call gives a sequence admitted with `prompt` ids and its first token."""
        return prompt + 1 + self.steps_per_dispatch

    def _room_for(self, positions: int, admitted: Sequence[tuple[int, int]] = ()) -> bool:
        """Whether the pool has the pages of `positions` more positions beside those the sequences already in —
        running, and `admitted` (slot, positions) in this step — need for their next decode call (evicting
        cached prefixes to make them free if it must)."""
        running = [(s, self._length(live) + self.steps_per_dispatch) for s, live in self.running.items()]
        reserve = sum(self.pages.missing(s, n) for s, n in (*running, *admitted))
        need = self.pages.pages_for(positions) + reserve
        while self.pages.free < need and self.prefix is not None and self.prefix.evict_oldest():
            pass
        return self.pages.free >= need

    def _start_chunked(self, slot: int, live: _Live) -> None:
        """Its slot takes the pages of the cached chunks of its prefix; the chunks after them get theirs as
        they are prefilled."""
        cached = self.prefix.lookup(live.admitting.ids) if self.prefix is not None else []
        self.pages.share(slot, cached)
        live.prefilled = len(cached) * self.pages.page_size
        self.prefilling[slot] = live

    def _prefill_chunks(self) -> None:
        """Chunks of the prompts being prefilled, the oldest first, until PREFILL_BUDGET chunks' worth of tokens
        are computed; all of them while no slot is decoding. A chunk waits for its pages (preempting newer
        sequences when none are left)."""
        done = 0
        while self.prefilling and (done < PREFILL_BUDGET * self.backend.chunk or not self.running):
            slot, live = next(iter(self.prefilling.items()))
            ids = live.admitting.ids
            end = min(live.prefilled + self.backend.chunk, len(ids))
            if not self._grow_or_preempt(slot, live, end):
                continue  # it was preempted itself
            mask = self._mask(live) if end == len(ids) else None
            first = self.backend.extend(slot, live.admitting, live.prefilled, self.pages.table, mask)
            done += end - live.prefilled
            live.prefilled = end
            if first is not None:
                del self.prefilling[slot]
                if self.prefix is not None:
                    self.prefix.store(ids, self.pages.pages_of(slot))
                self.running[slot] = live
                self._deliver(slot, live, [first[0]], [first[1]])

    def _make_room(self, steps: int) -> None:
        """Pages for the next `steps` tokens of every running sequence, the oldest first."""
        for slot, live in sorted(self.running.items(), key=lambda item: item[1].order):
            if slot in self.running:
                self._grow_or_preempt(slot, live, self._length(live) + steps)

    def _grow_or_preempt(self, slot: int, live: _Live, positions: int) -> bool:
        """Grow `slot` to `positions`: evict cached prefixes, then preempt the newest sequences, until it fits;
        False when `live` itself was the newest and was preempted."""
        while not self.pages.grow(slot, positions):
            if self.prefix is not None and self.prefix.evict_oldest():
                continue
            newest_slot, newest = max((*self.running.items(), *self.prefilling.items()), key=lambda item: item[1].order)
            self._preempt(newest_slot, newest)
            if newest is live:
                return False
        return True

    def _preempt(self, slot: int, live: _Live) -> None:
        self.running.pop(slot, None)
        self.prefilling.pop(slot, None)
        self.pages.release(slot)
        live.resume()
        self.preemptions += 1
        with self.lock:
            self.queue.appendleft(live)

    def _length(self, live: _Live) -> int:
        """Positions a running request's sequence will hold once its last token is written (the pages of a
        decode call of `steps` cover this + `steps`: one position more than it writes)."""
        return len(live.request.prompt_ids) + len(live.token_ids)

    def _free(self) -> list[int]:
        return [s for s in range(self.backend.slots) if s not in self.running and s not in self.prefilling]

    def _fits(self, live: _Live) -> bool:
        return len(live.admitting.ids) <= self.backend.chunk

    def _bucket(self, live: _Live) -> int:
        return self.backend.bucket(len(live.admitting.ids))

    def _deliver(
        self, slot: int, live: _Live, tokens: Sequence[int], logprobs: Sequence[float], followed: bool = False
    ) -> None:
        """Hand a request its new tokens, finishing it at a stop id, a stop string, its budget or the end of its
        grammar. `followed`: its grammar took the tokens already, inside the decode loop (after the end of the
        grammar the loop allowed only a stop id)."""
        request = live.request
        grammar = live.grammar if not followed else None
        new_ids: list[int] = []
        new_logprobs: list[float] = []
        reason = None
        for token, logprob in zip(tokens, logprobs):
            if token in request.stop_ids or (grammar is not None and not grammar.accept(token)):
                reason = "stop"  # (a token its grammar refuses cannot be sampled under its mask)
                break
            new_ids.append(int(token))
            if request.logprobs:
                new_logprobs.append(float(logprob))
            if grammar is not None and grammar.finished:
                reason = "stop"  # the grammar is complete: only an end of sequence could follow
                break
            if len(live.token_ids) + len(new_ids) == request.max_tokens:
                reason = "length"
                break
        if followed and reason is None and live.grammar is not None and live.grammar.finished:
            reason = "stop"
        live.token_ids += new_ids
        live.logprobs += new_logprobs
        text = self.text(request.prompt_ids, live.token_ids)
        stop_at = min((i for i in (text.find(s) for s in request.stop_strings) if i >= 0), default=-1)
        if stop_at >= 0:
            text, reason = text[:stop_at], "stop"
        if reason is not None:
            self._finish(slot, live, new_ids, reason, new_logprobs, text)
            return
        # Hold back what may still turn into a stop string, and a character still missing bytes.
        hold = max((len(s) - 1 for s in request.stop_strings), default=0)
        shown = text[: max(len(live.text), len(text) - hold)]
        while shown.endswith("\ufffd"):
            shown = shown[:-1]
        if new_ids:
            live.on_event(Event(new_ids, shown[len(live.text) :], new_logprobs))
            live.text = shown

    def _finish(
        self,
        slot: int,
        live: _Live,
        new_ids: list[int],
        reason: str,
        new_logprobs: Sequence[float] = (),
        text: str | None = None,
    ) -> None:
        del self.running[slot]
        self.pages.release(slot)
        text = live.text if text is None else text
        live.on_event(Event(new_ids, text[len(live.text) :], list(new_logprobs), reason))
        live.text = text
