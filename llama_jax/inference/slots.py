"""Continuous batching, the device side: a fixed number of decode slots over one KV cache.

    backend = SlotBackend(loaded, slots=8, cache_len=1024)
    first, logprobs = backend.insert([3, 5], [request_a, request_b], bucket=64)   # prefill into slots 3, 5
    tokens, logprobs = backend.decode(8, active=[s in (3, 5) for s in range(8)])    # 8 steps of slots 3, 5

The cache is (layers, slots, kv_heads, cache_len, head_dim) with each slot's length; prompts are prefilled on
a small cache of their own bucket (several at once: 1, 2, 4, ... up to `prefill_rows` rows, the power of two
that holds them) and copied into their slots. Each slot samples with its own settings, key
and step, and decoding reads the cache in blocks, only as far as the longest live slot
(`attention.attend_live_cache`): every slot's tokens are those it would get alone. The cache is donated to
every call, so it is updated in place; calls are plain `jax.jit` over the model's split state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.inference.decode import prefill, prefill_chunk
from llama_jax.inference.sampling import RowSampling, sample_rows
from llama_jax.inference.scheduler import Request
from llama_jax.kv_cache import CACHE_AXES, KVCache
from llama_jax.loading import LoadedModel
from llama_jax.sharding import named_sharding

CACHE_BLOCK = 128  # cache slots read per block in decoding; the cache length is a multiple of it


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """What the device keeps per slot between calls, besides the cache."""

    last: jax.Array  # (slots,) the token generated last: the next step's input
    step: jax.Array  # (slots,) tokens generated so far: the sampling step
    keys: jax.Array  # (slots,) each request's random key
    sampling: RowSampling


def _chosen_logprob(logits, token):
    """log p(token) = logit - logsumexp(logits). (Taken from log_softmax, the (slots, vocab) array it
    materialises made XLA CPU's decode loop 5x slower beside the sampler's conditional.)"""
    logits = logits.astype(jnp.float32)
    return jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)


def _insert(
    graphdef, state, cache: KVCache, slots: SlotState, ids, lengths, rows, keys, sampling: RowSampling, *, chunk: int
):
    """Prefill `ids` (rows, bucket) and copy each row into slot rows[i] (rows equal to the slot count are
    padding, dropped); sample each one's first token."""
    logits, small = prefill(graphdef, state, ids, lengths, ids.shape[1], chunk)
    bucket = ids.shape[1]
    k = cache.k.at[:, rows, :, :bucket].set(small.k.astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, rows, :, :bucket].set(small.v.astype(cache.v.dtype), mode="drop")
    token = sample_rows(logits, keys, jnp.zeros_like(lengths), sampling)
    slots = SlotState(
        slots.last.at[rows].set(token, mode="drop"),
        slots.step.at[rows].set(1, mode="drop"),
        slots.keys.at[rows].set(keys, mode="drop"),
        jax.tree.map(lambda old, new: old.at[rows].set(new, mode="drop"), slots.sampling, sampling),
    )
    return KVCache(k, v, cache.lengths.at[rows].set(lengths, mode="drop")), slots, token, _chosen_logprob(logits, token)


def _decode(graphdef, state, cache: KVCache, slots: SlotState, active, *, steps: int, block: int):
    """`steps` decode steps of every slot: (slots, steps) tokens and their log-probabilities. Free slots
    (`active` False) sit at length 0, so the live part of the cache is that of the requests."""
    model = nnx.merge(graphdef, state)
    cache = KVCache(cache.k, cache.v, jnp.where(active, cache.lengths, 0))

    def one(carry, _):
        cache, slots = carry
        logits, cache = model(slots.last[:, None], cache=cache, cache_block=block)
        cache = KVCache(cache.k, cache.v, jnp.where(active, cache.lengths, 0))
        logits = logits[:, 0]
        token = sample_rows(logits, slots.keys, slots.step, slots.sampling)
        slots = SlotState(token, slots.step + 1, slots.keys, slots.sampling)
        return (cache, slots), (token, _chosen_logprob(logits, token))

    with jax.named_scope("decode"):
        (cache, slots), (tokens, logprobs) = jax.lax.scan(one, (cache, slots), length=steps)
    return cache, slots, tokens.T, logprobs.T


