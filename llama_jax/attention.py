"""Scaled dot-product attention: one entry point for causal self-attention, four implementations, and the
blockwise reader of a KV cache.

* ``xla``       — grouped einsums with a float32 softmax over the whole (q_len × kv_len) scores: the reference,
                  and the CPU path of training (it is differentiable).
* ``blockwise`` — the same attention a block of queries at a time over blocks of keys with an online softmax
                  (flash attention written in XLA): only one block of scores exists at once, and blocks a query
                  cannot see are never read. Forward only: prefill and scoring off TPU and GPU.
* ``cudnn``     — cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16).
* ``splash``    — the Pallas splash-attention kernel (TPU), run per device under `shard_map`.

``auto`` picks splash on TPU, cudnn on GPU in half precision, and otherwise xla for training and blockwise
where no gradient is taken, by the platform of the mesh the computation is built for
(`sharding.current_platform`), which may be a TPU slice compiled for from a CPU host. Every implementation
takes segment ids for packed documents. Decoding and the chunks of long prompts read the paged KV cache
through `attend_live_cache`: on TPU with JAX's ragged paged attention kernel (`ragged_paged.py`), elsewhere the
blockwise reader's sibling, only the blocks some query can see.

Off their hardware both kernels still run in the CPU tests: cudnn's call falls back to its XLA kernel,
and splash runs in Pallas interpret mode, so layout, head grouping, masking and sharding are tested
everywhere; only the kernels' speed needs the accelerator.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import NamedSharding

from llama_jax import ragged_paged
from llama_jax.context_parallel import balanced_order, context_shards
from llama_jax.kv_cache import read
from llama_jax.sharding import current_platform, logical_to_spec, shard

# Large but finite: a fully masked row (a padding query) then gives a uniform softmax instead of NaN.
_MASKED = -1e30
# The segment id of a row's shared prefix: every token after it in the row sees it, whatever its own segment. Only
# the paths that build a mask honour it (`MASKED_PATHS`); splash's segment ids can only say "the same segment".
SHARED_PREFIX = -1
MASKED_PATHS = ("xla", "cudnn")
_SPLASH_BLOCKS = (512, 256, 128)  # the kernel tiles the sequence in multiples of 128 lanes
# Query and key block sizes of `blockwise_attention`, largest first, and the most scores (heads × block²) one
# row's tile may hold. On a 2-core CPU one prompt of 1024-4096 tokens ran 1.5-2x faster in blocks of 256 than of
# 64 (fewer loop iterations). The block never depends on the batch: a row's arithmetic must not change with
# the rows beside it.
_BLOCKWISE_BLOCKS = (256, 128, 64, 32, 16, 8, 4, 2, 1)
_BLOCKWISE_TILE = 1 << 19


def choose_implementation(requested: str, dtype, platform: str | None = None, *, differentiable: bool = True) -> str:
    """The implementation `requested` names; for "auto", the best one for `platform` (default: the current
    mesh's), the compute dtype, and whether gradients flow through it (training) or not (prefill, scoring)."""
    if requested != "auto":
        return requested
    platform = platform or current_platform()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if platform == "tpu":
        return "splash"
    if platform == "gpu" and half:
        return "cudnn"
    return "xla" if differentiable else "blockwise"


def causal_mask(
    q_index: jax.Array, kv_index: jax.Array, q_segments: jax.Array | None = None, kv_segments: jax.Array | None = None
) -> jax.Array:
    """Boolean (batch, q_len, kv_len): key j is visible to query i when j <= i in the same segment, or when j's
    segment is SHARED_PREFIX (a prompt every later segment of its row sees: GRPO's completions of one prompt).

    Indices are slots in the key sequence (the KV cache slot when decoding), not RoPE positions, so
    packed documents whose positions restart still mask correctly.
    """
    mask = kv_index[:, None, :] <= q_index[:, :, None]
    if q_segments is not None:
        same = q_segments[:, :, None] == kv_segments[:, None, :]
        mask &= same | (kv_segments[:, None, :] == SHARED_PREFIX)
    return mask


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, implementation: str, *, segment_ids: jax.Array | None = None
) -> jax.Array:
    """Causal self-attention, within `segment_ids` (batch, length) if given: q (batch, length, heads,
    head_dim); k, v (batch, length, kv_heads, head_dim). Returns q's shape.

    On a mesh with a context axis (`context_parallel.py`) the sequence is in its load-balanced order, split over
    the axis: each chip gathers every key and value and attends its own queries, masking by original index."""
    shards = context_shards()
    if shards > 1 and implementation != "splash":
        # XLA's einsums under a split sequence: blockwise masks by slot, and cuDNN's partitioner wants the
        # queries split as the keys are (a per-chip cuDNN call with its rows of the mask would lift that).
        implementation = "xla"
        k, v = (shard(x, "batch", None, "kv_heads", None) for x in (k, v))  # the all-gather over context
    if implementation == "xla":
        return _grouped_attention(q, k, v, _self_attention_mask(q.shape[0], q.shape[1], segment_ids))
    if implementation == "blockwise":
        return blockwise_attention(q, k, v, segment_ids)
    if implementation == "cudnn":
        kernel = "cudnn" if current_platform() == "gpu" else "xla"
        if segment_ids is None:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=kernel)
        mask = _self_attention_mask(q.shape[0], q.shape[1], segment_ids)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=kernel)
    if implementation == "splash":
        if q.shape[1] % (_SPLASH_BLOCKS[-1] * (2 * shards if shards > 1 else 1)) == 0:
            return _splash_attention(q, k, v, segment_ids, shards)
        # sequences the kernel cannot tile (short prompts, odd lengths) take the blockwise path
        return attention(q, k, v, "blockwise", segment_ids=segment_ids)
    raise ValueError(f"unknown attention implementation {implementation!r}")


