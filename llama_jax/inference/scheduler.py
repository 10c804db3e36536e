"""Continuous batching, the host side: which request gets which decode slot, and when a request is done.

    scheduler = Scheduler(backend, max_queue=64, steps_per_dispatch=8, text=decoder)
    handle = scheduler.submit_all([Request(prompt_ids, max_tokens=64, ...)], on_event)   # on_event(0, event)
    while scheduler.busy: scheduler.step()      # admissions, prefill chunks, then one multi-step decode call

Each step admits queued requests into free slots, first come first served: prompts of at most one chunk are
prefilled whole, those of one length bucket together; a longer prompt takes its slot, copies in the chunks of
its prefix the prefix cache holds (`prefix_cache.py`), and is prefilled chunk by chunk, `PREFILL_BUDGET`
chunks' worth of prompt tokens per step (the oldest prompt first; one's last, partial chunk and the next one's
first share a step), so that the slots already decoding keep producing between them (chunked prefill). Then
the step runs up to
`steps_per_dispatch` decode steps of every live slot in one call to the backend — at most
`INTERLEAVED_STEPS` while a prompt is being prefilled, fewer when requests are waiting and a slot finishes so
that they get it at once — and hands each request its new tokens, finishing it at a stop id, a stop string
or its token budget (or when cancelled), which frees its slot for the next admission. The rules live here, in
plain Python, so they are tested with a deterministic fake backend (`tests/test_scheduler.py`);
`slots.SlotBackend` runs them on the model. The engine (`engine.py`) is the only user of this class.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

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
        self.prefilled = 0  # prompt tokens in its slot so far (a prompt prefilled chunk by chunk)

    @property
    def cancelled(self) -> bool:
        return self.handle.cancelled


class Backend(Protocol):
    """The device side: prompts into slots, and decode steps over all slots."""

    slots: int
    chunk: int  # prompts longer than this are prefilled chunk by chunk; cached prefixes are whole chunks
    pool_size: int  # chunks the prefix pool holds (0: no prefix cache)

    def bucket(self, n: int) -> int:
        """The prompt-length bucket of an n-token prompt: prompts of one bucket are prefilled together."""

    def insert(self, slots: Sequence[int], requests: Sequence[Request], bucket: int) -> tuple[list[int], list[float]]:
        """Prefill `requests` (prompts of at most `chunk` tokens, all of bucket `bucket`) into `slots`: each
        one's first token and its log-probability."""

    def extend(self, slot: int, request: Request, start: int) -> tuple[int, float] | None:
        """Prefill the chunk of `request`'s prompt from `start` into `slot`; at the prompt's end, its first
        token and log-probability."""

    def restore(self, slot: int, entries: Sequence[int]) -> None:
        """Copy prefix pool `entries` into the leading chunks of `slot`."""

    def save(self, slot: int, entries: dict[int, int]) -> None:
        """Copy chunk i of `slot` into pool entry entries[i]."""

    def decode(
        self, steps: int, active: Sequence[bool], stop_early: bool
    ) -> tuple[list[list[int]], list[list[float]], int]:
        """Up to `steps` decode steps of the `active` slots, fewer when `stop_early` and a slot's request
        ends (a stop id or its budget): (slots, steps run) tokens and log-probabilities (free slots' are junk),
        and the steps run."""