_insert_jit = jax.jit(_insert, static_argnames=("graphdef", "chunk"), donate_argnames=("cache", "slots"))
_decode_jit = jax.jit(_decode, static_argnames=("graphdef", "steps", "block"), donate_argnames=("cache", "slots"))


class SlotBackend:
    """The model behind a `scheduler.Scheduler`: `slots` requests decode together over one cache of
    `cache_len` positions per slot (rounded up to CACHE_BLOCK)."""

    def __init__(self, loaded: LoadedModel, slots: int, cache_len: int, prefill_rows: int | None = None):
        self.slots, self.mesh = slots, loaded.mesh
        self.cache_len = -(-cache_len // CACHE_BLOCK) * CACHE_BLOCK
        self.prefill_rows = prefill_rows or min(slots, 4)
        self.pad_id = loaded.tokenizer.pad_id if loaded.tokenizer is not None else 0
        self.graphdef, self.state = nnx.split(loaded.model)
        config = loaded.config
        shape = (config.n_layers, slots, config.n_kv_heads, self.cache_len, config.head_dim)
        kv_sharding = named_sharding(self.mesh, CACHE_AXES, shape)
        row = named_sharding(self.mesh, ("batch",), (slots,))
        self.cache = KVCache(
            jax.device_put(jnp.zeros(shape, config.dtype), kv_sharding),
            jax.device_put(jnp.zeros(shape, config.dtype), kv_sharding),
            jax.device_put(jnp.zeros((slots,), jnp.int32), row),
        )
        zeros = np.zeros((slots,), np.int32)
        self.slot_state = SlotState(
            zeros,
            zeros,
            jax.random.split(jax.random.key(0), slots),
            RowSampling(np.zeros(slots, np.float32), zeros, np.ones(slots, np.float32)),
        )
        self.compiled: set[tuple] = set()  # ("insert", rows, bucket), ("decode", steps)

    def insert(self, slots: Sequence[int], requests: Sequence[Request], bucket: int) -> tuple[list[int], list[float]]:
        firsts, logprobs = [], []
        for start in range(0, len(requests), self.prefill_rows):
            group, group_slots = requests[start : start + self.prefill_rows], slots[start : start + self.prefill_rows]
            n = 1 << (len(group) - 1).bit_length()  # few compiled shapes, little padding
            ids = np.full((n, bucket), self.pad_id, np.int32)
            lengths = np.ones((n,), np.int32)
            rows = np.full((n,), self.slots, np.int32)  # out of range: padding rows are dropped
            for i, (slot, request) in enumerate(zip(group_slots, group)):
                ids[i, : len(request.prompt_ids)] = request.prompt_ids
                lengths[i], rows[i] = len(request.prompt_ids), slot
            padded = list(group) + [group[0]] * (n - len(group))
            keys = jax.vmap(lambda seed, stream: jax.random.fold_in(jax.random.key(seed), stream))(
                np.asarray([r.seed for r in padded], np.uint32), np.asarray([r.stream for r in padded], np.int32)
            )
            self.compiled.add(("insert", n, bucket))
            with jax.set_mesh(self.mesh):
                self.cache, self.slot_state, token, logprob = _insert_jit(
                    self.graphdef,
                    self.state,
                    self.cache,
                    self.slot_state,
                    ids,
                    lengths,
                    rows,
                    keys,
                    RowSampling.of([r.sampling for r in padded]),
                    chunk=prefill_chunk(n),
                )
            firsts += np.asarray(token)[: len(group)].tolist()
            logprobs += np.asarray(logprob)[: len(group)].tolist()
        return firsts, logprobs

    def decode(self, steps: int, active: Sequence[bool]) -> tuple[list[list[int]], list[list[float]]]:
        self.compiled.add(("decode", steps))
        with jax.set_mesh(self.mesh):
            self.cache, self.slot_state, tokens, logprobs = _decode_jit(
                self.graphdef,
                self.state,
                self.cache,
                self.slot_state,
                np.asarray(active),
                steps=steps,
                block=CACHE_BLOCK,
            )
        return np.asarray(tokens).tolist(), np.asarray(logprobs).tolist()