def blockwise_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, block: int | None = None
) -> jax.Array:
    """Causal self-attention (within `segment_ids`) a block of `block` queries at a time (default: the
    largest of 256, 128, ... that divides the length and keeps a tile of scores small), each over the key
    blocks from the one where its earliest segment starts up to its own, with an online softmax (float32):
    one tile of scores exists at a time, and the masked blocks above the diagonal and before a segment are
    skipped. Forward only (the loops have data-dependent bounds). Equal to the reference to float32
    rounding; a row's result depends only on that row."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    block = block or next(
        b for b in _BLOCKWISE_BLOCKS if length % b == 0 and (heads * b * b <= _BLOCKWISE_TILE or b == 1)
    )
    if block == length:  # one block: the reference computes exactly that, with fewer operations to compile
        return _grouped_attention(q, k, v, _self_attention_mask(batch, length, segment_ids))
    segments = segment_ids if segment_ids is not None else jnp.zeros((batch, length), jnp.int32)
    # Heads-major layouts, so that each block's scores are a (batch, kv_heads)-batched matmul; the queries
    # scaled once here rather than every tile of scores.
    qh = (q * head_dim**-0.5).astype(q.dtype)
    qh = qh.reshape(batch, length, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    position = jnp.arange(length, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones((batch, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    segment_start = jax.lax.cummax(jnp.where(starts, position, 0), axis=1)  # (batch, length)

    def query_block(i, out):
        first_query = i * block
        qi = jax.lax.dynamic_slice_in_dim(qh, first_query, block, axis=3)
        q_segments = jax.lax.dynamic_slice_in_dim(segments, first_query, block, axis=1)

        def key_block(j, carry, diagonal: bool = False):
            first_key = j * block
            visible = None  # below the diagonal every key is earlier: only segments can hide one
            if segment_ids is not None:
                k_segments = jax.lax.dynamic_slice_in_dim(segments, first_key, block, axis=1)
                visible = (q_segments[:, :, None] == k_segments[:, None, :])[:, None, None]
            if diagonal:
                causal = jnp.arange(block)[:, None] >= jnp.arange(block)
                visible = causal if visible is None else visible & causal
            return _online_softmax_step(
                carry,
                qi,
                jax.lax.dynamic_slice_in_dim(kh, first_key, block, axis=2),
                jax.lax.dynamic_slice_in_dim(vh, first_key, block, axis=2),
                visible,
            )

        earliest = jnp.min(jax.lax.dynamic_slice_in_dim(segment_start, first_query, block, axis=1)) // block
        carry = jax.lax.fori_loop(earliest, i, key_block, _online_softmax_start(qi.shape[:-1], head_dim))
        carry = key_block(i, carry, diagonal=True)
        return jax.lax.dynamic_update_slice_in_dim(out, _online_softmax_result(carry), first_query, axis=3)

    out = jax.lax.fori_loop(0, length // block, query_block, jnp.zeros(qh.shape, jnp.float32))
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim).astype(q.dtype)


def _online_softmax_start(shape: tuple[int, ...], head_dim: int):
    """(running max, running sum, running output) of queries of `shape` before any key."""
    return (
        jnp.full(shape, _MASKED, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros((*shape, head_dim), jnp.float32),
    )


def _online_softmax_step(carry, q, k, v, visible):
    """Fold one block of keys into the running softmax of q (..., q_len, head_dim), already scaled, against
    k, v (..., block, head_dim) (leading axes: batch, kv_heads, and q's heads per KV head); `visible`
    (broadcast to the scores, or None: all) says which keys each query sees. A block a query cannot see adds
    exactly nothing to it: its probabilities are exp(-1e30 - max) = 0 and the correction exp(0) = 1."""
    running_max, total, acc = carry
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    if visible is not None:
        scores = jnp.where(visible, scores, _MASKED)
    new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))
    probs = jnp.exp(scores - new_max[..., None])
    correction = jnp.exp(running_max - new_max)
    total = total * correction + jnp.sum(probs, axis=-1)
    acc = acc * correction[..., None] + jnp.einsum(
        "bkgts,bksd->bkgtd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return new_max, total, acc


def _online_softmax_result(carry) -> jax.Array:
    _, total, acc = carry
    return acc / total[..., None]


@dataclasses.dataclass(frozen=True)
class LiveCache:
    """How queries read a paged KV cache in blocks (`attend_live_cache`): `q_index` (batch, q_len) is the
    position of each query, `page_table` (batch, pages_per_seq) where each row's positions are, `block` the
    positions per block. Only blocks some query can see are read."""

    q_index: jax.Array
    page_table: jax.Array
    block: int


def attend_live_cache(
    q: jax.Array, kv_all: jax.Array, scales: jax.Array | None, layer: jax.Array, live: LiveCache
) -> jax.Array:
    """Attention of q (batch, q_len, heads, head_dim) over layer `layer` of the paged pool (`kv_cache.py`: layers,
    pages, 2, kv_heads, page_size, head_dim; int8 with `scales`), each row through its own page table, reading
    `live.block` positions at a time, as far as the queries reach and no further: a decode step costs the live
    part of the cache, not its allocated length. All rows read the blocks the rows outside the `LONG_ROWS`
    longest need; those longest go on alone, so one long request does not make every row read its length (a
    2,048-token request decoding among 300-token ones tripled the CPU decode step when all rows read as far as
    it).

    An online softmax (float32) runs over the blocks, each row's in the same order. A block beyond a row's own
    queries is fully masked and adds exactly nothing to that row, so each row's result is the same however far
    the other rows reach: continuous batching stays batch-invariant. A row's positions (pages_per_seq × page
    size) are a multiple of `block`, and the block and the page size divide one another."""
    if kv_all.ndim == 5:  # laid out for the TPU kernel
        return ragged_paged.attend(q, kv_all, layer, live.page_table, live.q_index)
    batch, q_len, heads, head_dim = q.shape
    kv_heads = kv_all.shape[3]
    block, table = live.block, live.page_table[:batch]
    max_len = table.shape[1] * kv_all.shape[4]
    qg = (q * head_dim**-0.5).astype(q.dtype)
    qg = qg.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    # Blocks each row needs (0 for an idle row, whose queries sit at position -1).
    reach = jnp.minimum(jnp.max(live.q_index, axis=1) // block + 1, max_len // block)

    def fold(carry, qg, q_index, rows_table, first, last):
        def one_block(i, carry):
            start = i * block
            visible = (start + jnp.arange(block))[None, None, :] <= q_index[:, :, None]  # (rows, q_len, block)
            k, v = (a.astype(q.dtype) for a in read(kv_all, scales, layer, rows_table, start, block))
            return _online_softmax_step(carry, qg, k, v, visible[:, None, None])

        return jax.lax.fori_loop(first, last, one_block, carry)

    carry = _online_softmax_start(qg.shape[:-1], head_dim)
    long = min(LONG_ROWS, batch)
    if long == batch or _batch_is_split(batch):  # one loop (gathering rows of a split batch would move them)
        carry = fold(carry, qg, live.q_index, table, 0, jnp.max(reach))
    else:
        longest, rows = jax.lax.top_k(reach, long + 1)
        carry = fold(carry, qg, live.q_index, table, 0, longest[long])  # as far as all but the longest need
        rows = rows[:long]
        theirs = jax.tree.map(lambda a: a[rows], carry)
        theirs = fold(theirs, qg[rows], live.q_index[rows], table[rows], longest[long], longest[0])
        carry = jax.tree.map(lambda a, b: a.at[rows].set(b), carry, theirs)
    out = _online_softmax_result(carry)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim).astype(q.dtype)


LONG_ROWS = 4  # rows of a decode step that read past the others' blocks on their own (`attend_live_cache`)


def _batch_is_split(batch: int) -> bool:
    """Whether the active mesh splits a batch of `batch` rows over devices."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and logical_to_spec(("batch",), (batch,), mesh)[0] is not None


