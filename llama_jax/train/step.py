"""The pure training and evaluation steps, jitted once over the mesh with explicit shardings, and the steps of
a run built from its settings.

    steps = train_steps(config, model_config, mesh)
    state, metrics = steps.train_step(state, batch)

A batch holds `grad_accum` micro-batches, (grad_accum, micro_batch, seq_len) per field; the step scans over
them and sums their gradients, each micro-batch's loss divided by the normaliser of the WHOLE batch (its
tokens, its pairs: the objective's), so any split gives the gradient of the big batch. What the loss is, what
it needs from a reference model and what it reports is the objective's (`objectives.py`): these steps are
the same for every objective. The state (`state.py`) is donated: parameters and optimizer moments are
updated in place, never held twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.config import LOSS_CHUNK, ModelConfig
from llama_jax.context_parallel import context_shards, from_balanced, to_balanced
from llama_jax.lora import join
from llama_jax.loss import token_nll
from llama_jax.sharding import mesh_platform
from llama_jax.train.batching import batch_sharding
from llama_jax.train.config import TrainConfig
from llama_jax.train.objectives import Forward, Objective, objective_for
from llama_jax.train.optimizer import learning_rate, make_optimizer
from llama_jax.train.rollout_rows import grpo_batch_shape, shares_prompt
from llama_jax.train.state import StateLayout, TrainState, state_layout


def token_losses(
    graphdef: nnx.GraphDef,
    params: dict,
    batch: dict[str, jax.Array],
    loss_chunk: int = LOSS_CHUNK,
    dropout_key: jax.Array | None = None,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood and log-partition log Z, float32, (batch, seq_len), computed
    without holding the batch's full logits (`loss.token_nll`), of the logits divided by `temperature`.

    On a mesh with a context axis the model sees the tokens in the load-balanced order of context parallelism
    and the losses come back in the batch's own order: objectives never see the difference."""
    model = nnx.merge(graphdef, params)
    shards = context_shards()
    fields = to_balanced({name: batch[name] for name in ("inputs", "targets", "positions", "segments")}, shards)
    nll, log_z = token_nll(model, *fields.values(), loss_chunk, dropout_key, temperature=temperature)
    return from_balanced(nll, shards), from_balanced(log_z, shards)


@dataclasses.dataclass(frozen=True)
class TrainSteps:
    """A run's jitted steps and what they were built with: the objective, the optimizer, the state's layout
    and the batch's shape (grad_accum, micro_batch, seq_len). Nothing is compiled until a step is called (or
    lowered, `compile.py`)."""

    objective: Objective
    optimizer: optax.GradientTransformation
    layout: StateLayout
    batch_shape: tuple[int, int, int]
    train_step: Callable
    eval_step: Callable


def train_steps(config: TrainConfig, model_config: ModelConfig, mesh: Mesh) -> TrainSteps:
    """The train and eval steps of a run of `config` training `model_config` on `mesh`, which may hold the
    devices of a slice this host does not have (`train.py --compile-for`)."""
    objective = objective_for(config)
    optimizer = make_optimizer(config)
    layout = state_layout(model_config, optimizer, mesh, reference=objective.uses_reference)
    batch_shape = (config.grad_accum, config.micro_batch, config.seq_len)
    if config.objective == "grpo":  # one completion a row, or a prompt and its completions
        batch_shape = grpo_batch_shape(config, shares_prompt(config, model_config, mesh_platform(mesh)))
    dropout_seed = config.seed if model_config.lora.dropout else None
    train_step = make_train_step(
        layout, optimizer, mesh, batch_shape, objective, learning_rate(config), config.loss_chunk, dropout_seed
    )
    eval_step = make_eval_step(layout, mesh, batch_shape, objective, config.loss_chunk)
    return TrainSteps(objective, optimizer, layout, batch_shape, train_step, eval_step)


