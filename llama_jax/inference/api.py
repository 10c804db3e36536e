"""Text in, text out, from Python: `llama_jax.generate` and `llama_jax.stream`, on the engine.

    completions = generate(loaded, ["Once upon a time", "Tom"], max_new_tokens=50)   # Completion per prompt
    for event in stream(loaded, "Lily", max_new_tokens=50): print(event.text, end="")

BOS is prepended to each prompt, or with chat=True it is a user's message in the checkpoint's chat template.
Greedy at temperature 0; a prompt's samples depend only on the seed and its position in the list, never on
max_num_seqs (the engine's decode slots).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from llama_jax.inference.batch import generate_in_order
from llama_jax.inference.engine import Engine
from llama_jax.inference.prompts import PromptEncoder, chat_template_for
from llama_jax.inference.sampling import SamplingParams
from llama_jax.inference.settings import STREAM_STEPS_PER_DISPATCH, EngineSettings, GenerationSettings
from llama_jax.inference.types import Completion, Event, make_request
from llama_jax.loading import LoadedModel


def generate(
    loaded: LoadedModel,
    prompts: Sequence[str],
    *,
    max_num_seqs: int = 8,
    stop_strings: Sequence[str] = (),
    **options,
) -> list[Completion]:
    """Complete each prompt: a `Completion` (token_ids, text, finish_reason) per prompt, in order;
    `max_num_seqs` of them decode together. `options`: those of `settings` (max_new_tokens, temperature, top_k,
    top_p, seed, chat, stop_ids)."""
    engine = EngineSettings(max_num_seqs=max_num_seqs)
    generation = settings(loaded, **options)
    encoder = _encoder(loaded, generation)
    prompt_ids = [encoder.encode(prompt, index) for index, prompt in enumerate(prompts)]
    completions: list[Completion] = []
    if prompt_ids:
        generate_in_order(
            loaded,
            prompt_ids,
            generation,
            lambda ready: completions.extend(c for _, c in ready),
            engine=engine,
            stop_strings=tuple(stop_strings),
            progress=False,
        )
    return completions


def stream(loaded: LoadedModel, prompt: str, *, stop_strings: Sequence[str] = (), **options) -> Iterator[Event]:
    """The events of one prompt as its tokens come (`event.text`, `event.token_ids`; the last one has its
    finish_reason): the tokens and text `generate` gives for it, a few at a time. `options` as `generate`'s."""
    generation = settings(loaded, **options)
    ids = _encoder(loaded, generation).encode(prompt)
    sized = EngineSettings(
        max_num_seqs=1,
        max_model_len=len(ids) + generation.max_new_tokens,
        steps_per_dispatch=STREAM_STEPS_PER_DISPATCH,
    )
    request = make_request(
        ids,
        generation.max_new_tokens,
        tokenizer=loaded.tokenizer,
        sampling=generation.sampling,
        seed=generation.seed,
        stop_ids=generation.stop_ids,
        stop_strings=stop_strings,
    )
    yield from Engine(loaded, sized).stream(request)


def settings(
    loaded: LoadedModel,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = False,
    stop_ids: Sequence[int] = (),
) -> GenerationSettings:
    """The options of `generate` and `stream`, checked against the model. Greedy at temperature 0; top_k 0
    and top_p 1 keep every token; chat wraps each prompt as a user's message in the checkpoint's template;
    stop_ids end a completion besides the tokenizer's own."""
    generation = GenerationSettings(
        max_new_tokens, SamplingParams(temperature, top_k, top_p), seed, chat, tuple(stop_ids)
    )
    generation.check_model(loaded.config)
    return generation


def _encoder(loaded: LoadedModel, generation: GenerationSettings) -> PromptEncoder:
    if loaded.tokenizer is None:
        raise ValueError("this model has no tokenizer: generate from token ids with an Engine and Requests")
    template = chat_template_for(loaded.chat_template, generation.chat)
    return PromptEncoder(loaded.tokenizer, template, loaded.config.max_seq_len, generation.max_new_tokens)
