"""The pure training and evaluation steps, jitted once over the mesh with explicit shardings.

    state, metrics = train_step(state, batch)

A batch holds `grad_accum` micro-batches, (grad_accum, micro_batch, seq_len) per field; the step scans
over them and sums their gradients, each micro-batch's loss divided by the token count of the WHOLE batch,
so any split gives the gradient of the big batch. The loss is next-token cross-entropy in float32 over the
tokens of `loss_mask`, optionally plus z-loss (PaLM): z_loss · log²Z, which keeps the softmax normaliser
near 1 so bf16 logits stay well-conditioned.

The state is a registered dataclass of plain pytrees (the parameter dict as `nnx.to_pure_dict` gives it,
optax state, step counter) so it goes straight into `jax.jit` and orbax; the model module is rebuilt
inside the trace by `nnx.merge`. The state is donated: parameters and optimizer moments are updated in
place, never held twice.

With LoRA (`config.lora`), `params` are the adapters alone, the only values with gradients and optimizer
moments; the frozen base weights ride along in `frozen`, read but never differentiated, updated or saved.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.config import LOSS_CHUNK, ModelConfig
from llama_jax.lora import join, split_adapters
from llama_jax.loss import token_nll
from llama_jax.model import abstract_state
from llama_jax.train.batching import FIELDS, batch_sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict  # the trained parameters, a pure dict (nnx.to_pure_dict layout): all, or LoRA's adapters
    opt_state: Any
    frozen: dict = dataclasses.field(default_factory=dict)  # LoRA's base weights: never updated or saved

    def model_params(self) -> dict:
        """Every parameter of the model (the trained ones joined with the frozen ones)."""
        return join(self.frozen, self.params)


def token_losses(
    graphdef: nnx.GraphDef,
    params: dict,
    batch: dict[str, jax.Array],
    loss_chunk: int = LOSS_CHUNK,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood and log-partition log Z, float32, (batch, seq_len), computed
    without holding the batch's full logits (`loss.token_nll`)."""
    model = nnx.merge(graphdef, params)
    return token_nll(
        model, batch["inputs"], batch["targets"], batch["positions"], batch["segments"], loss_chunk, dropout_key
    )


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """The model's graph and the train state's shapes and shardings: built once per run, used by every step
    function, the initialisation and the checkpoint restore."""

    graphdef: nnx.GraphDef
    abstract: TrainState  # jax.ShapeDtypeStruct leaves, with their shardings
    shardings: TrainState  # the NamedShardings alone


def state_layout(config: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh) -> StateLayout:
    """The layout of a train state for `config` on `mesh`. Optimizer moments are sharded like their
    parameters; scalars (counters) are replicated. Nothing touches a device, so `mesh` may hold the
    devices of a TPU topology that this host does not have."""
    graphdef, abstract = abstract_state(config, mesh)
    params = nnx.to_pure_dict(abstract)
    params, frozen = split_adapters(params) if config.lora.enabled else (params, {})
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Shapes without shardings: eval_shape would otherwise look for the shardings' devices on this host.
    opt_abstract = jax.eval_shape(
        optimizer.init, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    )
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, s: s, opt_abstract, param_shardings, transform_non_params=lambda _: replicated
    )
    shardings = TrainState(replicated, param_shardings, opt_shardings, jax.tree.map(lambda a: a.sharding, frozen))
    abstract_train = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        params,
        jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_abstract, opt_shardings),
        frozen,
    )
    return StateLayout(graphdef, abstract_train, shardings)


