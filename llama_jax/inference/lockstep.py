"""A server's engine on a multi-host job: process 0 takes the requests, every process runs the same steps.

Before each step of the engine's loop, process 0 turns what arrived since the last one — new requests, cancelled
ones, a stop — into a plan and shares it (`distributed.Shared`); every process applies the plan to its own
scheduler, in the same order, then steps. The schedulers, fed the same requests at the same steps and the same
tokens (the programs hand every process the whole of what the host reads), make the same decisions, so the
devices of all processes run the same programs together. Only process 0 hands events to callers.

`generate` and `stream` need none of this: every process of a job calls them with the same requests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from llama_jax.distributed import Shared, is_leader
from llama_jax.inference.constraints import Constraint
from llama_jax.inference.sampling import SamplingParams
from llama_jax.inference.scheduler import Scheduler
from llama_jax.inference.types import Event, Handle, QueueFull, Request

# While nothing happens, process 0 still shares an empty plan this often, so the other processes' waits for
# the next plan end well inside the coordination service's limits.
IDLE_PLAN_S = 30.0
KEPT_PLANS = 64  # plans the coordination service holds; every process reads each before the next step


class Lockstep:
    """The loop of `Engine.start()` when the job has several processes (one per host)."""

    def __init__(self, scheduler: Scheduler, wake: threading.Condition):
        self.scheduler, self.wake = scheduler, wake
        self.leader = is_leader()
        self._arrived: list[tuple[list[Request], Callable[[int, Event], None], Handle]] = []
        self._cancels: list[tuple[Handle, list[int]]] = []  # callers' handles, the ids of their requests
        self._stopping = False
        self._next_id = 0
        self._handles: dict[int, Handle] = {}  # request id -> the handle the scheduler reads (every process)

    def submit(self, requests: Sequence[Request], on_event: Callable[[int, Event], None]) -> Handle:
        """Process 0: queue `requests` for the next plan (all or none: QueueFull when the queue would pass
        its bound)."""
        if not self.leader:
            raise RuntimeError("only process 0 of a multi-host job takes requests")
        handle = Handle()
        with self.wake:
            waiting = len(self.scheduler.queue) + sum(len(r) for r, _, _ in self._arrived)
            if waiting + len(requests) > self.scheduler.max_queue:
                raise QueueFull(f"{waiting} requests are waiting already")
            self._arrived.append((list(requests), on_event, handle))
            self.wake.notify()
        return handle

    def stop(self) -> None:
        with self.wake:
            self._stopping = True
            self.wake.notify()

    def run(self) -> None:
        """Apply plans and step until a plan says stop (every process)."""
        plans = Shared("engine-plans", keep=KEPT_PLANS)
        callbacks: dict[int, Callable[[Event], None]] = {}
        while True:
            plan = plans.value(lambda: self._plan(callbacks))
            for fields in plan["submit"]:
                request_id, request = fields["id"], _request(fields)
                self._handles[request_id] = handle = Handle()
                on_event = callbacks.pop(request_id, _nobody)
                self.scheduler.enqueue(request, self._ended(request_id, on_event), handle)
            for request_id in plan["cancel"]:
                if request_id in self._handles:
                    self._handles[request_id].cancel()
            if plan["stop"]:
                return
            if self.scheduler.busy:
                self.scheduler.step()

    def _plan(self, callbacks: dict[int, Callable[[Event], None]]) -> dict:
        """Process 0: wait for something to do (or IDLE_PLAN_S), then what arrived since the last plan."""
        with self.wake:
            if not self.scheduler.busy:
                self.wake.wait_for(lambda: self._stopping or self._arrived or self._cancelled(), timeout=IDLE_PLAN_S)
            arrived, self._arrived = self._arrived, []
            submit = []
            for requests, on_event, handle in arrived:
                ids = list(range(self._next_id, self._next_id + len(requests)))
                self._next_id += len(requests)
                for index, (request_id, request) in enumerate(zip(ids, requests)):
                    callbacks[request_id] = lambda event, index=index, on_event=on_event: on_event(index, event)
                    submit.append({"id": request_id, **_fields(request)})
                self._cancels.append((handle, ids))
            cancel = [i for handle, ids in self._cancels if handle.cancelled for i in ids]
            # Kept: the callers' requests that may still be cancelled (not cancelled yet, some not finished).
            unfinished = set(self._handles) | {fields["id"] for fields in submit}
            self._cancels = [
                (handle, ids)
                for handle, ids in self._cancels
                if not handle.cancelled and any(i in unfinished for i in ids)
            ]
            return {"submit": submit, "cancel": cancel, "stop": self._stopping}

    def _cancelled(self) -> bool:
        return any(handle.cancelled for handle, _ in self._cancels)

    def _ended(self, request_id: int, on_event: Callable[[Event], None]) -> Callable[[Event], None]:
        def deliver(event: Event) -> None:
            if event.finish_reason is not None:
                self._handles.pop(request_id, None)
            on_event(event)

        return deliver


def _nobody(event: Event) -> None:
    """Where a request's events go on the processes that do not answer it."""


def _fields(request: Request) -> dict:
    sampling = request.sampling
    return {
        "prompt_ids": list(request.prompt_ids),
        "max_tokens": request.max_tokens,
        "sampling": [sampling.temperature, sampling.top_k, sampling.top_p],
        "seed": request.seed,
        "stream": request.stream,
        "stop_ids": list(request.stop_ids),
        "stop_strings": list(request.stop_strings),
        "logprobs": request.logprobs,
        "constraint": [request.constraint.kind, request.constraint.value] if request.constraint else None,
        "adapter": request.adapter,
    }


def _request(fields: dict) -> Request:
    temperature, top_k, top_p = fields["sampling"]
    return Request(
        tuple(fields["prompt_ids"]),
        fields["max_tokens"],
        SamplingParams(temperature, top_k, top_p),
        fields["seed"],
        fields["stream"],
        tuple(fields["stop_ids"]),
        tuple(fields["stop_strings"]),
        fields["logprobs"],
        Constraint(*fields["constraint"]) if fields["constraint"] else None,
        fields["adapter"],
    )
