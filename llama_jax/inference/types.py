"""The engine's boundary: the plain values its users hand it and get back. The server, infer.py, evaluation,
the trainer's samples and the benchmarks see these (and `settings.EngineSettings`), never the scheduler or
the device side behind them.

    request = make_request(prompt_ids, 64, tokenizer=tokenizer, stop_strings=("\\n\\n",))
    handle = engine.submit([request], on_event)        # on_event(index, Event) from the engine's thread
    handle.cancel()
    engine.status()                                    # EngineStatus: slots, queue, compiled programs, cache use
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

from llama_jax.inference.constraints import Constraint
from llama_jax.inference.sampling import SamplingParams
from llama_jax.tokenizers import Tokenizer

GREEDY = SamplingParams()


@dataclasses.dataclass(frozen=True)
class Request:
    """What to generate. The tokens depend only on these fields: the random stream is (seed, stream) and
    the step, never the other requests sharing the slots. Build it with `make_request`, which adds the
    tokenizer's stop ids."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    stream: int = 0  # folded into the seed: infer.py's prompt index, so a file's prompts differ
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    logprobs: bool = False  # return each generated token's log-probability
    constraint: Constraint | None = None  # a grammar the text must follow (`constraints.py`)
    adapter: str | None = None  # the engine's LoRA adapter its tokens come from (None: the base model)


def make_request(
    prompt_ids: Sequence[int],
    max_tokens: int,
    *,
    tokenizer: Tokenizer | None,
    sampling: SamplingParams = GREEDY,
    seed: int = 0,
    stream: int = 0,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    logprobs: bool = False,
    constraint: Constraint | None = None,
    adapter: str | None = None,
) -> Request:
    """A request that ends at the tokenizer's own stop ids (EOS, a template's end of turn) and at `stop_ids`.
    The tokenizer's come first: the device checks a request's first few stop ids itself (the host checks all),
    so the ones every completion meets are among them."""
    own = tuple(tokenizer.stop_ids) if tokenizer is not None else ()
    extra = tuple(i for i in dict.fromkeys(stop_ids) if i not in own)
    return Request(
        tuple(prompt_ids),
        max_tokens,
        sampling,
        seed,
        stream,
        own + extra,
        tuple(stop_strings),
        logprobs=logprobs,
        constraint=constraint,
        adapter=adapter,
    )


FinishReason = Literal["stop", "length", "cancelled"]


@dataclasses.dataclass
class Event:
    """What a request produced since its last event. The final event has `finish_reason` set:
    "stop" (a stop id or string), "length" (max_tokens), "cancelled". `logprobs` are the tokens'
    log-probabilities under the model's own distribution, when the request asked for them (else empty)."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason | None = None


@dataclasses.dataclass
class Completion:
    """A finished request: what `Engine.generate` and `llama_jax.generate` return (one per prompt)."""

    token_ids: list[int]  # generated, without the stop id that ended them
    text: str  # the text they add after the prompt (cut before a stop string)
    finish_reason: FinishReason
    logprobs: list[float]  # each token's log-probability, when the request asked for them (else empty)

    @classmethod
    def of(cls, events: list[Event]) -> Completion:
        return cls(
            [t for e in events for t in e.token_ids],
            "".join(e.text for e in events),
            events[-1].finish_reason,
            [p for e in events for p in e.logprobs],
        )


class Handle:
    """Submitted requests: `cancel()` stops those not finished — their slots are freed at the engine's next
    step and each gets a final "cancelled" event."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class QueueFull(Exception):
    """The queue of waiting requests is at its bound: come back later (HTTP 429)."""


ProgramKind = Literal["prefill", "extend", "admit", "decode"]


@dataclasses.dataclass(frozen=True, order=True)
class Program:
    """One device program of the engine: its kind, the rows it computes and, for prefill and extend, its
    prompt-length bucket. An engine compiles each once (`EngineStatus` counts them)."""

    kind: ProgramKind
    rows: int = 1
    bucket: int = 0

    @property
    def name(self) -> str:
        """Its name in a compile report: prefill_64, extend_256, decode, admit_4."""
        if self.kind in ("prefill", "extend"):
            return f"{self.kind}_{self.bucket}"
        return f"admit_{self.rows}" if self.kind == "admit" else self.kind

    def describe(self) -> str:
        """In words, for the status line of its compile."""
        prompts = f"{self.rows} prompt{'s' if self.rows > 1 else ''}"
        rows = f"{self.rows} slot{'s' if self.rows > 1 else ''}"
        return {
            "prefill": f"the prefill of {prompts} of up to {self.bucket} tokens",
            "extend": f"the prefill of a long prompt's next {self.bucket} tokens",
            "admit": f"the sampling of the first token of {prompts}",
            "decode": f"the decode loop of {rows}",
        }[self.kind]


@dataclasses.dataclass(frozen=True)
class EngineStatus:
    """A snapshot of the engine, for `/health`, `/metrics` and progress lines."""

    ready: bool  # every program compiled (False while `start(warm_up=True)` compiles)
    programs: tuple[Program, ...]  # every program the engine may run
    compiled: tuple[Program, ...]  # those compiled so far (the first compile of each is a wait)
    max_num_seqs: int  # decode slots
    running: int  # requests in a slot: prefilling or decoding
    waiting: int  # requests queued for a slot
    positions: int  # of the page pool
    positions_used: int  # in pages held by sequences or the prefix cache
    prefix_queried_tokens: int  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int  # and found there
    preemptions: int  # sequences preempted (pool full) and recomputed so far

    def prefill_buckets(self) -> list[int]:
        """The prompt-length buckets a prefill was compiled for."""
        return sorted({p.bucket for p in self.compiled if p.kind == "prefill"})
