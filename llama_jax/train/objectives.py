"""Training objectives as values: what a step minimises, what it needs from a reference model and what it
reports. The train and eval steps (`step.py`) are the same for every objective and call it:

    objective = objective_for(config)   # NextTokenLoss (lm), PreferenceLoss (dpo) or GrpoLoss (grpo)

    normaliser(batch)              what the batch's loss is a mean over: target tokens, valid pairs (GRPO: by loss_type)
    reference_inputs(forward, state, micro)
                                   what the loss needs from the frozen reference model for a micro-batch
                                   (None, tracing no reference pass, when `uses_reference` is False)
    loss(forward, params, micro, normaliser, dropout_key, reference)
                                   the micro-batch's share of the batch's loss (its sum / the normaliser) and
                                   its sums (`summed`), which the step adds over the micro-batches
    finite(sums)                   whether the step's loss is finite (else its update is skipped)
    train_metrics(sums, normaliser)   the step's reported loss and metrics from the sums
    eval_sums(forward, params, micro, reference)   an evaluation micro-batch's sums (`eval_summed`)
    eval_metrics(sums)             (loss, other metrics) from the sums over all evaluation batches (host floats)

`forward(params, micro, dropout_key=None) -> (nll, log_z)` is the model's per-token negative log-likelihood of
the micro-batch's targets and its log-partition, float32 (rows, seq_len) (`step.token_losses`); an objective
calls it on whichever parameters it scores: the policy's, the reference's. Dividing every micro-batch's sum by
the whole batch's normaliser makes any split into micro-batches give the big batch's gradient.

The batch holds `batch_fields`: the five fields of packed rows (`batching.FIELDS`), and for GRPO, trained on
rollouts, each completion's advantage on its row's positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import DTypeLike

from llama_jax.train.batching import FIELDS
from llama_jax.train.config import TrainConfig
from llama_jax.train.grpo_loss import loss_normaliser, token_losses, token_weights
from llama_jax.train.objective_settings import DpoSettings, GrpoSettings
from llama_jax.train.preference import PAIR_METRICS, pair_losses, response_logprobs, valid_pairs
from llama_jax.train.state import TrainState

Batch = dict[str, jax.Array]  # each field (micro-batches, rows, seq_len), or (rows, seq_len) for a micro-batch
# forward(params, micro, dropout_key=None, temperature=1.0) -> (nll, log_z) of the logits / temperature
Forward = Callable[..., tuple[jax.Array, jax.Array]]


class Objective(Protocol):
    """What the steps call a training objective for (the module's docstring says what each member is)."""

    # Whether the train state holds a reference model (`state.state_layout`): a class constant, or where the
    # settings decide (GRPO's beta), a property; read from the objective, never from its class.
    uses_reference: bool
    batch_fields: ClassVar[Mapping[str, DTypeLike]]  # the batch's fields and their dtypes
    summed: ClassVar[tuple[str, ...]]  # the names of `loss`'s sums
    eval_summed: ClassVar[tuple[str, ...]]  # the names of `eval_sums`'s sums

    def normaliser(self, batch: Batch) -> jax.Array: ...

    def reference_inputs(self, forward: Forward, state: TrainState, micro: Batch) -> Any: ...

    def loss(
        self,
        forward: Forward,
        params: dict,
        micro: Batch,
        normaliser: jax.Array,
        dropout_key: jax.Array | None,
        reference: Any,
    ) -> tuple[jax.Array, dict[str, jax.Array]]: ...

    def finite(self, sums: dict[str, jax.Array]) -> jax.Array: ...

    def train_metrics(self, sums: dict[str, jax.Array], normaliser: jax.Array) -> dict[str, jax.Array]: ...

    def eval_sums(self, forward: Forward, params: dict, micro: Batch, reference: Any) -> dict[str, jax.Array]: ...

    def eval_metrics(self, sums: dict[str, float]) -> tuple[float, dict[str, float]]: ...


def objective_for(config: TrainConfig) -> Objective:
    """The objective `config.objective` names, with its settings."""
    if config.objective == "dpo":
        return PreferenceLoss(config.dpo)
    if config.objective == "grpo":
        return GrpoLoss(config.grpo)
    return NextTokenLoss(config.z_loss)


@dataclasses.dataclass(frozen=True)
class NextTokenLoss:
    """Next-token cross-entropy in float32, a mean over the tokens of `loss_mask` (pretraining, SFT),
    optionally plus z-loss (PaLM): z_loss · log²Z, which keeps the softmax normaliser near 1 so bf16 logits stay
    well-conditioned. Reported: loss (the mean token NLL) and z_loss (the mean log²Z); evaluated: the mean
    token NLL of the validation rows."""

    z_loss: float = 0.0
    uses_reference: ClassVar[bool] = False
    batch_fields: ClassVar[Mapping[str, DTypeLike]] = FIELDS
    summed: ClassVar[tuple[str, ...]] = ("nll", "z_loss")
    eval_summed: ClassVar[tuple[str, ...]] = ("nll", "tokens")

    def normaliser(self, batch: Batch) -> jax.Array:
        return jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

    def reference_inputs(self, forward: Forward, state: TrainState, micro: Batch) -> None:
        return None

    def loss(self, forward, params, micro, normaliser, dropout_key, reference):
        nll, log_z = forward(params, micro, dropout_key)
        mask = micro["loss_mask"]
        nll_sum = jnp.sum(nll * mask)
        z_sum = jnp.sum(jnp.square(log_z) * mask)
        return (nll_sum + self.z_loss * z_sum) / normaliser, {"nll": nll_sum, "z_loss": z_sum}

    def finite(self, sums):
        return jnp.isfinite(sums["nll"]) & jnp.isfinite(sums["z_loss"])

    def train_metrics(self, sums, normaliser):
        return {"loss": sums["nll"] / normaliser, "z_loss": sums["z_loss"] / normaliser}

    def eval_sums(self, forward, params, micro, reference):
        nll, _ = forward(params, micro)
        mask = micro["loss_mask"]
        return {"nll": jnp.sum(nll * mask), "tokens": jnp.sum(mask)}

    def eval_metrics(self, sums):
        return sums["nll"] / max(sums["tokens"], 1.0), {}


@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
    """Direct Preference Optimization (`preference.py`): a mean over the batch's valid pairs of the DPO loss
    against the frozen reference model, init_from. Reported, train and eval alike: loss, rewards_chosen,
    rewards_rejected, reward_accuracy and reward_margin (means over the pairs), and the train step's pairs."""

    settings: DpoSettings
    uses_reference: ClassVar[bool] = True
    batch_fields: ClassVar[Mapping[str, DTypeLike]] = FIELDS
    summed: ClassVar[tuple[str, ...]] = (*PAIR_METRICS, "pairs")
    eval_summed: ClassVar[tuple[str, ...]] = summed

    def normaliser(self, batch: Batch) -> jax.Array:
        response_tokens = jnp.sum(batch["loss_mask"], axis=-1)  # (micro-batches, rows)
        return jnp.maximum(jnp.sum(valid_pairs(response_tokens)), 1.0)

    def reference_inputs(self, forward: Forward, state: TrainState, micro: Batch) -> jax.Array:
        """The reference's response log-probabilities (rows,): no gradient, no dropout."""
        nll, _ = forward(state.reference_params(), micro)
        return jax.lax.stop_gradient(self._logprobs(nll, micro))

    def loss(self, forward, params, micro, normaliser, dropout_key, reference):
        nll, _ = forward(params, micro, dropout_key)
        sums = self._pair_sums(nll, micro, reference)
        return sums["loss"] / normaliser, sums

    def finite(self, sums):
        return jnp.isfinite(sums["loss"])

    def train_metrics(self, sums, normaliser):
        return {name: sums[name] / normaliser for name in PAIR_METRICS} | {"pairs": sums["pairs"]}

    def eval_sums(self, forward, params, micro, reference):
        nll, _ = forward(params, micro)
        return self._pair_sums(nll, micro, reference)

    def eval_metrics(self, sums):
        pairs = max(sums["pairs"], 1.0)
        means = {name: value / pairs for name, value in sums.items() if name != "pairs"}
        return means.pop("loss"), means

    def _logprobs(self, nll: jax.Array, micro: Batch) -> jax.Array:
        return response_logprobs(nll, micro["loss_mask"], mean=self.settings.loss == "ipo")

    def _pair_sums(self, nll: jax.Array, micro: Batch, reference: jax.Array) -> dict[str, jax.Array]:
        per_pair = pair_losses(
            self._logprobs(nll, micro), reference, jnp.sum(micro["loss_mask"], axis=-1), self.settings
        )
        return {name: jnp.sum(value) for name, value in per_pair.items()}


@dataclasses.dataclass(frozen=True)
class GrpoLoss:
    """GRPO (`grpo_loss.py`: TRL GRPOTrainer's loss) on a batch of rollouts (`rollout_rows.py`: a completion after
    its prompt in each row, or a prompt and its completions in one), `loss_mask` 1.0 on the targets that are
    completion tokens, `advantages` each token's completion's advantage (the rollout loop computes them from the
    rewards, `grpo_loss.group_advantages`), `completion_size` and `completion_starts` what the normalisers count.

    One optimisation pass per batch of rollouts (num_iterations=1): the policy that sampled the completions is
    the one trained, so the old log-probabilities are the policy's own, without gradient (the ratio is 1 and
    the clip ratios are 0, as in TRL). With beta > 0 the loss adds the k3 KL to the frozen reference, init_from.

    Whatever the split into micro-batches, the batch's loss is `grpo_loss.reduce_loss` over the whole batch:
    each micro-batch sums its token losses, weighted for "grpo" by 1 / its completion's tokens, and the step
    divides the sums by the whole batch's `normaliser` (completions; completions x max_completion_length;
    completion tokens).
    Reported: loss, kl (with a reference; mean over completion tokens), clip_ratio/low_mean, /high_mean,
    /region_mean and completions/mean_length, under TRL's names (its per-row clip_ratio/low_min and /high_max
    are not sums, so not reported). The eval step is never run for GRPO: its evaluation is the held-out prompts'
    rewards (`rollouts.Rollouts.evaluate`); eval_sums is the next-token loss's so that the steps build alike."""

    settings: GrpoSettings
    batch_fields: ClassVar[Mapping[str, DTypeLike]] = {
        **FIELDS,
        "advantages": np.float32,
        "completion_size": np.float32,  # each completion token's completion's token count ("grpo"'s mean)
        "completion_starts": np.float32,  # 1.0 at one position per completion: the completions counted
    }
    summed: ClassVar[tuple[str, ...]] = ("loss", "kl", "low_clipped", "high_clipped", "clipped", "tokens", "rows")
    eval_summed: ClassVar[tuple[str, ...]] = NextTokenLoss.eval_summed

    @property
    def uses_reference(self) -> bool:
        return self.settings.beta > 0

    def normaliser(self, batch: Batch) -> jax.Array:
        completions = jnp.sum(batch["completion_starts"])  # a row's, or each of a shared prompt's completions
        settings = self.settings
        return loss_normaliser(
            settings.loss_type, completions, jnp.sum(batch["loss_mask"]), settings.max_completion_length
        )

    def reference_inputs(self, forward: Forward, state: TrainState, micro: Batch) -> jax.Array | None:
        """The reference's per-token log-probabilities (rows, seq_len) where beta > 0: no gradient, no dropout."""
        if not self.uses_reference:
            return None
        nll, _ = forward(state.reference_params(), micro, temperature=self.settings.temperature)
        return jax.lax.stop_gradient(-nll)

    def loss(self, forward, params, micro, normaliser, dropout_key, reference):
        # Log-probabilities of the distribution the completions were sampled from, as TRL's (logits / temperature).
        nll, _ = forward(params, micro, dropout_key, temperature=self.settings.temperature)
        logprobs = -nll
        mask = micro["loss_mask"]
        settings = self.settings
        losses = token_losses(
            logprobs,
            jax.lax.stop_gradient(logprobs),  # num_iterations=1: the sampling policy is the policy itself
            reference,
            micro["advantages"],
            mask,
            settings.epsilon,
            settings.epsilon_high,
            settings.beta,
        )
        loss_sum = jnp.sum(losses.loss * token_weights(mask, settings.loss_type, micro["completion_size"]))

        def count(flags):
            return jnp.sum(flags.astype(mask.dtype) * mask)

        sums = {
            "loss": loss_sum,
            "kl": jnp.float32(0) if losses.kl is None else jnp.sum(losses.kl * mask),  # no reference: no KL
            "low_clipped": count(losses.low_clipped),
            "high_clipped": count(losses.high_clipped),
            "clipped": count(losses.low_clipped | losses.high_clipped),
            "tokens": jnp.sum(mask),
            "rows": jnp.sum(micro["completion_starts"]),  # completions
        }
        return loss_sum / normaliser, sums

    def finite(self, sums):
        return jnp.isfinite(sums["loss"])

    def train_metrics(self, sums, normaliser):
        tokens = jnp.maximum(sums["tokens"], 1.0)
        metrics = {
            "loss": sums["loss"] / normaliser,
            "clip_ratio/low_mean": sums["low_clipped"] / tokens,
            "clip_ratio/high_mean": sums["high_clipped"] / tokens,
            "clip_ratio/region_mean": sums["clipped"] / tokens,
            "completions/mean_length": sums["tokens"] / jnp.maximum(sums["rows"], 1.0),
        }
        if self.uses_reference:
            metrics["kl"] = sums["kl"] / tokens
        return metrics

    def eval_sums(self, forward, params, micro, reference):
        return NextTokenLoss().eval_sums(forward, params, micro, reference)

    def eval_metrics(self, sums):
        return NextTokenLoss().eval_metrics(sums)
