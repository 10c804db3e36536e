"""Text generation: prefill a right-padded batch of prompts, then decode on device until every row stops.

Two paths share the same prefill and decode-step code:
  * batches (`generate`, `Generator.batches`): prefill and the whole decode loop run in ONE jit
    (`lax.while_loop`), so no Python runs per token and the host sees the tokens once per batch;
  * streaming (`stream`): prefill and single decode steps are jitted separately and the cache is
    donated to each step, so it is updated in place.

All of them are plain `jax.jit` over the model's `nnx.split` (graphdef, state): `nnx.jit` would walk the
module graph in Python on every call. Prompt lengths are bucketed (powers of two, at least 16) and the
batch is padded to `batch_size`, so a long file compiles one function per bucket.

How a ragged batch decodes exactly like each prompt alone: all rows are prefilled at slots 0..P-1 of the
cache, then `cache.lengths` is set to the true prompt lengths, so row b's next token is written at slot
lengths[b] — where it would go alone — overwriting padding that no real query ever attended to.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.checkpoint import LoadedModel
from llama_jax.kv_cache import CACHE_AXES, KVCache
from llama_jax.model import per_layer_params
from llama_jax.prompts import PromptEncoder, chat_template_for, check_fits
from llama_jax.sampling import SamplingParams, row_keys, sample
from llama_jax.sharding import named_sharding, shard

MIN_BUCKET = 16
# Prompt tokens (over the whole batch) prefilled per model call: bounds the attention scores of a long
# prompt batch, (batch, heads, chunk, cache_len) float32, to a few GB.
PREFILL_TOKENS = 4096


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


def bucket_length(n: int, limit: int) -> int:
    """The padded prompt length for a longest prompt of n tokens: a power of two ≥ MIN_BUCKET, ≤ limit."""
    return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), limit)


def _empty_cache(model, batch: int, cache_len: int) -> KVCache:
    cache = KVCache.zeros(model.config, batch, cache_len)
    return KVCache(shard(cache.k, *CACHE_AXES), shard(cache.v, *CACHE_AXES), cache.lengths)


def prefill_chunk(batch: int, prefill_tokens: int = PREFILL_TOKENS) -> int:
    """Prompt positions prefilled per model call: a power of two, about prefill_tokens / batch."""
    return max(MIN_BUCKET, 1 << max(prefill_tokens // batch, 1).bit_length() - 1)


def _prefill(graphdef, state, layers, ids, lengths, cache_len: int, chunk: int):
    """Logits (batch, vocab) at each row's last prompt token, and the cache holding the prompts.

    The prompts go through the model `chunk` positions at a time (a scan, plus one shorter call for a
    remainder), each chunk attending to the cache written so far; each row keeps the logits of the
    chunk that holds its last token.
    """
    model = nnx.merge(graphdef, state)
    batch, bucket = ids.shape
    last = lengths - 1

    def run(cache, start, piece):
        at = jnp.clip(last - start, 0, piece.shape[1] - 1)[:, None]
        logits, cache = model(piece, cache=cache, logits_at=at, layer_params=layers)
        inside = (last >= start) & (last < start + piece.shape[1])
        return logits[:, 0], inside, cache

    cache = _empty_cache(model, batch, cache_len)
    if bucket <= chunk:
        logits, _, cache = run(cache, 0, ids)
        return logits, KVCache(cache.k, cache.v, lengths)

    def full_chunk(carry, start):
        cache, best = carry
        logits, inside, cache = run(cache, start, jax.lax.dynamic_slice_in_dim(ids, start, chunk, axis=1))
        return (cache, jnp.where(inside[:, None], logits, best)), None

    n_full = bucket // chunk
    best = jnp.zeros((batch, model.config.vocab_size), jnp.float32)
    (cache, best), _ = jax.lax.scan(full_chunk, (cache, best), jnp.arange(n_full, dtype=jnp.int32) * chunk)
    if bucket % chunk:
        logits, inside, cache = run(cache, n_full * chunk, ids[:, n_full * chunk:])
        best = jnp.where(inside[:, None], logits, best)
    return best, KVCache(cache.k, cache.v, lengths)


def _decode_step(graphdef, state, layers, tokens, cache):
    logits, cache = nnx.merge(graphdef, state)(tokens[:, None], cache=cache, layer_params=layers)
    return logits[:, 0], cache


def _generate_batch(graphdef, state, layers, ids, lengths, active, keys, *, cache_len: int, chunk: int,
                    max_new_tokens: int, sampling: SamplingParams, stop_ids: tuple[int, ...]):
    """(batch, max_new_tokens) generated ids and the number of steps run; rows stop independently."""
    logits, cache = _prefill(graphdef, state, layers, ids, lengths, cache_len, chunk)
    first = sample(logits, keys, 0, sampling)
    stop = jnp.asarray(stop_ids, jnp.int32)
    tokens = jnp.zeros((ids.shape[0], max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = ~active | jnp.isin(first, stop)

    def unfinished(carry):
        step, _, _, _, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode(carry):
        step, last, cache, tokens, done = carry
        logits, cache = _decode_step(graphdef, state, layers, last, cache)
        token = sample(logits, keys, step, sampling)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
        return step + 1, token, cache, tokens, done | jnp.isin(token, stop)

    step, _, _, tokens, _ = jax.lax.while_loop(unfinished, decode, (jnp.int32(1), first, cache, tokens, done))
    return tokens, step


def _prefill_and_sample(graphdef, state, layers, ids, lengths, keys, *, cache_len: int, chunk: int,
                        sampling: SamplingParams):
    logits, cache = _prefill(graphdef, state, layers, ids, lengths, cache_len, chunk)
    return sample(logits, keys, 0, sampling), cache


def _step_and_sample(graphdef, state, layers, tokens, cache, keys, step, *, sampling: SamplingParams):
    logits, cache = _decode_step(graphdef, state, layers, tokens, cache)
    return sample(logits, keys, step, sampling), cache


generate_batch_jit = jax.jit(_generate_batch, static_argnames=("graphdef", "cache_len", "chunk", "max_new_tokens",
                                                               "sampling", "stop_ids"))
prefill_jit = jax.jit(_prefill_and_sample, static_argnames=("graphdef", "cache_len", "chunk", "sampling"))
step_jit = jax.jit(_step_and_sample, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))


class Generator:
    """A loaded model ready to generate with fixed settings; remembers which shapes it compiled."""

    def __init__(self, loaded: LoadedModel, *, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8, chat: bool = False,
                 stop_ids: Sequence[int] = (), per_layer_weights: bool = False,
                 prefill_tokens: int = PREFILL_TOKENS):
        """`per_layer_weights` decodes from a per-layer copy of the layer weights instead of slicing each
        layer out of the stacked arrays inside the compiled loop. It costs the layer weights' memory a
        second time, so it is off by default: on CPU it measured no faster (benchmarks/decode.py
        --per-layer-weights); it is the knob to try where a profile shows XLA copying sliced weights.
        `prefill_tokens` bounds the prompt tokens (over the batch) that one prefill call processes."""
        self.config, self.mesh, self.tokenizer = loaded.config, loaded.mesh, loaded.tokenizer
        self.sampling = SamplingParams(float(temperature), top_k, float(top_p))
        check_counts(max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
        self.max_new_tokens, self.seed, self.batch_size = max_new_tokens, seed, batch_size
        template = chat_template_for(loaded.chat_template, chat)
        self.encoder = (PromptEncoder(self.tokenizer, template, self.config.max_seq_len, max_new_tokens)
                        if self.tokenizer is not None else None)
        check_stop_ids(stop_ids, self.config.vocab_size)
        defaults = tuple(self.tokenizer.stop_ids) if self.tokenizer is not None else ()
        self.stop_ids = tuple(sorted(set(defaults) | set(stop_ids)))
        self.graphdef, self.state = nnx.split(loaded.model)
        self.layers = per_layer_params(loaded.model) if per_layer_weights else None
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
            tokens, steps = generate_batch_jit(self.graphdef, self.state, self.layers, ids, lengths, active, keys,
                                               cache_len=cache_len, max_new_tokens=self.max_new_tokens,
                                               chunk=prefill_chunk(self.batch_size, self.prefill_tokens),
                                               sampling=self.sampling, stop_ids=self.stop_ids)
        tokens = np.asarray(tokens)[: len(prompt_ids), : int(steps)]
        return [self._finish(row) for row in tokens]

    def batches(self, prompts: Sequence[str], first_index: int = 0,
                prompt_ids: Sequence[list[int]] | None = None) -> Iterator[list[Completion]]:
        """Completions of `prompts`, one list per batch, in input order; `first_index` is the index of
        prompts[0] in the whole input (a resumed run keeps each prompt's random stream). `prompt_ids`:
        the prompts already encoded, if they were."""
        encoded = prompt_ids if prompt_ids is not None else [self.encode(p, first_index + i)
                                                             for i, p in enumerate(prompts)]
        for start in range(0, len(prompts), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(prompts)))
            results = self.generate_ids([encoded[i] for i in chunk], [first_index + i for i in chunk])
            yield [Completion(prompts[i], self.completion_text(encoded[i], ids), ids, reason)
                   for i, (ids, reason) in zip(chunk, results)]

    def stream(self, prompt: str, index: int = 0) -> Iterator[StreamPiece]:
        """Generate for one prompt, yielding each token (and the text it adds) as soon as it is sampled."""
        prompt_ids = self.encode(prompt, index)
        bucket = bucket_length(len(prompt_ids), self.config.max_seq_len - self.max_new_tokens)
        ids, lengths, _, keys = self._batch_arrays([prompt_ids], [index], 1, bucket)
        generated: list[int] = []
        shown = 0  # how many ids of `generated` have been yielded
        with jax.set_mesh(self.mesh):
            token, cache = prefill_jit(self.graphdef, self.state, self.layers, ids, lengths, keys,
                                       cache_len=bucket + self.max_new_tokens, sampling=self.sampling,
                                       chunk=prefill_chunk(1, self.prefill_tokens))
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
                    token, cache = step_jit(self.graphdef, self.state, self.layers, token, cache, keys,
                                            jnp.int32(step), sampling=self.sampling)
        if shown < len(generated):  # bytes that never became a character
            yield self._piece(prompt_ids, generated, shown)

    def _piece(self, prompt_ids: Sequence[int], generated: list[int], shown: int) -> StreamPiece:
        before = self.completion_text(prompt_ids, generated[:shown])
        return StreamPiece(generated[shown:], self.completion_text(prompt_ids, generated)[len(before):])

    def completion_text(self, prompt_ids: Sequence[int], generated: Sequence[int]) -> str:
        """The text the generated ids add after the prompt. Decoding them together with the prompt keeps
        the spaces that tokenizers drop at the start of a decoded sequence."""
        prompt_text = self.tokenizer.decode(prompt_ids)
        full = self.tokenizer.decode(list(prompt_ids) + list(generated))
        return full[len(prompt_text):] if full.startswith(prompt_text) else self.tokenizer.decode(generated)

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


def check_counts(max_new_tokens: int, batch_size: int, seed: int) -> None:
    """ValueError naming the flag unless max_new_tokens, batch_size ≥ 1 and 0 ≤ seed < 2**32 (JAX keys
    hold 32 bits: larger seeds would silently repeat smaller ones)."""
    for name, value, low, high in (("max-new-tokens", max_new_tokens, 1, None), ("batch-size", batch_size, 1, None),
                                   ("seed", seed, 0, 2**32 - 1)):
        if not isinstance(value, int) or value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"{name} must be an integer {bounds}, got {value}")


def check_stop_ids(stop_ids: Sequence[int], vocab_size: int) -> None:
    bad = [i for i in stop_ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"stop ids {bad} are outside the vocabulary (0..{vocab_size - 1})")


def generate(loaded: LoadedModel, prompts: Sequence[str], *, max_new_tokens: int = 256, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, chat: bool = False, batch_size: int = 8,
             stop_ids: Sequence[int] = ()) -> list[Completion]:
    """Complete each prompt (BOS is prepended; with chat=True it is the user's message in the
    checkpoint's chat template). Greedy at temperature 0; results do not depend on batch_size."""
    generator = Generator(loaded, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, batch_size=batch_size, chat=chat, stop_ids=stop_ids)
    return [completion for batch in generator.batches(list(prompts)) for completion in batch]


def stream(loaded: LoadedModel, prompt: str, *, max_new_tokens: int = 256, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0, chat: bool = False,
           stop_ids: Sequence[int] = ()) -> Iterator[StreamPiece]:
    """Yield StreamPieces (token ids, the text they add) for one prompt as tokens are generated:
    `for piece in stream(model, "Once upon"): print(piece.text, end="")`."""
    generator = Generator(loaded, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, batch_size=1, chat=chat, stop_ids=stop_ids)
    yield from generator.stream(prompt)
