"""Text in, text out: a loaded model generating completions of prompts with fixed settings.

    generator = Generator(loaded, GenerationSettings(max_new_tokens=50))
    for batch in generator.batches(prompts): ...      # lists of Completion, in input order
    for piece in generator.stream(prompt): ...        # StreamPiece per token as it is sampled

Prompt lengths are bucketed (powers of two, at least 16) and the batch is padded to `batch_size`, so a long
file compiles one function per bucket; `decode.py` runs the device side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.inference.decode import (
    PREFILL_TOKENS,
    bucket_length,
    generate_batch_jit,
    prefill_chunk,
    prefill_jit,
    step_jit,
)
from llama_jax.inference.prompts import PromptEncoder, chat_template_for, check_fits, completion_text
from llama_jax.inference.sampling import SamplingParams, row_keys
from llama_jax.inference.settings import GenerationSettings
from llama_jax.loading import LoadedModel
from llama_jax.sharding import named_sharding


@dataclasses.dataclass
class Completion:
    prompt: str
    completion: str
    token_ids: list[int]  # the generated ids, without the stop id that ended them
    finish_reason: str  # "stop": a stop id came (not included above); "length": max_new_tokens reached


@dataclasses.dataclass
class StreamPiece:
    """New text and the token ids that made it: usually one id, several when a character spans tokens."""

    token_ids: list[int]
    text: str


class Generator:
    """A loaded model ready to generate with fixed settings; remembers which shapes it compiled."""

    def __init__(
        self, loaded: LoadedModel, settings: GenerationSettings | None = None, prefill_tokens: int = PREFILL_TOKENS
    ):
        """`prefill_tokens` bounds the prompt tokens (over the batch) that one prefill call processes."""
        settings = settings or GenerationSettings()
        settings.check_model(loaded.config)
        self.config, self.mesh, self.tokenizer = loaded.config, loaded.mesh, loaded.tokenizer
        self.settings = settings
        self.sampling = settings.sampling
        self.max_new_tokens, self.seed, self.batch_size = settings.max_new_tokens, settings.seed, settings.batch_size
        template = chat_template_for(loaded.chat_template, settings.chat)
        self.encoder = (
            PromptEncoder(self.tokenizer, template, self.config.max_seq_len, self.max_new_tokens)
            if self.tokenizer is not None
            else None
        )
        defaults = tuple(self.tokenizer.stop_ids) if self.tokenizer is not None else ()
        self.stop_ids = tuple(sorted(set(defaults) | set(settings.stop_ids)))
        self.graphdef, self.state = nnx.split(loaded.model)
        self.prefill_tokens = prefill_tokens
        self.compiled_shapes: set[tuple[int, int, int]] = set()  # (batch, prompt bucket, cache length)

    def encode(self, prompt: str, index: int = 0) -> list[int]:
        """Prompt ids: BOS + text, or the chat template's ids for one user message."""
        if self.encoder is None:
            raise ValueError("this checkpoint has no tokenizer; generate from token ids (generate_ids)")
        return self.encoder.encode(prompt, index)

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], indices: Sequence[int]) -> list[tuple[list[int], str]]:
        """Generate for at most batch_size prompts at once: (generated ids, finish_reason) per prompt.
        `indices` are the prompts' positions in the whole input; they choose each prompt's random stream."""
        if not 0 < len(prompt_ids) <= self.batch_size or len(indices) != len(prompt_ids):
            raise ValueError(f"a batch holds 1..{self.batch_size} prompts with one index each")
        for ids, index in zip(prompt_ids, indices):
            if not ids:
                raise ValueError(f"prompt {index + 1} is empty: it needs at least the BOS token")
            check_fits(len(ids), self.max_new_tokens, self.config.max_seq_len, index)
        bucket = bucket_length(max(map(len, prompt_ids)), self.config.max_seq_len - self.max_new_tokens)
        ids, lengths, active, keys = self._batch_arrays(prompt_ids, indices, self.batch_size, bucket)
        cache_len = bucket + self.max_new_tokens
        self.compiled_shapes.add((self.batch_size, bucket, cache_len))
        with jax.set_mesh(self.mesh):
            tokens, steps = generate_batch_jit(
                self.graphdef,
                self.state,
                ids,
                lengths,
                active,
                keys,
                cache_len=cache_len,
                max_new_tokens=self.max_new_tokens,
                chunk=prefill_chunk(self.batch_size, self.prefill_tokens),
                sampling=self.sampling,
                stop_ids=self.stop_ids,
            )
        tokens = np.asarray(tokens)[: len(prompt_ids), : int(steps)]
        return [self._finish(row) for row in tokens]

    def batches(
        self, prompts: Sequence[str], first_index: int = 0, prompt_ids: Sequence[list[int]] | None = None
    ) -> Iterator[list[Completion]]:
        """Completions of `prompts`, one list per batch, in input order; `first_index` is the index of
        prompts[0] in the whole input (a resumed run keeps each prompt's random stream). `prompt_ids`:
        the prompts already encoded, if they were."""
        encoded = (
            prompt_ids if prompt_ids is not None else [self.encode(p, first_index + i) for i, p in enumerate(prompts)]
        )
        for start in range(0, len(prompts), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(prompts)))
            results = self.generate_ids([encoded[i] for i in chunk], [first_index + i for i in chunk])
            yield [
                Completion(prompts[i], self.completion_text(encoded[i], ids), ids, reason)
                for i, (ids, reason) in zip(chunk, results)
            ]

    def stream(self, prompt: str, index: int = 0) -> Iterator[StreamPiece]:
        """Generate for one prompt, yielding each token (and the text it adds) as soon as it is sampled."""
        prompt_ids = self.encode(prompt, index)
        bucket = bucket_length(len(prompt_ids), self.config.max_seq_len - self.max_new_tokens)
        ids, lengths, _, keys = self._batch_arrays([prompt_ids], [index], 1, bucket)
        generated: list[int] = []
        shown = 0  # how many ids of `generated` have been yielded
        with jax.set_mesh(self.mesh):
            token, cache = prefill_jit(
                self.graphdef,
                self.state,
                ids,
                lengths,
                keys,
                cache_len=bucket + self.max_new_tokens,
                sampling=self.sampling,
                chunk=prefill_chunk(1, self.prefill_tokens),
            )
            for step in range(1, self.max_new_tokens + 1):
                token_id = int(token[0])
                if token_id in self.stop_ids:
                    break
                generated.append(token_id)
                # Text ending in U+FFFD is a character still missing bytes: wait for the next token.
                if not self.completion_text(prompt_ids, generated).endswith("\ufffd"):
                    yield self._piece(prompt_ids, generated, shown)
                    shown = len(generated)
                if step < self.max_new_tokens:
                    token, cache = step_jit(
                        self.graphdef, self.state, token, cache, keys, jnp.int32(step), sampling=self.sampling
                    )
        if shown < len(generated):  # bytes that never became a character
            yield self._piece(prompt_ids, generated, shown)

    def _piece(self, prompt_ids: Sequence[int], generated: list[int], shown: int) -> StreamPiece:
        before = self.completion_text(prompt_ids, generated[:shown])
        return StreamPiece(generated[shown:], self.completion_text(prompt_ids, generated)[len(before) :])

    def completion_text(self, prompt_ids: Sequence[int], generated: Sequence[int]) -> str:
        return completion_text(self.tokenizer, prompt_ids, generated)

    def _finish(self, row: np.ndarray) -> tuple[list[int], str]:
        stops = np.flatnonzero(np.isin(row, self.stop_ids))
        if stops.size:
            return row[: stops[0]].tolist(), "stop"
        return row.tolist(), "length"

    def _batch_arrays(self, prompt_ids, indices, batch: int, bucket: int):
        """Right-padded ids (batch, bucket), lengths, which rows are real, and the rows' keys, on the mesh.
        Padding rows repeat the first prompt's index: their tokens are dropped."""
        pad = self.tokenizer.pad_id if self.tokenizer is not None else 0
        ids = np.full((batch, bucket), pad, np.int32)
        lengths = np.ones((batch,), np.int32)
        for row, prompt in enumerate(prompt_ids):
            ids[row, : len(prompt)] = prompt
            lengths[row] = len(prompt)
        active = np.arange(batch) < len(prompt_ids)
        row_indices = np.asarray(list(indices) + [indices[0]] * (batch - len(indices)), np.int32)

        def put(x, names):
            return jax.device_put(x, named_sharding(self.mesh, names, x.shape))

        keys = jax.device_put(row_keys(self.seed, row_indices), named_sharding(self.mesh, ("batch",), (batch,)))
        return put(ids, ("batch", None)), put(lengths, ("batch",)), put(active, ("batch",)), keys


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
) -> list[Completion]:
    """Complete each prompt (BOS is prepended; with chat=True it is the user's message in the
    checkpoint's chat template). Greedy at temperature 0; results do not depend on batch_size."""
    settings = GenerationSettings(
        max_new_tokens, SamplingParams(temperature, top_k, top_p), seed, batch_size, chat, tuple(stop_ids)
    )
    generator = Generator(loaded, settings)
    return [completion for batch in generator.batches(list(prompts)) for completion in batch]


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
) -> Iterator[StreamPiece]:
    """Yield StreamPieces (token ids, the text they add) for one prompt as tokens are generated:
    `for piece in stream(model, "Once upon"): print(piece.text, end="")`."""
    settings = GenerationSettings(
        max_new_tokens, SamplingParams(temperature, top_k, top_p), seed, 1, chat, tuple(stop_ids)
    )
    yield from Generator(loaded, settings).stream(prompt)
