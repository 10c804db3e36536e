"""Many prompts through the engine, their completions handed on in input order: what infer.py, `evaluate
generate` and `llama_jax.generate` run. A completion is released as soon as it and every one before it are
done, so a file written from them is always a complete prefix of the input (and can be resumed)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence

from llama_jax.inference.engine import Engine
from llama_jax.inference.settings import DEFAULT_ENGINE, EngineSettings, GenerationSettings
from llama_jax.inference.types import Completion, EngineStatus, Program, make_request
from llama_jax.loading import LoadedModel


def generate_in_order(
    loaded: LoadedModel,
    prompt_ids: Sequence[Sequence[int]],
    settings: GenerationSettings,
    on_ready: Callable[[list[tuple[int, Completion]]], None],
    *,
    engine: EngineSettings = DEFAULT_ENGINE,
    first: int = 0,
    stop_strings: tuple[str, ...] = (),
    progress: bool = True,
    on_compile: Callable[[Program], None] | None = None,
) -> EngineStatus:
    """Generate prompts[first:] with up to `engine.max_num_seqs` decode slots, each refilled as its completion
    ends; `on_ready([(index, completion), ...])` gets them in input order; `on_compile(program)` hears of each
    program before it compiles. Each slot holds the longest prompt and its new tokens. Returns the engine's
    final status (its compiled programs say which prompt buckets ran)."""
    from tqdm import tqdm

    longest = max(len(ids) for ids in prompt_ids[first:])
    sized = dataclasses.replace(
        engine,
        max_num_seqs=min(engine.max_num_seqs, len(prompt_ids) - first),
        max_model_len=longest + settings.max_new_tokens,
    )
    runner = Engine(loaded, sized, on_compile)
    # A prompt's random stream is its index in the whole input: resuming after `first` changes no sample.
    requests = [
        make_request(
            ids,
            settings.max_new_tokens,
            tokenizer=loaded.tokenizer,
            sampling=settings.sampling,
            seed=settings.seed,
            stream=index,
            stop_ids=settings.stop_ids,
            stop_strings=stop_strings,
            constraint=settings.constraint,
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
        runner.generate(requests, on_result)
    return runner.status()