class Scheduler:
    def __init__(
        self,
        backend: Backend,
        *,
        max_queue: int,
        steps_per_dispatch: int,
        text: Callable[[Sequence[int], Sequence[int]], str],
    ):
        """`text(prompt_ids, generated_ids)`: the text the generated ids add after the prompt."""
        self.backend = backend
        self.max_queue = max_queue
        self.steps_per_dispatch = steps_per_dispatch
        self.text = text
        self.queue: collections.deque[_Live] = collections.deque()
        self.prefilling: dict[int, _Live] = {}  # slot -> request whose prompt is going in, oldest first
        self.running: dict[int, _Live] = {}  # slot -> request
        self.lock = threading.Lock()  # submit() and cancel() come from other threads than step()
        self.prefix = PrefixCache(backend.chunk, backend.pool_size) if backend.pool_size else None

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.prefilling or self.running)

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Handle:
        return self.submit_all([request], lambda _, event: on_event(event))

    def submit_all(self, requests: Sequence[Request], on_event: Callable[[int, Event], None]) -> Handle:
        """Queue all of `requests` or none (QueueFull); request i's events go to on_event(i, event)."""
        handle = Handle()
        live = [_Live(r, lambda event, i=i: on_event(i, event), handle) for i, r in enumerate(requests)]
        with self.lock:
            if len(self.queue) + len(live) > self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are waiting already")
            self.queue.extend(live)
        return handle

    def enqueue(self, request: Request, on_event: Callable[[Event], None], handle: Handle) -> None:
        """Queue a request whose admission was decided elsewhere (`lockstep.py`: by process 0 of a job)."""
        with self.lock:
            self.queue.append(_Live(request, on_event, handle))

    def held(self) -> tuple[int, int]:
        """(requests in a slot, cache positions their prompts and tokens hold)."""
        live = [*self.running.values(), *self.prefilling.values()]  # one copy each: step() may change them
        return len(live), sum(len(h.request.prompt_ids) + len(h.token_ids) for h in live)

    def step(self) -> None:
        """Admit what fits, prefill a chunk, then decode: one pass of the engine's loop."""
        self._drop_cancelled()
        self._admit()
        self._prefill_chunks()
        if self.running:
            active = [slot in self.running for slot in range(self.backend.slots)]
            steps = min(self.steps_per_dispatch, INTERLEAVED_STEPS) if self.prefilling else self.steps_per_dispatch
            tokens, logprobs, _ = self.backend.decode(steps, active, stop_early=bool(self.queue))
            for slot, live in list(self.running.items()):
                self._deliver(slot, live, tokens[slot], logprobs[slot])

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
                live.on_event(Event([], "", [], "cancelled"))
        for slot, live in list(self.running.items()):
            if live.cancelled:
                self._finish(slot, live, [], "cancelled")

    def _admit(self) -> None:
        """First come, first served: the longest-waiting request is always admitted first; short prompts behind
        it in the same prompt bucket join its prefill while slots remain. A long prompt takes a slot of its own
        and the chunks of its prefix that the cache holds."""
        free = self._free()
        while free:
            with self.lock:
                if not self.queue:
                    return
                head = self.queue[0]
                if len(head.request.prompt_ids) > self.backend.chunk:
                    group = [self.queue.popleft()]
                else:
                    bucket = self._bucket(head)
                    group = [h for h in self.queue if self._fits(h) and self._bucket(h) == bucket][: len(free)]
                    for live in group:
                        self.queue.remove(live)
            if len(head.request.prompt_ids) > self.backend.chunk:
                self._start_chunked(free[0], head)
            else:
                slots = free[: len(group)]
                first, logprobs = self.backend.insert(slots, [h.request for h in group], bucket)
                for slot, live, token, logprob in zip(slots, group, first, logprobs):
                    self.running[slot] = live
                    self._deliver(slot, live, [token], [logprob])
            free = self._free()

    def _start_chunked(self, slot: int, live: _Live) -> None:
        cached = self.prefix.lookup(live.request.prompt_ids) if self.prefix is not None else []
        if cached:
            self.backend.restore(slot, cached)
        live.prefilled = len(cached) * self.backend.chunk
        self.prefilling[slot] = live

    def _prefill_chunks(self) -> None:
        """Chunks of the prompts being prefilled, the oldest first, until PREFILL_BUDGET chunks' worth of tokens
        are computed; all of them while no slot is decoding."""
        done = 0
        while self.prefilling and (done < PREFILL_BUDGET * self.backend.chunk or not self.running):
            slot, live = next(iter(self.prefilling.items()))
            prompt = live.request.prompt_ids
            first = self.backend.extend(slot, live.request, live.prefilled)
            done += min(self.backend.chunk, len(prompt) - live.prefilled)
            live.prefilled = min(live.prefilled + self.backend.chunk, len(prompt))
            if first is not None:
                del self.prefilling[slot]
                if self.prefix is not None:
                    saved = self.prefix.store(prompt)
                    if saved:
                        self.backend.save(slot, saved)
                self.running[slot] = live
                self._deliver(slot, live, [first[0]], [first[1]])

    def _free(self) -> list[int]:
        return [s for s in range(self.backend.slots) if s not in self.running and s not in self.prefilling]

    def _fits(self, live: _Live) -> bool:
        return len(live.request.prompt_ids) <= self.backend.chunk

    def _bucket(self, live: _Live) -> int:
        return self.backend.bucket(len(live.request.prompt_ids))

    def _deliver(self, slot: int, live: _Live, tokens: Sequence[int], logprobs: Sequence[float]) -> None:
        request = live.request
        new_ids: list[int] = []
        new_logprobs: list[float] = []
        reason = None
        for token, logprob in zip(tokens, logprobs):
            if token in request.stop_ids:
                reason = "stop"
                break
            new_ids.append(int(token))
            if request.logprobs:
                new_logprobs.append(float(logprob))
            if len(live.token_ids) + len(new_ids) == request.max_tokens:
                reason = "length"
                break
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
        text = live.text if text is None else text
        live.on_event(Event(new_ids, text[len(live.text) :], list(new_logprobs), reason))
        live.text = text
