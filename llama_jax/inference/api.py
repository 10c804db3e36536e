"""Text in, text out, from Python: `llama_jax.generate` and `llama_jax.stream`, on the engine.

    completions = generate(loaded, ["Once upon a time", "Tom"], max_new_tokens=50)   # Completion per prompt
    for event in stream(loaded, "Lily", max_new_tokens=50): print(event.text, end="")

BOS is prepended to each prompt, or with chat=True it is a user's message in the checkpoint's chat template.
Greedy at temperature 0; a prompt's samples depend only on the seed and its position in the list, never on
batch_size (the engine's decode slots).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from llama_jax.inference.batch import generate_in_order
from llama_jax.inference.engine import Completion, Engine
from llama_jax.inference.prompts import PromptEncoder, chat_template_for
from llama_jax.inference.sampling import SamplingParams
from llama_jax.inference.scheduler import Event, Request
from llama_jax.inference.settings import GenerationSettings
from llama_jax.loading import LoadedModel

STREAM_STEPS_PER_DISPATCH = 8  # a stream's tokens arrive this many at a time


def generate(
    loaded: LoadedModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = False,
    batch_size: int = 8,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
) -> list[Completion]:
    """Complete each prompt: a `Completion` (token_ids, text, finish_reason) per prompt, in order."""
    settings = _settings(loaded, max_new_tokens, temperature, top_k, top_p, seed, chat, batch_size, stop_ids)
    encoder = _encoder(loaded, settings)
    prompt_ids = [encoder.encode(prompt, index) for index, prompt in enumerate(prompts)]
    completions: list[Completion] = []
    if prompt_ids:
        generate_in_order(
            loaded,
            prompt_ids,
            settings,
            lambda ready: completions.extend(c for _, c in ready),
            stop_strings=tuple(stop_strings),
            progress=False,
        )
    return completions


def stream(
    loaded: LoadedModel,
    prompt: str,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = False,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
) -> Iterator[Event]:
    """The events of one prompt as its tokens come (`event.text`, `event.token_ids`; the last one has its
    finish_reason): the tokens and text `generate` gives for it, a few at a time."""
    settings = _settings(loaded, max_new_tokens, temperature, top_k, top_p, seed, chat, 1, stop_ids)
    ids = _encoder(loaded, settings).encode(prompt)
    engine = Engine(loaded, slots=1, cache_len=len(ids) + max_new_tokens, steps_per_dispatch=STREAM_STEPS_PER_DISPATCH)
    own = loaded.tokenizer.stop_ids if loaded.tokenizer is not None else ()
    request = Request(
        tuple(ids),
        max_new_tokens,
        settings.sampling,
        seed,
        stop_ids=tuple(sorted({*own, *settings.stop_ids})),
        stop_strings=tuple(stop_strings),
    )
    yield from engine.stream(request)


def _settings(loaded, max_new_tokens, temperature, top_k, top_p, seed, chat, batch_size, stop_ids):
    settings = GenerationSettings(
        max_new_tokens, SamplingParams(temperature, top_k, top_p), seed, batch_size, chat, tuple(stop_ids)
    )
    settings.check_model(loaded.config)
    return settings


def _encoder(loaded: LoadedModel, settings: GenerationSettings) -> PromptEncoder:
    if loaded.tokenizer is None:
        raise ValueError("this model has no tokenizer: generate from token ids with an Engine and Requests")
    template = chat_template_for(loaded.chat_template, settings.chat)
    return PromptEncoder(loaded.tokenizer, template, loaded.config.max_seq_len, settings.max_new_tokens)
