"""Device decoding: prefill a right-padded batch of prompts, then decode until every row stops.

Two entry points share the prefill and decode-step code:
  * `generate_batch_jit`: prefill and the whole decode loop (`lax.while_loop`) in ONE jit, so no Python
    runs per token and the host sees the tokens once per batch;
  * `prefill_jit` + `step_jit`: single decode steps, the cache donated to each so it is updated in place
    (streaming).

All are plain `jax.jit` over the model's `nnx.split` (graphdef, state): `nnx.jit` would walk the module graph
in Python on every call.

How a ragged batch decodes exactly like each prompt alone: all rows are prefilled at slots 0..P-1 of the
cache, then `cache.lengths` is set to the true prompt lengths, so row b's next token is written at slot
lengths[b] — where it would go alone — overwriting padding that no real query ever attended to.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.inference.sampling import SamplingParams, sample
from llama_jax.kv_cache import CACHE_AXES, KVCache
from llama_jax.sharding import shard

MIN_BUCKET = 16
# Prompt tokens (over the whole batch) prefilled per model call: bounds the attention scores of a long
# prompt batch, (batch, heads, chunk, cache_len) float32, to a few GB.
PREFILL_TOKENS = 4096


def bucket_length(n: int, limit: int) -> int:
    """The padded prompt length for a longest prompt of n tokens: a power of two ≥ MIN_BUCKET, ≤ limit."""
    return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), limit)


def prefill_chunk(batch: int, prefill_tokens: int = PREFILL_TOKENS) -> int:
    """Prompt positions prefilled per model call: a power of two, about prefill_tokens / batch."""
    return max(MIN_BUCKET, 1 << max(prefill_tokens // batch, 1).bit_length() - 1)


def _empty_cache(model, batch: int, cache_len: int) -> KVCache:
    cache = KVCache.zeros(model.config, batch, cache_len)
    return KVCache(shard(cache.k, *CACHE_AXES), shard(cache.v, *CACHE_AXES), cache.lengths)


def prefill(graphdef, state, ids, lengths, cache_len: int, chunk: int):
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
        logits, cache = model(piece, cache=cache, logits_at=at)
        inside = (last >= start) & (last < start + piece.shape[1])
        return logits[:, 0], inside, cache

    with jax.named_scope("prefill"):
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
            logits, inside, cache = run(cache, n_full * chunk, ids[:, n_full * chunk :])
            best = jnp.where(inside[:, None], logits, best)
        return best, KVCache(cache.k, cache.v, lengths)


def decode_step(graphdef, state, tokens, cache):
    """Logits (batch, vocab) after feeding one token per row, and the cache holding it."""
    with jax.named_scope("decode"):
        logits, cache = nnx.merge(graphdef, state)(tokens[:, None], cache=cache)
        return logits[:, 0], cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeLoopState:
    """What the on-device decode loop carries from one step to the next."""

    step: jax.Array  # int32: tokens generated so far; the next one goes to tokens[:, step]
    last: jax.Array  # (batch,) the token generated last: the next step's input
    cache: KVCache
    tokens: jax.Array  # (batch, max_new_tokens) the generated ids
    done: jax.Array  # (batch,) rows that produced a stop id, and padding rows


def _generate_batch(
    graphdef,
    state,
    ids,
    lengths,
    active,
    keys,
    *,
    cache_len: int,
    chunk: int,
    max_new_tokens: int,
    sampling: SamplingParams,
    stop_ids: tuple[int, ...],
):
    """(batch, max_new_tokens) generated ids and the number of steps run; rows stop independently."""
    logits, cache = prefill(graphdef, state, ids, lengths, cache_len, chunk)
    first = sample(logits, keys, 0, sampling)
    stop = jnp.asarray(stop_ids, jnp.int32)
    tokens = jnp.zeros((ids.shape[0], max_new_tokens), jnp.int32).at[:, 0].set(first)
    start = DecodeLoopState(jnp.int32(1), first, cache, tokens, ~active | jnp.isin(first, stop))

    def unfinished(s: DecodeLoopState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def advance(s: DecodeLoopState) -> DecodeLoopState:
        logits, cache = decode_step(graphdef, state, s.last, s.cache)
        token = sample(logits, keys, s.step, sampling)
        tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step))
        return DecodeLoopState(s.step + 1, token, cache, tokens, s.done | jnp.isin(token, stop))

    end = jax.lax.while_loop(unfinished, advance, start)
    return end.tokens, end.step


def _prefill_and_sample(graphdef, state, ids, lengths, keys, *, cache_len: int, chunk: int, sampling: SamplingParams):
    logits, cache = prefill(graphdef, state, ids, lengths, cache_len, chunk)
    return sample(logits, keys, 0, sampling), cache


def _step_and_sample(graphdef, state, tokens, cache, keys, step, *, sampling: SamplingParams):
    logits, cache = decode_step(graphdef, state, tokens, cache)
    return sample(logits, keys, step, sampling), cache


generate_batch_jit = jax.jit(
    _generate_batch, static_argnames=("graphdef", "cache_len", "chunk", "max_new_tokens", "sampling", "stop_ids")
)
prefill_jit = jax.jit(_prefill_and_sample, static_argnames=("graphdef", "cache_len", "chunk", "sampling"))
step_jit = jax.jit(_step_and_sample, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
