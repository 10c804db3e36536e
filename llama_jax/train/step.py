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

DPO (`objective=dpo`, `preference.py`) scores each micro-batch's pairs under the policy and under the frozen
reference, init_from: with LoRA the same frozen base with the adapters off (their B matrices zero: no second
copy of the weights), without it a copy of init_from's parameters in `reference`, sharded like the policy and,
like `frozen`, never saved (a resumed run reads it from init_from again). The copy costs 4 bytes a parameter,
a quarter of what AdamW's state already holds; reference log-probabilities computed once before training would
save it but tie a stored array to the corpus, the tokenizer and seq_len, and cost an extra pass first.
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
from llama_jax.train.config import DpoSettings
from llama_jax.train.preference import PAIR_METRICS, pair_losses, response_logprobs


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict  # the trained parameters, a pure dict (nnx.to_pure_dict layout): all, or LoRA's adapters
    opt_state: Any
    frozen: dict = dataclasses.field(default_factory=dict)  # LoRA's base weights: never updated or saved
    reference: dict = dataclasses.field(default_factory=dict)  # DPO without LoRA: init_from's, never saved

    def model_params(self) -> dict:
        """Every parameter of the model (the trained ones joined with the frozen ones)."""
        return join(self.frozen, self.params)

    def reference_params(self) -> dict:
        """DPO's reference model: init_from's parameters, or with LoRA the frozen base with the adapters off."""
        if self.reference:
            return self.reference
        return join(self.frozen, jax.tree.map(jnp.zeros_like, self.params))


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


def state_layout(
    config: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh, reference: bool = False
) -> StateLayout:
    """The layout of a train state for `config` on `mesh`. Optimizer moments are sharded like their
    parameters; scalars (counters) are replicated. `reference`: a DPO reference copy of the parameters
    (full fine-tuning; with LoRA the frozen base serves). Nothing touches a device, so `mesh` may hold the
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
    reference_params = params if reference and not config.lora.enabled else {}
    shardings = TrainState(
        replicated,
        param_shardings,
        opt_shardings,
        jax.tree.map(lambda a: a.sharding, frozen),
        jax.tree.map(lambda a: a.sharding, reference_params),
    )
    abstract_train = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        params,
        jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_abstract, opt_shardings),
        frozen,
        reference_params,
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
    dpo: DpoSettings | None = None,
):
    """`train_step(state, batch) -> (state, metrics)`, jitted with the state donated. Metrics (float32
    scalars): loss (mean token NLL), z_loss, grad_norm (before clipping), learning_rate, tokens, skipped (1
    when the loss or gradient was not finite and the update was not applied). With `dpo`: loss is the mean
    DPO loss of the batch's pairs, beside the mean rewards_chosen, rewards_rejected, reward_accuracy and
    reward_margin and the pairs counted (`preference.py`).

    `dropout_seed` (LoRA dropout): each micro-batch's masks come from the seed, the step number and the
    micro-batch's index, so a resumed run draws the masks the uninterrupted one would have."""
    graphdef, shardings = layout.graphdef, layout.shardings

    def loss_of(params, frozen, micro, total_tokens, dropout_key):
        nll, log_z = token_losses(graphdef, join(frozen, params), micro, loss_chunk, dropout_key)
        mask = micro["loss_mask"]
        nll_sum = jnp.sum(nll * mask)
        z_sum = jnp.sum(jnp.square(log_z) * mask)
        return (nll_sum + z_loss * z_sum) / total_tokens, (nll_sum, z_sum)

    def dpo_loss_of(params, frozen, micro, total_pairs, dropout_key, reference_logprobs):
        nll, _ = token_losses(graphdef, join(frozen, params), micro, loss_chunk, dropout_key)
        mask = micro["loss_mask"]
        policy = response_logprobs(nll, mask, mean=dpo.loss == "ipo")
        per_pair = pair_losses(policy, reference_logprobs, jnp.sum(mask, axis=-1), dpo)
        sums = {name: jnp.sum(value) for name, value in per_pair.items()}
        return sums["loss"] / total_pairs, sums

    grad_fn = jax.grad(loss_of if dpo is None else dpo_loss_of, has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        tokens = jnp.sum(batch["loss_mask"])
        if dpo is None:
            total = jnp.maximum(tokens, 1.0)  # the loss is a mean over the batch's tokens
            sums0 = (jnp.float32(0), jnp.float32(0))
        else:
            counted = jnp.sum(batch["loss_mask"], axis=-1)  # (grad_accum, rows): response tokens per row
            total = jnp.maximum(jnp.sum((counted[:, 0::2] > 0) & (counted[:, 1::2] > 0)), 1.0)  # over its pairs
            sums0 = {name: jnp.float32(0) for name in (*PAIR_METRICS, "pairs")}

        def accumulate(carry, micro_and_index):
            grads, sums = carry
            micro, index = micro_and_index
            dropout_key = None
            if dropout_seed is not None:
                dropout_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(dropout_seed), state.step), index)
            extra = ()
            if dpo is not None:  # the reference's log-probabilities: no gradient, no dropout
                reference_nll, _ = token_losses(graphdef, state.reference_params(), micro, loss_chunk)
                mask = micro["loss_mask"]
                extra = (jax.lax.stop_gradient(response_logprobs(reference_nll, mask, mean=dpo.loss == "ipo")),)
            micro_grads, micro_sums = grad_fn(state.params, state.frozen, micro, total, dropout_key, *extra)
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            return (grads, jax.tree.map(jnp.add, sums, micro_sums)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        zeros = jax.lax.with_sharding_constraint(zeros, shardings.params)
        micro_indices = jnp.arange(batch_shape[0])
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, sums0), (batch, micro_indices))
        nll_sum, z_sum = sums if dpo is None else (sums["loss"], jnp.float32(0))
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
            "loss": nll_sum / total,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step) if schedule is not None else jnp.float32(0.0),
            "tokens": tokens,
            "skipped": (~finite).astype(jnp.float32),
        }
        if dpo is None:
            metrics["z_loss"] = z_sum / total
        else:
            metrics |= {name: sums[name] / total for name in PAIR_METRICS if name != "loss"}
            metrics["pairs"] = sums["pairs"]
        return TrainState(state.step + 1, params, opt_state, state.frozen, state.reference), metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_shardings = {name: batch_sharding(mesh, batch_shape) for name in FIELDS}
    return jax.jit(
        train_step, in_shardings=(shardings, batch_shardings), out_shardings=(shardings, replicated), donate_argnums=0
    )