def make_train_step(
    layout: StateLayout,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    batch_shape: tuple[int, int, int],
    objective: Objective,
    schedule: optax.Schedule | None = None,
    loss_chunk: int = LOSS_CHUNK,
    dropout_seed: int | None = None,
):
    """`train_step(state, batch) -> (state, metrics)`, jitted with the state donated. Metrics (float32
    scalars): the objective's (`train_metrics`: its loss and what else it reports), grad_norm (before
    clipping), learning_rate, tokens (the batch's loss-mask tokens), skipped (1 when the loss or gradient was
    not finite and the update was not applied).

    `dropout_seed` (LoRA dropout): each micro-batch's masks come from the seed, the step number, the
    micro-batch's index and the data-parallel group, so a resumed run draws the masks the uninterrupted one
    would have."""
    shardings = layout.shardings
    forward = _forward(layout.graphdef, loss_chunk)

    def loss_of(params, frozen, micro, normaliser, dropout_key, reference):
        return objective.loss(forward, join(frozen, params), micro, normaliser, dropout_key, reference)

    grad_fn = jax.grad(loss_of, has_aux=True)
    param_specs = jax.tree.map(lambda s: s.spec, shardings.params)

    def accumulated_gradients(state: TrainState, batch: dict[str, jax.Array], normaliser: jax.Array, group=None):
        """The sum of the micro-batches' gradients and loss sums, float32, of the rows of `batch` that data-parallel
        `group` holds (all of them without a data axis: group None)."""

        def accumulate(carry, micro_and_index):
            grads, sums = carry
            micro, index = micro_and_index
            dropout_key = None
            if dropout_seed is not None:
                dropout_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(dropout_seed), state.step), index)
                if group is not None:  # each group's rows their own masks
                    dropout_key = jax.random.fold_in(dropout_key, group)
            reference = objective.reference_inputs(forward, state, micro)
            micro_grads, micro_sums = grad_fn(state.params, state.frozen, micro, normaliser, dropout_key, reference)
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            return (grads, jax.tree.map(jnp.add, sums, micro_sums)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        zeros = jax.lax.with_sharding_constraint(zeros, param_specs)
        micro_indices = jnp.arange(batch_shape[0])
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, _zero_sums(objective.summed)), (batch, micro_indices))
        return grads, sums

    if mesh.shape["data"] > 1:
        accumulated_gradients = _reduced_once_over_data(accumulated_gradients, mesh)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        normaliser = objective.normaliser(batch)
        grads, sums = accumulated_gradients(state, batch, normaliser)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A step whose loss or gradient is not finite changes nothing: the parameters and the optimizer's
        # moments stay as they were, so a saved checkpoint never holds a NaN (the trainer stops soon after).
        finite = objective.finite(sums) & jnp.isfinite(grad_norm)
        params, opt_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), (params, opt_state), (state.params, state.opt_state)
        )
        metrics = objective.train_metrics(sums, normaliser) | {
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step) if schedule is not None else jnp.float32(0.0),
            "tokens": jnp.sum(batch["loss_mask"]),
            "skipped": (~finite).astype(jnp.float32),
        }
        return TrainState(state.step + 1, params, opt_state, state.frozen, state.reference), metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_shardings = _batch_shardings(objective, mesh, batch_shape)
    return jax.jit(
        train_step, in_shardings=(shardings, batch_shardings), out_shardings=(shardings, replicated), donate_argnums=0
    )


def _reduced_once_over_data(accumulated_gradients: Callable, mesh: Mesh) -> Callable:
    """`accumulated_gradients` run by each group of the data axis on its own rows, then the groups' sums added
    once: one all-reduce of the float32 gradient per step, whatever grad_accum is.

    Left to XLA, the gradient of each micro-batch is reduced over every batch axis inside the accumulation loop:
    grad_accum all-reduces per step. Across TPU slices the data axis runs over the data-center network (DCN), the
    slowest link of the job, so the loop keeps each group's sum local (a manual axis of `shard_map`: XLA still
    lays the parameters, activations and the FSDP reduce-scatter out within the group) and reduces it after.
    Every objective's loss is a sum over rows (DPO's over pairs of adjacent rows, which `check_batch_fits_mesh`
    keeps in one group), so the groups' sums are the whole batch's."""

    def per_group(state, batch, normaliser):
        grads, sums = accumulated_gradients(state, batch, normaliser, jax.lax.axis_index("data"))
        return jax.lax.psum((grads, sums), "data")

    rows = PartitionSpec(None, "data")  # (grad_accum, micro_batch, seq_len): the rows split over data
    return jax.shard_map(
        per_group,
        mesh=mesh,
        in_specs=(PartitionSpec(), rows, PartitionSpec()),
        out_specs=PartitionSpec(),
        axis_names={"data"},
        check_vma=False,
    )


def make_eval_step(
    layout: StateLayout,
    mesh: Mesh,
    batch_shape: tuple[int, int, int],
    objective: Objective,
    loss_chunk: int = LOSS_CHUNK,
):
    """`eval_step(state, batch) -> sums` over all micro-batches of the batch: the objective's `eval_sums`
    (the next-token loss's NLL and tokens; DPO's loss and rewards summed over the pairs, and the pairs)."""
    forward = _forward(layout.graphdef, loss_chunk)

    def eval_step(state: TrainState, batch):
        params = state.model_params()

        def one(sums, micro):
            reference = objective.reference_inputs(forward, state, micro)
            return jax.tree.map(jnp.add, sums, objective.eval_sums(forward, params, micro, reference)), None

        sums, _ = jax.lax.scan(one, _zero_sums(objective.eval_summed), batch)
        return sums

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_shardings = _batch_shardings(objective, mesh, batch_shape)
    return jax.jit(eval_step, in_shardings=(layout.shardings, batch_shardings), out_shardings=replicated)


def _forward(graphdef: nnx.GraphDef, loss_chunk: int) -> Forward:
    """What objectives score a micro-batch with, for any parameters: `token_losses` of this model."""

    def forward(params: dict, micro: dict[str, jax.Array], dropout_key: jax.Array | None = None, temperature=1.0):
        return token_losses(graphdef, params, micro, loss_chunk, dropout_key, temperature)

    return forward


def _zero_sums(names: tuple[str, ...]) -> dict[str, jax.Array]:
    return {name: jnp.float32(0) for name in names}


def _batch_shardings(objective: Objective, mesh: Mesh, batch_shape: tuple[int, int, int]) -> dict:
    return {name: batch_sharding(mesh, batch_shape) for name in objective.batch_fields}