def make_train_step(
    layout: StateLayout,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    batch_shape: tuple[int, int, int],
    z_loss: float = 0.0,
    schedule: optax.Schedule | None = None,
    loss_chunk: int = LOSS_CHUNK,
    dropout_seed: int | None = None,
):
    """`train_step(state, batch) -> (state, metrics)`, jitted with the state donated. Metrics (float32
    scalars): loss (mean token NLL), z_loss, grad_norm (before clipping), learning_rate, tokens, skipped (1
    when the loss or gradient was not finite and the update was not applied).

    `dropout_seed` (LoRA dropout): each micro-batch's masks come from the seed, the step number and the
    micro-batch's index, so a resumed run draws the masks the uninterrupted one would have."""
    graphdef, shardings = layout.graphdef, layout.shardings

    def loss_of(params, frozen, micro, total_tokens, dropout_key):
        nll, log_z = token_losses(graphdef, join(frozen, params), micro, loss_chunk, dropout_key)
        mask = micro["loss_mask"]
        nll_sum = jnp.sum(nll * mask)
        z_sum = jnp.sum(jnp.square(log_z) * mask)
        return (nll_sum + z_loss * z_sum) / total_tokens, (nll_sum, z_sum)

    grad_fn = jax.grad(loss_of, has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        tokens = jnp.sum(batch["loss_mask"])
        total_tokens = jnp.maximum(tokens, 1.0)

        def accumulate(carry, micro_and_index):
            grads, nll_sum, z_sum = carry
            micro, index = micro_and_index
            dropout_key = None
            if dropout_seed is not None:
                dropout_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(dropout_seed), state.step), index)
            micro_grads, (micro_nll, micro_z) = grad_fn(state.params, state.frozen, micro, total_tokens, dropout_key)
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            return (grads, nll_sum + micro_nll, z_sum + micro_z), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        zeros = jax.lax.with_sharding_constraint(zeros, shardings.params)
        micro_indices = jnp.arange(batch_shape[0])
        (grads, nll_sum, z_sum), _ = jax.lax.scan(
            accumulate, (zeros, jnp.float32(0), jnp.float32(0)), (batch, micro_indices)
        )
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A step whose loss or gradient is not finite changes nothing: the parameters and the optimizer's
        # moments stay as they were, so a saved checkpoint never holds a NaN (the trainer stops soon after).
        finite = jnp.isfinite(nll_sum) & jnp.isfinite(z_sum) & jnp.isfinite(grad_norm)
        params, opt_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), (params, opt_state), (state.params, state.opt_state)
        )
        metrics = {
            "loss": nll_sum / total_tokens,
            "z_loss": z_sum / total_tokens,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step) if schedule is not None else jnp.float32(0.0),
            "tokens": tokens,
            "skipped": (~finite).astype(jnp.float32),
        }
        return TrainState(state.step + 1, params, opt_state, state.frozen), metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_shardings = {name: batch_sharding(mesh, batch_shape) for name in FIELDS}
    return jax.jit(
        train_step, in_shardings=(shardings, batch_shardings), out_shardings=(shardings, replicated), donate_argnums=0
    )


def make_eval_step(layout: StateLayout, mesh: Mesh, batch_shape: tuple[int, int, int], loss_chunk: int = LOSS_CHUNK):
    """`eval_step(state, batch) -> (nll_sum, token_count)` over all micro-batches of the batch."""
    graphdef = layout.graphdef

    def eval_step(state: TrainState, batch):
        params = state.model_params()

        def one(carry, micro):
            nll, _ = token_losses(graphdef, params, micro, loss_chunk)
            return (carry[0] + jnp.sum(nll * micro["loss_mask"]), carry[1] + jnp.sum(micro["loss_mask"])), None

        (nll_sum, count), _ = jax.lax.scan(one, (jnp.float32(0), jnp.float32(0)), batch)
        return nll_sum, count

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_shardings = {name: batch_sharding(mesh, batch_shape) for name in FIELDS}
    return jax.jit(eval_step, in_shardings=(layout.shardings, batch_shardings), out_shardings=replicated)


def init_state(
    params: dict, optimizer: optax.GradientTransformation, shardings: TrainState, frozen: dict | None = None
) -> TrainState:
    """A fresh TrainState around `params` (already placed), the optimizer state created in place."""
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.int32(0), shardings.step)
    return TrainState(step, params, opt_state, frozen or {})