def make_eval_step(
    layout: StateLayout,
    mesh: Mesh,
    batch_shape: tuple[int, int, int],
    loss_chunk: int = LOSS_CHUNK,
    dpo: DpoSettings | None = None,
):
    """`eval_step(state, batch) -> sums` over all micro-batches of the batch: {"nll", "tokens"}; with `dpo`
    the DPO loss and rewards summed over the batch's pairs, and "pairs"."""
    graphdef = layout.graphdef

    def eval_step(state: TrainState, batch):
        params = state.model_params()
        reference = state.reference_params() if dpo is not None else None

        def one(sums, micro):
            nll, _ = token_losses(graphdef, params, micro, loss_chunk)
            mask = micro["loss_mask"]
            if dpo is None:
                return jax.tree.map(jnp.add, sums, {"nll": jnp.sum(nll * mask), "tokens": jnp.sum(mask)}), None
            reference_nll, _ = token_losses(graphdef, reference, micro, loss_chunk)
            mean = dpo.loss == "ipo"
            policy, reference_logprobs = (response_logprobs(n, mask, mean) for n in (nll, reference_nll))
            per_pair = pair_losses(policy, reference_logprobs, jnp.sum(mask, axis=-1), dpo)
            return jax.tree.map(lambda a, b: a + jnp.sum(b), sums, per_pair), None

        names = ("nll", "tokens") if dpo is None else (*PAIR_METRICS, "pairs")
        sums, _ = jax.lax.scan(one, {name: jnp.float32(0) for name in names}, batch)
        return sums

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_shardings = {name: batch_sharding(mesh, batch_shape) for name in FIELDS}
    return jax.jit(eval_step, in_shardings=(layout.shardings, batch_shardings), out_shardings=replicated)


def init_state(
    params: dict,
    optimizer: optax.GradientTransformation,
    shardings: TrainState,
    frozen: dict | None = None,
    reference: dict | None = None,
) -> TrainState:
    """A fresh TrainState around `params` (already placed), the optimizer state created in place."""
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.int32(0), shardings.step)
    return TrainState(step, params, opt_state, frozen or {}, reference or {})
