"""Continuous batching, the host side: which request gets which decode slot, and when a request is done.

    scheduler = Scheduler(backend, max_queue=64, steps_per_dispatch=8, text=decoder)
    handle = scheduler.submit(Request(prompt_ids, max_tokens=64, ...), on_event)
    while scheduler.busy: scheduler.step()      # prefill-and-insert, then one multi-step decode call

Each step admits queued requests into free slots, first come first served, prefilling those whose prompts
fall into the same length bucket together; then runs up to `steps_per_dispatch` decode steps of every live
slot in one call to the backend — fewer when requests are waiting and a slot finishes, so that they get it
at once; then hands each request its new tokens, finishing it at a stop id, a stop string or its token
budget (or when cancelled), which frees its slot for the next admission. The rules live here, in plain
Python, so they are tested with a deterministic fake backend (`tests/test_scheduler.py`);
`slots.SlotBackend` runs them on the model.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from llama_jax.inference.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class Request:
    """What to generate. The tokens depend only on these fields: the random stream is (seed, stream) and
    the step, never the other requests sharing the slots."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    stream: int = 0  # folded into the seed: infer.py's prompt index, so a file's prompts differ
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    logprobs: bool = False  # return each generated token's log-probability


@dataclasses.dataclass
class Event:
    """What a request produced since its last event. The final event has `finish_reason` set:
    "stop" (a stop id or string), "length" (max_tokens), "cancelled". `logprobs` are the tokens'
    log-probabilities under the model's own distribution, when the request asked for them (else empty)."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str | None = None


class Handle:
    """A submitted request: its events arrive through `on_event` (called from the engine's thread)."""

    def __init__(self, request: Request, on_event: Callable[[Event], None]):
        self.request, self.on_event = request, on_event
        self.token_ids: list[int] = []  # generated so far (stop ids excluded)
        self.logprobs: list[float] = []
        self.text = ""  # what has been handed out
        self.cancelled = False

    def cancel(self) -> None:
        """Stop generating: the slot is freed at the next step and a final "cancelled" event sent."""
        self.cancelled = True


class Backend(Protocol):
    """The device side: prompts into slots, and decode steps over all slots."""

    slots: int

    def bucket(self, n: int) -> int:
        """The prompt-length bucket of an n-token prompt: prompts of one bucket are prefilled together."""

    def insert(self, slots: Sequence[int], requests: Sequence[Request], bucket: int) -> tuple[list[int], list[float]]:
        """Prefill `requests` (all of prompt bucket `bucket`) into `slots`: each one's first token and its
        log-probability."""

    def decode(
        self, steps: int, active: Sequence[bool], stop_early: bool
    ) -> tuple[list[list[int]], list[list[float]], int]:
        """Up to `steps` decode steps of the `active` slots, fewer when `stop_early` and a slot's request
        ends (a stop id or its budget): (slots, steps run) tokens and log-probabilities (free slots' are junk),
        and the steps run."""


class QueueFull(Exception):
    """The queue of waiting requests is at its bound: come back later (HTTP 429)."""


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
        self.queue: collections.deque[Handle] = collections.deque()
        self.running: dict[int, Handle] = {}  # slot -> request
        self.lock = threading.Lock()  # submit() and cancel() come from other threads than step()

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.running)

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Handle:
        handle = Handle(request, on_event)
        with self.lock:
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are waiting already")
            self.queue.append(handle)
        return handle

    def step(self) -> None:
        """Admit what fits, then decode: one pass of the engine's loop."""
        self._drop_cancelled()
        self._admit()
        if self.running:
            active = [slot in self.running for slot in range(self.backend.slots)]
            tokens, logprobs, _ = self.backend.decode(self.steps_per_dispatch, active, stop_early=bool(self.queue))
            for slot, handle in list(self.running.items()):
                self._deliver(slot, handle, tokens[slot], logprobs[slot])

    def _drop_cancelled(self) -> None:
        with self.lock:
            waiting = [h for h in self.queue if h.cancelled]
            for handle in waiting:
                self.queue.remove(handle)
        for handle in waiting:
            handle.on_event(Event([], "", [], "cancelled"))
        for slot, handle in list(self.running.items()):
            if handle.cancelled:
                self._finish(slot, handle, [], "cancelled")

    def _admit(self) -> None:
        """First come, first served: the longest-waiting request is always admitted first; those behind it in
        the same prompt bucket join its prefill while slots remain."""
        free = [s for s in range(self.backend.slots) if s not in self.running]
        while free:
            with self.lock:
                if not self.queue:
                    return
                bucket = self._bucket(self.queue[0])
                group = [h for h in self.queue if self._bucket(h) == bucket][: len(free)]
                for handle in group:
                    self.queue.remove(handle)
            slots, free = free[: len(group)], free[len(group) :]
            first, logprobs = self.backend.insert(slots, [h.request for h in group], bucket)
            for slot, handle, token, logprob in zip(slots, group, first, logprobs):
                self.running[slot] = handle
                self._deliver(slot, handle, [token], [logprob])
            free = [s for s in range(self.backend.slots) if s not in self.running]

    def _bucket(self, handle: Handle) -> int:
        return self.backend.bucket(len(handle.request.prompt_ids))

    def _deliver(self, slot: int, handle: Handle, tokens: Sequence[int], logprobs: Sequence[float]) -> None:
        request = handle.request
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
            if len(handle.token_ids) + len(new_ids) == request.max_tokens:
                reason = "length"
                break
        handle.token_ids += new_ids
        handle.logprobs += new_logprobs
        text = self.text(request.prompt_ids, handle.token_ids)
        stop_at = min((i for i in (text.find(s) for s in request.stop_strings) if i >= 0), default=-1)
        if stop_at >= 0:
            text, reason = text[:stop_at], "stop"
        if reason is not None:
            self._finish(slot, handle, new_ids, reason, new_logprobs, text)
            return
        # Hold back what may still turn into a stop string, and a character still missing bytes.
        hold = max((len(s) - 1 for s in request.stop_strings), default=0)
        shown = text[: max(len(handle.text), len(text) - hold)]
        while shown.endswith("\ufffd"):
            shown = shown[:-1]
        if new_ids:
            handle.on_event(Event(new_ids, shown[len(handle.text) :], new_logprobs))
            handle.text = shown

    def _finish(
        self,
        slot: int,
        handle: Handle,
        new_ids: list[int],
        reason: str,
        new_logprobs: Sequence[float] = (),
        text: str | None = None,
    ) -> None:
        del self.running[slot]
        text = handle.text if text is None else text
        handle.on_event(Event(new_ids, text[len(handle.text) :], list(new_logprobs), reason))
        handle.text = text
