"""The inference engine: continuous batching over a loaded model. Every generation path runs on it: infer.py,
the server, evaluation, the trainer's samples and `llama_jax.generate` / `llama_jax.stream`.

    engine = Engine(loaded, EngineSettings(max_num_seqs=8))
    completions = engine.generate([request_a, request_b, ...])     # many, in input order
    for event in engine.stream(request): print(event.text, end="")  # one, token by token
    engine.start(warm_up=True); handle = engine.submit(requests, on_event)    # the server's background loop
    engine.status()                                                  # slots, queue, programs compiled

Its users see only values (`types.py`: requests, events, completions, status; `settings.EngineSettings`);
the scheduler that decides and the slots that compute stay behind this class. A request's tokens depend
only on its prompt, settings, seed and stream number, never on what shares the slots or when it arrived.

One thread steps the engine at a time: `generate` and `stream` step it in the caller's thread, `start()` in a
thread of its own; a second driver is refused (RuntimeError) rather than left to corrupt the slots.
`submit` may come from any thread.

On a multi-host job every process runs the engine: `generate` and `stream` with the same requests on every
process; a server's `start()` on every process, requests submitted to process 0 only (`lockstep.py`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import jax

from llama_jax.inference.constraints import Grammars
from llama_jax.inference.lockstep import Lockstep
from llama_jax.inference.prompts import completion_text
from llama_jax.inference.scheduler import Scheduler
from llama_jax.inference.settings import DEFAULT_ENGINE, EngineSettings
from llama_jax.inference.slots import SlotBackend
from llama_jax.inference.types import Completion, EngineStatus, Event, Handle, Program, Request
from llama_jax.loading import LoadedModel


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        settings: EngineSettings = DEFAULT_ENGINE,
        on_compile: Callable[[Program], None] | None = None,
        adapters: Sequence[str] = (),
    ):
        """`settings` are resolved for the model and mesh (`EngineSettings.resolve`): `self.settings` says
        what the engine holds. `on_compile(program)` hears of each program before its first compile. `adapters`:
        the names of the LoRA adapters of `loaded`'s bank, in its order (`adapters.with_adapters`); a request
        picks one by name."""
        if loaded.mesh.shape["context"] > 1:  # its prefill and cache keep each sequence on one chip
            raise ValueError("the engine does not split sequences: its mesh must have context=1")
        self.config, self.tokenizer = loaded.config, loaded.tokenizer
        self.adapters = tuple(adapters)
        self.settings = settings.resolve(loaded.config, loaded.mesh.shape["data"] * loaded.mesh.shape["fsdp"])
        self._backend = SlotBackend.of(loaded, self.settings, on_compile, self.adapters)
        self._programs = self._backend.programs
        self.grammars = Grammars(self.tokenizer, self.config.vocab_size) if self.tokenizer is not None else None
        self._scheduler = Scheduler(
            self._backend,
            max_queue=self.settings.max_queue,
            steps_per_dispatch=self.settings.steps_per_dispatch,
            text=self._text,
            follow=self.grammars.follow if self.grammars is not None else None,
        )
        self._wake = threading.Condition()
        self._lockstep = Lockstep(self._scheduler, self._wake) if jax.process_count() > 1 else None
        self._driver = threading.Lock()  # held by whoever steps the scheduler
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ready = True  # False while `start(warm_up=True)` compiles

    def status(self) -> EngineStatus:
        running, used = self._scheduler.held()
        prefix = self._scheduler.prefix
        return EngineStatus(
            ready=self._ready,
            programs=tuple(self._programs.all()),
            compiled=tuple(sorted(self._programs.compiled)),
            max_num_seqs=self.settings.max_num_seqs,
            running=running,
            waiting=len(self._scheduler.queue),
            positions=self.settings.kv_cache_tokens,
            positions_used=used,
            prefix_queried_tokens=prefix.queried_tokens if prefix else 0,
            prefix_hit_tokens=prefix.hit_tokens if prefix else 0,
            preemptions=self._scheduler.preemptions,
        )

    def warm_up(self) -> None:
        """Compile every program the engine may call — a prefill per (rows, prompt bucket), the admissions and
        the decode loops — so that no request waits for a compile (`status().compiled` counts them). Two are
        built at a time: the compiler releases the interpreter lock, so one traces while another compiles."""
        programs = [p for p in self._programs.all() if p not in self._programs.compiled]
        with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
            list(pool.map(self._programs.executable, programs))
        if self.grammars is not None:  # the vocabulary as the grammar engine reads it: up to 2 s, once
            self.grammars.warm_up()

    def submit(self, requests: Sequence[Request], on_event: Callable[[int, Event], None]) -> Handle:
        """Queue `requests`, all or none: ValueError for one that cannot run (naming it), QueueFull when the
        queue has no room for them all. Request i's events go to on_event(i, event), called from the thread
        that steps the engine (`start()` runs one)."""
        for request in requests:
            self._check(request)
        if self._lockstep is not None:
            return self._lockstep.submit(requests, on_event)
        handle = self._scheduler.submit_all(requests, on_event)
        with self._wake:
            self._wake.notify()
        return handle

    def start(self, warm_up: bool = False, on_ready: Callable[[], None] | None = None) -> None:
        """Step the engine in a background thread (the server's HTTP handlers only submit and cancel); with
        `warm_up`, it first compiles every program (`status().ready` is False until then) and then calls
        `on_ready`."""
        self._take_driver("start() runs the engine's loop")
        self._ready = not warm_up
        self._thread = threading.Thread(
            target=self._loop, args=(warm_up, on_ready), name="llama_jax-engine", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """End the loop `start()` began (on a multi-host job: process 0 ends every process's)."""
        if self._lockstep is not None and self._lockstep.leader:
            self._lockstep.stop()
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._driver.release()

    def generate(
        self, requests: Sequence[Request], on_result: Callable[[int, Completion], None] | None = None
    ) -> list[Completion]:
        """Run `requests` in this thread, feeding the queue as slots free (any number of them), and return
        their completions in input order; `on_result(index, completion)` is called as each one finishes."""
        for request in requests:
            self._check(request)
        results: list[Completion | None] = [None] * len(requests)
        events: dict[int, list[Event]] = {}

        def on_event(index: int, event: Event) -> None:
            events.setdefault(index, []).append(event)
            if event.finish_reason is not None:
                results[index] = Completion.of(events.pop(index))
                if on_result is not None:
                    on_result(index, results[index])

        with self._driving("generate()"):
            pending = 0
            while pending < len(requests) or self._scheduler.busy:
                room = min(self.settings.max_num_seqs, self.settings.max_queue) - len(self._scheduler.queue)
                if room > 0 and pending < len(requests):
                    batch = requests[pending : pending + room]
                    self._scheduler.submit_all(batch, lambda i, e, first=pending: on_event(first + i, e))
                    pending += len(batch)
                self._scheduler.step()
        return results

    def stream(self, request: Request) -> Iterator[Event]:
        """The events of one request as they come, stepping the engine in this thread."""
        self._check(request)
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        with self._driving("stream()"):
            self._scheduler.submit(request, events.put)
            while True:
                while events.empty():
                    self._scheduler.step()
                event = events.get()
                yield event
                if event.finish_reason is not None:
                    return

    def _check(self, request: Request) -> None:
        """ValueError unless the request can run: a prompt, room for its tokens, stop ids in the vocabulary."""
        if not request.prompt_ids:
            raise ValueError("the prompt is empty: it needs at least the BOS token")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
        needed = len(request.prompt_ids) + request.max_tokens
        if needed > self.settings.max_model_len:
            raise ValueError(
                f"the prompt has {len(request.prompt_ids)} tokens; with max_tokens {request.max_tokens} "
                f"it needs {needed} positions, but the model allows {self.settings.max_model_len}"
            )
        bad = [i for i in (*request.stop_ids, *request.prompt_ids) if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:3]} are outside the vocabulary (0..{self.config.vocab_size - 1})")
        if request.adapter is not None and request.adapter not in self.adapters:
            served = ", ".join(self.adapters) or "none"
            raise ValueError(f"no LoRA adapter {request.adapter!r} in this engine (it has: {served})")
        if request.constraint is not None:
            if self.grammars is None:
                raise ValueError("a constrained request needs the model's tokenizer, and this engine has none")
            self.grammars.check(request.constraint)

    def _take_driver(self, who: str) -> None:
        if self._driver.acquire(blocking=False):
            return
        if self._thread is not None:
            raise RuntimeError(f"{who}: this engine's loop runs in a thread of its own (start()); submit() to it")
        raise RuntimeError(f"{who}: another thread is generating with this engine; one thread steps it at a time")

    @contextlib.contextmanager
    def _driving(self, who: str):
        self._take_driver(who)
        try:
            yield
        finally:
            self._driver.release()

    def join(self) -> None:
        """Wait for the loop `start()` began to end (a process other than 0 of a multi-host job: until process
        0 stops its engine)."""
        if self._thread is not None:
            self._thread.join()

    def _loop(self, warm_up: bool, on_ready: Callable[[], None] | None) -> None:
        if warm_up:
            self.warm_up()
            self._ready = True
            if on_ready is not None:
                on_ready()
        if self._lockstep is not None:
            self._lockstep.run()
            return
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._stopping or self._scheduler.busy)
                if self._stopping:
                    return
            self._scheduler.step()

    def _text(self, prompt_ids: Sequence[int], generated: Sequence[int]) -> str:
        return completion_text(self.tokenizer, prompt_ids, generated) if self.tokenizer is not None else ""
