"""The inference engine: continuous batching over a loaded model. Every generation path runs on it: infer.py,
the server, evaluation, the trainer's samples and `llama_jax.generate` / `llama_jax.stream`.

    engine = Engine(loaded, slots=8)
    completions = engine.generate([request_a, request_b, ...])     # many, in input order
    for event in engine.stream(request): print(event.text, end="")  # one, token by token
    engine.warm_up(); engine.start(); handle = engine.submit(request, on_event)   # the server's background loop

A request's tokens depend only on its prompt, settings, seed and stream number, never on what shares the
slots or when it arrived (`scheduler.py` decides, `slots.py` computes).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from llama_jax.inference.prompts import completion_text
from llama_jax.inference.scheduler import Event, Handle, Request, Scheduler
from llama_jax.inference.slots import MAX_STEPS, PREFILL_CHUNK, SlotBackend
from llama_jax.loading import LoadedModel

# Decode steps per device call while nobody waits for a slot: the host's work per call is paid once for them
# all. A streaming server uses fewer (8): a stream's tokens arrive a call's worth at a time.
STEPS_PER_DISPATCH = MAX_STEPS


def default_prefix_cache_tokens(slots: int, cache_len: int, chunk: int) -> int:
    """The prefix cache's default size: a quarter of the positions the slots hold, none when no prompt can be
    longer than a chunk."""
    return slots * cache_len // 4 if cache_len > chunk else 0


@dataclasses.dataclass
class Completion:
    """A finished request: what `Engine.generate` and `llama_jax.generate` return (one per prompt)."""

    token_ids: list[int]  # generated, without the stop id that ended them
    text: str  # the text they add after the prompt (cut before a stop string)
    finish_reason: str  # "stop" (a stop id or string) | "length" (max tokens) | "cancelled"
    logprobs: list[float]  # each token's log-probability, when the request asked for them (else empty)

    @classmethod
    def of(cls, events: list[Event]) -> Completion:
        return cls(
            [t for e in events for t in e.token_ids],
            "".join(e.text for e in events),
            events[-1].finish_reason,
            [p for e in events for p in e.logprobs],
        )


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        slots: int = 8,
        cache_len: int | None = None,
        steps_per_dispatch: int = STEPS_PER_DISPATCH,
        max_queue: int = 1024,
        prefill_rows: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        prefix_cache_tokens: int | None = None,
    ):
        """`cache_len`: positions each slot holds, prompt and completion (default: the model's max_seq_len).
        `prefill_chunk`: prompt tokens per prefill call (longer prompts go in chunks between decode calls) and
        per cached prefix chunk, a power of two. `prefix_cache_tokens`: prompt tokens the prefix cache keeps
        (default: a quarter of what the slots hold; 0: none)."""
        if not 1 <= steps_per_dispatch <= MAX_STEPS:
            raise ValueError(f"steps_per_dispatch must be in 1..{MAX_STEPS}, got {steps_per_dispatch}")
        if prefill_chunk < 16 or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"the prefill chunk must be a power of two of at least 16 tokens, got {prefill_chunk}")
        self.config, self.tokenizer = loaded.config, loaded.tokenizer
        self.max_len = min(cache_len or self.config.max_seq_len, self.config.max_seq_len)
        if prefix_cache_tokens is None:
            prefix_cache_tokens = default_prefix_cache_tokens(slots, self.max_len, prefill_chunk)
        self.backend = SlotBackend.of(
            loaded,
            slots,
            self.max_len,
            chunk=prefill_chunk,
            pool_entries=prefix_cache_tokens // prefill_chunk,
            prefill_rows=prefill_rows,
        )
        self.scheduler = Scheduler(
            self.backend, max_queue=max_queue, steps_per_dispatch=steps_per_dispatch, text=self._text
        )
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.ready = True  # False while `start(warm_up=True)` compiles
        self.warm = (0, 0)  # programs compiled by that warm-up, of how many

    @property
    def slots(self) -> int:
        return self.backend.slots

    def warm_up(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Compile every program the engine may call — a prefill per (rows, prompt bucket), the admissions and
        the decode loop — so that no request waits for a compile. `progress(done, total)` after each. Two are
        built at a time: the compiler releases the interpreter lock, so one traces while another compiles."""
        programs = [p for p in self.backend.programs() if p not in self.backend.compiled]
        done = 0
        with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
            for _ in pool.map(self.backend.executable, programs):
                done += 1
                if progress is not None:
                    progress(done, len(programs))

    def check(self, request: Request) -> None:
        """ValueError unless the request can run: a prompt, room for its tokens, stop ids in the vocabulary."""
        if not request.prompt_ids:
            raise ValueError("the prompt is empty: it needs at least the BOS token")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
        needed = len(request.prompt_ids) + request.max_tokens
        if needed > self.max_len:
            raise ValueError(
                f"the prompt has {len(request.prompt_ids)} tokens; with max_tokens {request.max_tokens} "
                f"it needs {needed} positions, but the model allows {self.max_len}"
            )
        bad = [i for i in (*request.stop_ids, *request.prompt_ids) if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:3]} are outside the vocabulary (0..{self.config.vocab_size - 1})")

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Handle:
        """Queue a request (`scheduler.QueueFull` when the queue is at its bound); its events go to
        `on_event`, called from the engine's thread (`start()` runs it)."""
        self.check(request)
        handle = self.scheduler.submit(request, on_event)
        with self._wake:
            self._wake.notify()
        return handle

    def start(self, warm_up: bool = False, on_ready: Callable[[], None] | None = None) -> None:
        """Run the engine's loop in a background thread (the server's HTTP handlers only submit and cancel);
        with `warm_up`, it first compiles every program (`ready` is False until then, `warm` counts them) and
        then calls `on_ready`."""
        self.ready = not warm_up
        self._thread = threading.Thread(
            target=self._loop, args=(warm_up, on_ready), name="llama_jax-engine", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def _loop(self, warm_up: bool, on_ready: Callable[[], None] | None) -> None:
        if warm_up:

            def progress(done: int, total: int) -> None:
                self.warm = (done, total)

            self.warm_up(progress)
            self.ready = True
            if on_ready is not None:
                on_ready()
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._stopping or self.scheduler.busy)
                if self._stopping:
                    return
            self.scheduler.step()

    def generate(
        self, requests: Sequence[Request], on_result: Callable[[int, Completion], None] | None = None
    ) -> list[Completion]:
        """Run `requests` in this thread, feeding the queue as slots free (any number of them), and return
        their completions in input order; `on_result(index, completion)` is called as each one finishes."""
        for request in requests:
            self.check(request)
        results: list[Completion | None] = [None] * len(requests)
        pending = iter(enumerate(requests))

        def collect(index: int, events: list[Event]) -> Callable[[Event], None]:
            def on_event(event: Event) -> None:
                events.append(event)
                if event.finish_reason is not None:
                    results[index] = Completion.of(events)
                    if on_result is not None:
                        on_result(index, results[index])

            return on_event

        def refill() -> None:
            while len(self.scheduler.queue) < self.slots:
                item = next(pending, None)
                if item is None:
                    return
                index, request = item
                self.scheduler.submit(request, collect(index, []))

        refill()
        while self.scheduler.busy:
            self.scheduler.step()
            refill()
        return results

    def stream(self, request: Request) -> Iterator[Event]:
        """The events of one request as they come, stepping the engine in this thread."""
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.check(request)
        self.scheduler.submit(request, events.put)
        while True:
            while events.empty():
                self.scheduler.step()
            event = events.get()
            yield event
            if event.finish_reason is not None:
                return

    def _text(self, prompt_ids: Sequence[int], generated: Sequence[int]) -> str:
        return completion_text(self.tokenizer, prompt_ids, generated) if self.tokenizer is not None else ""
