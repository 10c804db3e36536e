"""The LLaMA network in Flax NNX: embed → scan(DecoderLayer × L) → RMSNorm → logits.

Every parameter names its axes logically (`out_sharding`), every block boundary constrains its
activations with `shard`, and `sharding.LOGICAL_AXIS_RULES` alone decides what lands on which device.

    logits, cache = model(ids, positions, cache=None, segment_ids=None)

`ids` and `positions` are (batch, length). Without a cache the call is causal self-attention over
`ids` (training, scoring); `segment_ids` keeps packed documents from attending to each other. With a
`KVCache` (paged: `kv_cache.py`) the new keys and values are written at each row's `cache.lengths` in its
pages and the queries attend to everything cached so far (prefill, then decoding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.attention import LiveCache, attend_live_cache, attention, choose_implementation
from llama_jax.config import REMAT_POLICIES, ModelConfig
from llama_jax.kv_cache import KVCache, write
from llama_jax.lora import add_adapters, project, split_adapters
from llama_jax.quantize import SCALE_SUFFIX, quantize_weight
from llama_jax.quantize import WEIGHTS as QUANTIZED_WEIGHTS
from llama_jax.rope import apply_rope, inverse_frequencies
from llama_jax.sharding import in_manual_region, logical_to_spec, make_mesh, param_shardings, shard

_INIT_STD = 0.02  # GPT-2 / LLaMA-style initialisation for every matrix


def _quantize_in_place(module: nnx.Module, module_name: str) -> None:
    """Replace the module's projection weights by int8 values and a float32 per-output-channel scale
    (quantize.py), each keeping the weight's logical axes."""
    for weight, (owner, n_in) in QUANTIZED_WEIGHTS.items():
        if owner != module_name:
            continue
        param = getattr(module, weight)
        names = param.get_metadata()["out_sharding"]
        q, scale = quantize_weight(param[...], tuple(range(n_in)))
        setattr(module, weight, nnx.Param(q, out_sharding=names, eager_sharding=False))
        setattr(module, weight + SCALE_SUFFIX, nnx.Param(scale, out_sharding=names[n_in:], eager_sharding=False))


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], dtype) -> nnx.Param:
    value = _INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
    # Placement is decided once for the whole state from the logical names (`sharding.param_shardings`), so
    # Flax must not try to place each variable as it is created.
    return nnx.Param(value.astype(dtype), out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("embed",), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("norm"):
            x32 = x.astype(jnp.float32)
            normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
            return normed.astype(x.dtype) * self.scale[...].astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c, dt = config, config.param_dtype
        self.config = config
        self.lora = c.lora
        self.wq = _param(rngs, (c.dim, c.n_heads, c.head_dim), ("embed", "q_heads", "head_dim"), dt)
        self.wk = _param(rngs, (c.dim, c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), dt)
        self.wv = _param(rngs, (c.dim, c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), dt)
        self.wo = _param(rngs, (c.n_heads, c.head_dim, c.dim), ("q_heads", "head_dim", "embed"), dt)
        if c.lora.enabled:
            add_adapters(self, c.lora, "attention", rngs)
        if c.quantize == "int8":
            _quantize_in_place(self, "attention")

    def __call__(
        self, x, positions, segment_ids, implementation, live=None, layer_cache=None, dropout_key=None, adapter_ids=None
    ):
        """Without a cache: causal self-attention within `segment_ids` by `implementation`; returns the output
        and this layer's new (k, v). With `layer_cache` (the stacked pool, its int8 scales or None, and this
        layer's index): the new keys and values are written at each row's next positions in its pages and
        `live` reads the cache; returns the output and the updated layer_cache."""
        c = self.config
        inv_freq = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
        q = project(self, "wq", "btd,dhk->bthk", x, self.lora, dropout_key, adapter_ids)
        k = project(self, "wk", "btd,dhk->bthk", x, self.lora, dropout_key, adapter_ids)
        v = project(self, "wv", "btd,dhk->bthk", x, self.lora, dropout_key, adapter_ids)
        q = shard(apply_rope(q, positions, inv_freq), "batch", "length", "q_heads", None)
        k = shard(apply_rope(k, positions, inv_freq), "batch", "length", "kv_heads", None)
        v = shard(v, "batch", "length", "kv_heads", None)
        if layer_cache is None:
            out, layer_cache = attention(q, k, v, implementation, segment_ids=segment_ids), (k, v)
        else:
            # The layer writes its new keys/values straight into the stacked cache (in place) and reads
            # its own layer back, block by block and only the live part: copying the layer out and back in
            # would move the whole cache per step.
            kv_all, scales, layer = layer_cache
            kv_all, scales = write(kv_all, scales, k, v, layer, live.page_table, live.q_index[:, 0])
            layer_cache = (kv_all, scales, layer)
            out = attend_live_cache(q, kv_all, scales, layer, live)
        out = project(self, "wo", "bthk,hkd->btd", out, self.lora, dropout_key, adapter_ids)
        return shard(out, "batch", "length", None), layer_cache


class MLP(nnx.Module):
    """SwiGLU: w_down(silu(w_gate·x) * w_up·x) — Meta's w2(silu(w1·x) * w3·x)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c, dt = config, config.param_dtype
        self.w_gate = _param(rngs, (c.dim, c.ffn_dim), ("embed", "mlp"), dt)
        self.w_up = _param(rngs, (c.dim, c.ffn_dim), ("embed", "mlp"), dt)
        self.w_down = _param(rngs, (c.ffn_dim, c.dim), ("mlp", "embed"), dt)
        self.lora = c.lora
        if c.lora.enabled:
            add_adapters(self, c.lora, "mlp", rngs)
        if c.quantize == "int8":
            _quantize_in_place(self, "mlp")

    def __call__(self, x, dropout_key=None, adapter_ids=None):
        gate = project(self, "w_gate", "btd,df->btf", x, self.lora, dropout_key, adapter_ids)
        up = project(self, "w_up", "btd,df->btf", x, self.lora, dropout_key, adapter_ids)
        hidden = shard(jax.nn.silu(gate) * up, "batch", "length", "mlp")
        down = project(self, "w_down", "btf,fd->btd", hidden, self.lora, dropout_key, adapter_ids)
        return shard(down, "batch", "length", None)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, config.param_dtype)
        self.attention = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps, config.param_dtype)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(
        self, x, positions, segment_ids, implementation, live=None, layer_cache=None, dropout_key=None, adapter_ids=None
    ):
        with jax.named_scope("attention"):
            normed = self.attention_norm(x)
            h, layer_cache = self.attention(
                normed, positions, segment_ids, implementation, live, layer_cache, dropout_key, adapter_ids
            )
        x = x + h
        with jax.named_scope("mlp"):
            x = x + self.mlp(self.mlp_norm(x), dropout_key, adapter_ids)
        return x, layer_cache


class Llama(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        self.embed = _param(rngs, (c.vocab_size, c.dim), ("vocab", "embed"), c.param_dtype)

        # One DecoderLayer whose parameters all carry a leading `layers` axis, ready for the scan.
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(key):
            return DecoderLayer(c, rngs=nnx.Rngs(params=key))

        self.layers = make_layers(jax.random.split(rngs.params(), c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps, c.param_dtype)
        if not c.tie_embeddings:
            self.lm_head = _param(rngs, (c.dim, c.vocab_size), ("embed", "vocab"), c.param_dtype)

    def __call__(
        self,
        ids: jax.Array,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        segment_ids: jax.Array | None = None,
        logits_at: jax.Array | None = None,
        cache_block: int | None = None,
        adapter_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits of `ids` (batch, length). Without a cache: causal self-attention (training, scoring),
        within `segment_ids` if given. With a `KVCache`: the tokens come after what each row holds, are
        written into its pages, and attend to everything cached so far, read `cache_block` positions at a time
        and only as far as the furthest query (`attention.attend_live_cache`; default: up to 128 dividing a
        row's positions). `logits_at` (batch, n) picks the positions of each row that get logits. `adapter_ids`
        (batch,) int32: the adapter bank's entry of each row (0: the base; `adapters.attach_bank`)."""
        x, cache = self.hidden_states(ids, positions, cache, segment_ids, cache_block, adapter_ids=adapter_ids)
        return self.logits(_take_positions(x, logits_at)), cache

    def prefill(
        self,
        ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        logits_at: jax.Array | None = None,
        adapter_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Prompts through the stack as a forward pass without a cache computes them — causal self-attention
        within `segment_ids`, by the flash kernel of the platform (splash, cuDNN, or the blockwise XLA path;
        no gradient flows) — returning the logits at `logits_at` (batch, n) and every layer's keys and
        values, (layers, batch, length, kv_heads, head_dim) each, for a KV cache. `adapter_ids`: as `__call__`'s."""
        implementation = choose_implementation(self.config.attention, self.config.dtype, differentiable=False)
        x, kv = self._forward(ids, positions, None, segment_ids, None, None, implementation, True, adapter_ids)
        return self.logits(_take_positions(x, logits_at)), kv

    def hidden_states(
        self,
        ids: jax.Array,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        segment_ids: jax.Array | None = None,
        cache_block: int | None = None,
        dropout_key: jax.Array | None = None,
        differentiable: bool = True,
        adapter_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """The decoder stack's output (batch, length, dim), before the final norm; `logits` finishes it.
        Training computes the logits from it a chunk at a time (`loss.token_nll`) and passes `dropout_key`
        when LoRA dropout is on (each layer draws its masks from its own fold of the key). Scoring without
        gradients passes differentiable=False: the platform's flash attention (blockwise XLA on CPU)."""
        implementation = choose_implementation(self.config.attention, self.config.dtype, differentiable=differentiable)
        return self._forward(
            ids, positions, cache, segment_ids, cache_block, dropout_key, implementation, False, adapter_ids
        )

    def _forward(
        self, ids, positions, cache, segment_ids, cache_block, dropout_key, implementation, keep_kv, adapter_ids
    ):
        c = self.config
        batch, length = ids.shape
        starts = cache.lengths if cache is not None else jnp.zeros((batch,), jnp.int32)
        if positions is None:
            positions = starts[:, None] + jnp.arange(length, dtype=jnp.int32)
        with jax.named_scope("embed"):
            x = shard(_look_up(self.embed[...], ids, c.dtype), "batch", "length", None)
        live = None
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids are for packed training batches; they cannot be used with a KV cache")
            block = cache_block or next(b for b in (128, 64, 32, 16, 8, 4, 2, 1) if cache.max_len % b == 0)
            live = LiveCache(starts[:, None] + jnp.arange(length, dtype=jnp.int32), cache.page_table, block)
        return self._run_layers(
            x, positions, segment_ids, implementation, live, cache, dropout_key, keep_kv, adapter_ids
        )

    def logits(self, x: jax.Array) -> jax.Array:
        """Float32 logits (batch, n, vocab) of hidden states (batch, n, dim): final norm, output projection."""
        x = self.norm(x)
        with jax.named_scope("lm_head"):
            if self.config.tie_embeddings:
                logits = jnp.einsum(
                    "btd,vd->btv", x, self.embed[...].astype(x.dtype), preferred_element_type=jnp.float32
                )
            else:
                logits = jnp.einsum(
                    "btd,dv->btv", x, self.lm_head[...].astype(x.dtype), preferred_element_type=jnp.float32
                )
            return shard(logits, "batch", "length", "vocab")

    def _run_layers(self, x, positions, segment_ids, implementation, live, cache, dropout_key, keep_kv, adapter_ids):
        """The scanned stack. With a cache it is the scan's carry (written in place); with `keep_kv` every
        layer's new keys and values are the scan's outputs."""
        graphdef, stacked = nnx.split(self.layers)

        def layer(x, layer_params, layer_cache, layer_key):
            return nnx.merge(graphdef, layer_params)(
                x, positions, segment_ids, implementation, live, layer_cache, layer_key, adapter_ids
            )

        policy = REMAT_POLICIES[self.config.remat]
        if policy is not None:
            layer = jax.checkpoint(
                layer, policy=getattr(jax.checkpoint_policies, policy), prevent_cse=not self.config.scan_layers
            )

        def step(carry, xs):
            x, kv_all, scales = carry
            layer_params, i = xs
            layer_cache = None if kv_all is None else (kv_all, scales, i)
            layer_key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            x, layer_cache = layer(x, layer_params, layer_cache, layer_key)
            if kv_all is not None:
                kv_all, scales, _ = layer_cache
            return (x, kv_all, scales), layer_cache if keep_kv else None

        carry = (x, None, None) if cache is None else (x, cache.kv, cache.scales)
        indices = jnp.arange(self.config.n_layers)
        if self.config.scan_layers:
            carry, kv = jax.lax.scan(step, carry, (stacked, indices))
        else:  # a plain Python loop: easier to debug and profile layer by layer, slower to compile
            outputs = []
            for i in range(self.config.n_layers):
                carry, out = step(carry, (jax.tree.map(lambda a, i=i: a[i], stacked), i))
                outputs.append(out)
            kv = jax.tree.map(lambda *layers: jnp.stack(layers), *outputs) if keep_kv else None
        x, kv_all, scales = carry
        if keep_kv:
            return x, kv
        if cache is None:
            return x, None
        return x, KVCache(kv_all, cache.page_table, cache.lengths + x.shape[1], scales)


def _look_up(table: jax.Array, ids: jax.Array, dtype) -> jax.Array:
    """The rows of the embedding table (vocab, dim) for `ids`, in `dtype`, laid out as the activations are.

    Outside a `shard_map` XLA partitions the gather itself (it weighs gathering the table against moving the looked-up
    rows by their sizes). Inside the train step's `shard_map` over data groups the TPU compiler of jax 0.10 aborts on
    that gather, so there it is written out: each chip gathers the columns of its vocabulary shard from the chips
    that share it (FSDP splits the table's columns, as every weight's: one all-gather per micro-batch, as each
    layer's weights get) and looks up its own tokens; with the vocabulary split over tensor, ids outside a chip's
    range give zeros and the shards' rows are summed."""
    mesh = jax.sharding.get_abstract_mesh()
    if not in_manual_region():
        return jnp.take(table, ids, axis=0).astype(dtype)
    vocab_axes, column_axes = logical_to_spec(("vocab", "embed"), table.shape, mesh)
    token_spec = logical_to_spec(("batch", "length"), ids.shape, mesh)

    def local(shard_rows, ids):
        shard_rows = shard_rows.astype(dtype)
        if column_axes is not None:
            shard_rows = jax.lax.all_gather(shard_rows, column_axes, axis=1, tiled=True)
        if vocab_axes is None:
            return jnp.take(shard_rows, ids, axis=0)
        first = jax.lax.axis_index(vocab_axes) * shard_rows.shape[0]
        inside = (ids >= first) & (ids < first + shard_rows.shape[0])
        rows = jnp.take(shard_rows, jnp.where(inside, ids - first, 0), axis=0)
        return jax.lax.psum(jnp.where(inside[..., None], rows, 0), vocab_axes)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(jax.P(vocab_axes, column_axes), token_spec),
        out_specs=jax.P(*token_spec, None),
        # Where the rows do not split over the FSDP axes the result is the same on all of them, which the
        # type check cannot see through the all-gather.
        check_vma=False,
    )(table, ids)


def _take_positions(x: jax.Array, at: jax.Array | None) -> jax.Array:
    """x (batch, length, dim) at positions `at` (batch, n) of each row; all of x when None."""
    return x if at is None else jnp.take_along_axis(x, at[:, :, None], axis=1)


def abstract_state(config: ModelConfig, mesh=None) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and its parameters as ShapeDtypeStructs (placed on `mesh` when given);
    nothing is allocated, so this works for a 405B config on a laptop."""
    graphdef = None

    def init():
        nonlocal graphdef
        graphdef, state = nnx.split(Llama(config, rngs=nnx.Rngs(0)))
        return state

    # jax.eval_shape rather than nnx.eval_shape: the latter resolves the logical names against whatever
    # mesh is active, which fails for names that are not mesh axes; placement is `param_shardings`' job.
    state = jax.eval_shape(init)
    if mesh is not None:
        shardings = param_shardings(state, mesh)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    return graphdef, state


def create_model(config: ModelConfig, mesh=None, seed: int = 0) -> Llama:
    """A randomly initialised model whose parameters are created directly in their sharded layout, so no
    device ever holds the whole model."""
    graphdef, init = _sharded_init(config, mesh or make_mesh())
    return nnx.merge(graphdef, init(jax.random.key(seed)))


@functools.lru_cache(maxsize=16)
def _sharded_init(config: ModelConfig, mesh):
    """Compiled once per (config, mesh): the seed is an argument, so new seeds do not recompile."""
    graphdef, abstract = abstract_state(config)

    def init(key):
        return nnx.split(Llama(config, rngs=nnx.Rngs(params=key)))[1]

    return graphdef, jax.jit(init, out_shardings=param_shardings(abstract, mesh))


def init_adapters(config: ModelConfig, mesh, seed: int = 0) -> dict:
    """Fresh LoRA adapters of `config` (A random, B zero) as a pure dict, created in their sharded layout. The
    same init's base weights are never computed: the jitted function does not return them."""
    _, abstract = abstract_state(config)
    shardings = split_adapters(nnx.to_pure_dict(param_shardings(abstract, mesh)))[0]

    def init(key):
        return split_adapters(nnx.to_pure_dict(nnx.split(Llama(config, rngs=nnx.Rngs(params=key)))[1]))[0]

    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
