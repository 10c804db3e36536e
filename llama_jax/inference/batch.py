"""Many prompts through the engine, their completions handed on in input order: what infer.py, `evaluate
generate` and `llama_jax.generate` run. A completion is released as soon as it and every one before it are
done, so a file written from them is always a complete prefix of the input (and can be resumed)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from llama_jax.inference.engine import Completion, Engine
from llama_jax.inference.scheduler import Request
from llama_jax.inference.settings import GenerationSettings
from llama_jax.loading import LoadedModel


def generate_in_order(
    loaded: LoadedModel,
    prompt_ids: Sequence[Sequence[int]],
    settings: GenerationSettings,
    on_ready: Callable[[list[tuple[int, Completion]]], None],
    first: int = 0,
    stop_strings: tuple[str, ...] = (),
    progress: bool = True,
    on_compile: Callable[[tuple], None] | None = None,
) -> Engine:
    """Generate prompts[first:] with `settings.batch_size` decode slots, each refilled as its completion ends;
    `on_ready([(index, completion), ...])` gets them in input order; `on_compile(program)` hears of each
    program before it compiles. Returns the engine (its compiled programs say which prompt buckets ran)."""
    from tqdm import tqdm

    own = loaded.tokenizer.stop_ids if loaded.tokenizer is not None else ()
    stop_ids = tuple(sorted({*own, *settings.stop_ids}))
    longest = max(len(ids) for ids in prompt_ids[first:])
    slots = min(settings.batch_size, len(prompt_ids) - first)
    engine = Engine(loaded, slots=slots, cache_len=longest + settings.max_new_tokens)
    engine.backend.on_compile = on_compile
    # A prompt's random stream is its index in the whole input: resuming after `first` changes no sample.
    requests = [
        Request(
            tuple(ids),
            settings.max_new_tokens,
            settings.sampling,
            settings.seed,
            stream=index,
            stop_ids=stop_ids,
            stop_strings=stop_strings,
        )
        for index, ids in enumerate(prompt_ids)
        if index >= first
    ]
    finished: dict[int, Completion] = {}
    next_index = first
    bar = tqdm(total=len(prompt_ids), initial=first, unit="prompt", file=sys.stderr, disable=not progress)

    def on_result(position: int, completion: Completion) -> None:
        nonlocal next_index
        finished[first + position] = completion
        bar.update(1)
        ready = []
        while next_index in finished:
            ready.append((next_index, finished.pop(next_index)))
            next_index += 1
        if ready:
            on_ready(ready)

    with bar:
        engine.generate(requests, on_result)
    return engine


def compiled_buckets(engine: Engine) -> list[int]:
    """The prompt-length buckets the engine compiled a prefill program for."""
    return sorted({program[2] for program in engine.backend.compiled if program[0] == "prefill"})
