"""The serving engine: continuous batching over a loaded model, for `infer.py`, the server and notebooks.

    engine = Engine(loaded, slots=8)
    results = engine.generate([request_a, request_b, ...])        # many, in input order
    for event in engine.stream(request): print(event.text, end="") # one, token by token
    engine.start(); handle = engine.submit(request, on_event)      # a background loop (the server)

A request's tokens depend only on its prompt, settings, seed and stream number, never on what shares the
slots or when it arrived (`scheduler.py` decides, `slots.py` computes).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

from llama_jax.inference.prompts import completion_text
from llama_jax.inference.scheduler import Event, Handle, Request, Scheduler
from llama_jax.inference.slots import SlotBackend
from llama_jax.loading import LoadedModel

STEPS_PER_DISPATCH = 8  # decode steps per device call: the host's work per step is paid once per call


@dataclasses.dataclass
class Result:
    token_ids: list[int]  # generated, without the stop id that ended them
    text: str
    logprobs: list[float]  # of each generated token, under the model's own distribution
    finish_reason: str  # "stop" | "length" | "cancelled"


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
    ):
        """`cache_len`: positions each slot holds, prompt and completion (default: the model's max_seq_len)."""
        self.config, self.tokenizer = loaded.config, loaded.tokenizer
        self.max_len = min(cache_len or self.config.max_seq_len, self.config.max_seq_len)
        self.backend = SlotBackend(loaded, slots, self.max_len, prefill_rows)
        self.scheduler = Scheduler(
            self.backend,
            max_queue=max_queue,
            steps_per_dispatch=steps_per_dispatch,
            bucket_limit=self.max_len,
            text=self._text,
        )
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def slots(self) -> int:
        return self.backend.slots

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
        `on_event`, called from the engine's thread. Needs `start()`, or someone calling `run_until_idle`."""
        self.check(request)
        handle = self.scheduler.submit(request, on_event)
        with self._wake:
            self._wake.notify()
        return handle

    def start(self) -> None:
        """Run the engine's loop in a background thread (the server's HTTP handlers only submit and cancel)."""
        self._thread = threading.Thread(target=self._loop, name="llama_jax-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._stopping or self.scheduler.busy)
                if self._stopping:
                    return
            self.scheduler.step()

    def run_until_idle(self) -> None:
        """Step the engine in this thread until every submitted request has finished."""
        while self.scheduler.busy:
            self.scheduler.step()

    def generate(
        self, requests: Sequence[Request], on_result: Callable[[int, Result], None] | None = None
    ) -> list[Result]:
        """Run `requests` in this thread, feeding the queue as slots free (any number of them), and return
        their results in input order; `on_result(index, result)` is called as each one finishes."""
        for request in requests:
            self.check(request)
        results: list[Result | None] = [None] * len(requests)
        pending = iter(enumerate(requests))

        def collect(index: int, handle_events: list[Event]) -> Callable[[Event], None]:
            def on_event(event: Event) -> None:
                handle_events.append(event)
                if event.finish_reason is not None:
                    results[index] = _result(handle_events)
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


def _result(events: list[Event]) -> Result:
    return Result(
        [t for e in events for t in e.token_ids],
        "".join(e.text for e in events),
        [p for e in events for p in e.logprobs],
        events[-1].finish_reason,
    )