def _self_attention_mask(batch: int, length: int, segment_ids: jax.Array | None) -> jax.Array:
    index = jnp.broadcast_to(jnp.asarray(balanced_order(length, context_shards())), (batch, length))
    return causal_mask(index, index, segment_ids, segment_ids)


def _grouped_attention(q, k, v, mask):
    """The reference: every score at once. k, v (batch, kv_len, kv_heads, head_dim)."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    # Query heads that share a KV head are grouped instead of repeating K and V in memory.
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores * (head_dim**-0.5), _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    # Heads-major output keeps (batch, kv_heads) as the dot's leading batch axes; XLA CPU ran the
    # query-major version 3-20x slower. One transpose of the (small) result follows.
    out = jnp.einsum("bkgts,bskd->bkgtd", probs, v, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim).astype(q.dtype)


def _splash_attention(q, k, v, segment_ids, shards: int = 1):
    """Splash attention per device: batch split over (data, fsdp), heads over tensor, as the rules say; under
    context parallelism the queries split over context too, each chip attending them to all the keys (gathered)
    with its share of the load-balanced causal mask (the kernel's `q_seq_shards`)."""
    batch, length, heads, head_dim = q.shape
    chunk = length // (2 * shards) if shards > 1 else length  # the mask's pattern repeats every chunk
    block = next(b for b in _SPLASH_BLOCKS if chunk % b == 0)
    mesh = jax.sharding.get_abstract_mesh()
    q_spec = logical_to_spec(("batch", "q_heads", "length", "head_dim"), (batch, heads, length, head_dim), mesh)
    kv_spec = logical_to_spec(("batch", "kv_heads", None, "head_dim"), (batch, k.shape[2], length, head_dim), mesh)
    if q_spec[1] != kv_spec[1]:  # e.g. 1 KV head cannot split: keep all heads together on each device
        q_spec, kv_spec = jax.P(q_spec[0], None, q_spec[2], None), jax.P(kv_spec[0], None, None, None)
    local_heads = heads // (mesh.shape[q_spec[1]] if q_spec[1] else 1)
    segments = segment_ids if segment_ids is not None else jnp.ones((batch, length), jnp.int32)
    kernel = _splash_kernel(local_heads, length, block, current_platform() != "tpu", shards)

    def per_device(kernel, q, k, v, q_segments, kv_segments):
        ids = splash.SegmentIds(q=q_segments, kv=kv_segments)
        return jax.vmap(kernel)(q, k, v, segment_ids=ids)

    # The kernel takes (heads, length, head_dim) per example, and queries already scaled.
    q = (q * head_dim**-0.5).astype(q.dtype).transpose(0, 2, 1, 3)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if mesh.empty:
        out = per_device(kernel, q, k, v, segments, segments)
    else:
        # The kernel's mask tables are split like the queries: each chip holds its rows' (the kernel's own spec,
        # which it checks against a mesh of the same axes, none of them manual: inside the train step's shard_map
        # over data groups the current mesh has one, and a sharding over a manual axis has no shard shape).
        whole = jax.sharding.AbstractMesh(mesh.axis_sizes, mesh.axis_names)
        kernel_spec = kernel.manual_sharding_spec(NamedSharding(whole, jax.P(None, q_spec[2])))
        out = jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(kernel_spec, q_spec, kv_spec, kv_spec, jax.P(q_spec[0], q_spec[2]), jax.P(kv_spec[0], None)),
            out_specs=q_spec,
            check_vma=False,
        )(kernel, q, k, v, segments, segments)
    return out.transpose(0, 2, 1, 3)


@dataclasses.dataclass(frozen=True, eq=True)
class _BalancedCausalMask(splash.Mask):
    """The causal mask of a sequence in context parallelism's load-balanced order, queries and keys alike: slot
    i sees slot j when j's token comes no later than i's (`balanced_order`). Its blocks are all full, empty or
    the diagonal's triangle, as a plain causal mask's."""

    length: int
    shards: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.length, self.length)

    def __getitem__(self, index) -> np.ndarray:
        rows, columns = index
        order = balanced_order(self.length, self.shards)
        return order[rows][:, None] >= order[columns][None, :]


@functools.cache
def _splash_kernel(heads: int, length: int, block: int, interpret: bool, shards: int = 1):
    blocks = splash.BlockSizes(
        block_q=block,
        block_kv_compute=block,
        block_kv=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    causal = splash.CausalMask((length, length)) if shards == 1 else _BalancedCausalMask(length, shards)
    mask = splash.MultiHeadMask([causal for _ in range(heads)])
    return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=shards, block_sizes=blocks, interpret=interpret)
