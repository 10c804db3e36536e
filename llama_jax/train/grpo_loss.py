"""GRPO's loss (Shao et al. 2024) and its variants Dr. GRPO (Liu et al. 2025) and DAPO (Yu et al. 2025), as TRL's
GRPOTrainer computes them: the pure math, with no model, sampling or reward function in it.

A batch holds `prompts * G` completions laid out group by group (the G completions of prompt 0 first, then
prompt 1's, ...), each a row of `T` completion-token log-probabilities with its mask (1.0 on completion tokens,
0 on padding). From the rows' rewards r, with μ and σ a group's mean and (ddof=1) std:

    advantage A = (r - μ) / (σ + 1e-4)                 scale_rewards="group" (GRPO)
                  (r - μ) / (σ_batch + 1e-4)           scale_rewards="batch" (σ over the whole batch)
                  r - μ                                scale_rewards="none"  (Dr. GRPO)
    ratio ρ = exp(logp - logp_old), per token; clip(ρ) = clip(ρ, 1 - ε, 1 + ε_high)
    per-token loss = -min(ρ·A, clip(ρ)·A) + β·KL,      KL = exp(ref - logp) - (ref - logp) - 1   (k3)

and the per-token losses reduced by loss_type ("grpo": mean over each row's completion tokens, then over the
rows; "dr_grpo": sum / (rows * max_completion_length); "dapo": sum / the batch's completion tokens).

With one optimisation pass per generated batch (TRL's num_iterations=1) the old policy is the policy itself:
pass `jax.lax.stop_gradient(logprobs)` as `old_logprobs`. Then ρ = 1 and the gradient is the plain policy
gradient -A · ∇logp over the normaliser; with more passes, pass the log-probabilities recorded at generation.

Usage:

    advantages, frac_reward_zero_std = group_advantages(rewards, num_generations=8)

    def loss_fn(params):
        logprobs = completion_logprobs(params, batch)  # (rows, T), the caller's model
        losses = token_losses(logprobs, jax.lax.stop_gradient(logprobs), ref_logprobs, advantages, mask,
                              epsilon=0.2, epsilon_high=0.28, beta=0.04)
        return reduce_loss(losses.loss, mask, "dapo", max_completion_length=256), losses

    (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    metrics = loss_metrics(losses, mask)  # kl, clip_ratio/..., completions/mean_length

These are the formulas of TRL 1.16.0 (trl/trainer/grpo_trainer.py: `_generate_and_score_completions` for the
advantages, `_compute_loss` for the loss and its metrics), with one process, one reward function, token-level
importance sampling and none of its optional extras (GSPO's sequence-level ratio, `delta` two-sided clipping,
vLLM importance-sampling correction, entropy masking or bonus, the cispo/sapo/vespo/luspo/bnpo losses).
tests/test_grpo_loss.py checks them against TRL's written again in PyTorch. Where TRL versions differ
(read: 0.14.0, 0.17.0, 0.20.0, 0.24.0, 1.16.0):

- the std is ddof=1 (Bessel) and 1e-4 is added to it before dividing in all of them (torch's `.std()` up to
  0.24, TRL's `nanstd` in 1.16, which also skips NaN rewards: an unscorable completion's advantage is 0);
- scale_rewards: 0.14 always divides by the group std; 0.17-0.20 take a bool (True: group, False: none);
  0.24 and 1.16 take "group" / "batch" / "none";
- "grpo" divides each row by its token count, clamped at 1 from 0.17 on (0.14 has no clamp: an empty row is
  NaN). 0.24 and 1.16 also divide "grpo" and "dr_grpo" by the gradient-accumulation steps, which is the
  caller's averaging of micro-batches, not part of this module;
- "dapo" exists from 0.24 on (0.17-0.20 have "bnpo", sum / the micro-batch's token count, their default) and
  divides by `num_items_in_batch`, the completion tokens of the whole generation batch over all processes
  (clamped at 1 in 1.16): pass `total_completion_tokens` to `reduce_loss` when a generation batch is split
  into micro-batches; its default, this batch's own count, is TRL's when it is not;
- 0.14 has no clipping and no old log-probabilities (ρ = exp(logp - logp.detach())), the same loss as
  num_iterations=1 here; epsilon_high and the low / high / region clip ratios are there from 0.17 on;
- frac_reward_zero_std (in 0.20 on, not in 0.17) is the share of groups whose std is 0 (torch.isclose, atol 1e-8); with
  scale_rewards="batch", 0.24 and 1.16 test the batch std instead (so 0 or 1): here it is always the groups'.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["grpo", "dr_grpo", "dapo"]
SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")

# Added to the reward std before dividing (TRL's constant), so a group of equal rewards gets advantage 0, not 0/0.
STD_EPSILON = 1e-4
# torch.isclose(std, 0)'s tolerance, TRL's test for a group whose rewards all equal: a mean of equal floats can
# round, leaving a std of ~1e-9 rather than 0.
ZERO_STD_ATOL = 1e-8


class GroupAdvantages(NamedTuple):
    advantages: jax.Array  # (prompts * G,), one per completion
    frac_reward_zero_std: jax.Array  # () share of groups whose rewards all equal: they teach nothing


def group_advantages(
    rewards: jax.Array, num_generations: int, scale_rewards: ScaleRewards = "group"
) -> GroupAdvantages:
    """Each completion's advantage over its group's mean reward, scaled per `scale_rewards` (module docstring).
    `rewards` (prompts * G,) laid out group by group; a NaN reward (an unscorable completion) is left out of
    its group's mean and std and gets advantage 0, as in TRL."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, not {scale_rewards!r}")
    if rewards.ndim != 1 or num_generations < 1 or rewards.shape[0] % num_generations:
        raise ValueError(f"rewards {rewards.shape} must be one row of groups of num_generations={num_generations}")
    grouped = rewards.reshape(-1, num_generations)
    group_mean = jnp.nanmean(grouped, axis=1, keepdims=True)
    # A ddof=1 std of one value is 0/0: TRL takes a group of one (or a batch of one) as std 0.
    if num_generations > 1:
        group_std = jnp.nanstd(grouped, axis=1, ddof=1, keepdims=True)
    else:
        group_std = jnp.zeros_like(group_mean)
    advantages = grouped - group_mean
    if scale_rewards == "group":
        advantages = advantages / (group_std + STD_EPSILON)
    elif scale_rewards == "batch":
        batch_std = jnp.nanstd(rewards, ddof=1) if rewards.shape[0] > 1 else jnp.zeros((), rewards.dtype)
        advantages = advantages / (batch_std + STD_EPSILON)
    # A NaN std (a group with under two scored rewards) compares False, as torch.isclose does.
    zero_std = jnp.abs(group_std[:, 0]) <= ZERO_STD_ATOL
    return GroupAdvantages(
        advantages=jnp.nan_to_num(advantages.reshape(-1), nan=0.0),
        frac_reward_zero_std=jnp.mean(zero_std.astype(rewards.dtype)),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenLosses:
    """Per-token values (rows, T), each 0 (False) on padding."""

    loss: jax.Array  # -min(ρ·A, clip(ρ)·A) + β·KL
    kl: jax.Array | None  # k3 estimate of KL(policy ‖ reference); None without reference log-probabilities
    low_clipped: jax.Array  # bool: ρ < 1 - ε where A < 0 (the clip took the gradient away)
    high_clipped: jax.Array  # bool: ρ > 1 + ε_high where A > 0


def token_losses(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    ref_logprobs: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
) -> TokenLosses:
    """TRL's per-token GRPO loss, its KL and where the ratio was clipped, from the completion tokens'
    log-probabilities (rows, T) under the policy being trained (`logprobs`, the one to differentiate), the
    policy that generated them (`old_logprobs`: `jax.lax.stop_gradient(logprobs)` with one optimisation pass
    per generated batch) and the frozen reference (`ref_logprobs`, needed when `beta` != 0).

    `advantages` is (rows,) (one per completion, broadcast over its tokens) or (rows, T). `epsilon_high`
    defaults to `epsilon`, as in TRL; DAPO's "clip-higher" sets it above (0.28 for 0.2). `beta` is a Python
    number: with 0 the KL term is left out of the loss (it is still returned where a reference is given)."""
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError("beta != 0 needs ref_logprobs, the reference model's log-probabilities")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    counted = mask > 0
    # Padding may hold anything (-inf from a masked logit, say). Zeroing it before exp keeps an overflow out of
    # the loss and out of its gradient, which masking afterwards would not (0 * inf is NaN, in the gradient too).
    log_ratio = jnp.where(counted, logprobs - old_logprobs, 0.0)
    ratio = jnp.exp(log_ratio)
    clipped_ratio = jnp.clip(ratio, 1 - epsilon, 1 + epsilon_high)
    row_advantages = advantages[:, None] if advantages.ndim == 1 else advantages
    loss = -jnp.minimum(ratio * row_advantages, clipped_ratio * row_advantages)
    kl = None
    if ref_logprobs is not None:
        ref_gap = jnp.where(counted, ref_logprobs - logprobs, 0.0)
        kl = jnp.where(counted, jnp.exp(ref_gap) - ref_gap - 1, 0.0)
        if beta != 0.0:
            loss = loss + beta * kl
    return TokenLosses(
        loss=jnp.where(counted, loss, 0.0),
        kl=kl,
        low_clipped=(ratio < 1 - epsilon) & (row_advantages < 0) & counted,
        high_clipped=(ratio > 1 + epsilon_high) & (row_advantages > 0) & counted,
    )


def reduce_loss(
    per_token_loss: jax.Array,
    mask: jax.Array,
    loss_type: LossType,
    max_completion_length: int,
    total_completion_tokens: jax.Array | float | None = None,
) -> jax.Array:
    """The batch's loss from its per-token losses (rows, T), by TRL's `loss_type`:

    - "grpo": each row's mean over its completion tokens, then the mean over rows: a long completion's tokens
      weigh less than a short one's (the length bias Dr. GRPO removes);
    - "dr_grpo": the sum over all completion tokens / (rows * max_completion_length), a constant normaliser
      (`max_completion_length` is the generation limit, not this batch's padded T);
    - "dapo": the sum / the number of completion tokens, `total_completion_tokens` when the batch is one
      micro-batch of a larger generation batch (TRL's num_items_in_batch), else this batch's own.

    A row or batch with no completion tokens gives 0, not NaN (the denominators are clamped at 1, as TRL's).
    It is the weighted token sum over the normaliser (`token_weights`, `loss_normaliser`), the two pieces the
    train step's objective splits over micro-batches (`objectives.GrpoLoss`)."""
    tokens = jnp.sum(mask) if total_completion_tokens is None else total_completion_tokens
    normaliser = loss_normaliser(loss_type, per_token_loss.shape[0], tokens, max_completion_length)
    return jnp.sum(per_token_loss * token_weights(mask, loss_type)) / normaliser


def token_weights(mask: jax.Array, loss_type: LossType, completion_size: jax.Array | None = None) -> jax.Array:
    """Each token's weight (rows, T) in the batch's loss sum: for "grpo" 1 / its completion's tokens (a
    completion's mean: `completion_size` gives each token's completion's count where a row holds several, else
    the row's is), else 1; 0 off the completion. A completion's weights depend on it alone, so micro-batches sum
    alike."""
    if loss_type == "grpo":
        size = jnp.sum(mask, axis=-1, keepdims=True) if completion_size is None else completion_size
        return mask / jnp.maximum(size, 1.0)
    return mask


def loss_normaliser(
    loss_type: LossType, rows: int | jax.Array, completion_tokens: jax.Array | float, max_completion_length: int
) -> jax.Array:
    """What the weighted token sum is divided by, for the whole batch: its rows — completions — ("grpo"), rows ×
    max_completion_length ("dr_grpo"), its completion tokens clamped at 1 ("dapo")."""
    if loss_type == "grpo":
        return jnp.asarray(rows, jnp.float32)
    if loss_type == "dr_grpo":
        return jnp.asarray(rows, jnp.float32) * max_completion_length
    if loss_type == "dapo":
        return jnp.maximum(jnp.asarray(completion_tokens, jnp.float32), 1.0)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")


def loss_metrics(losses: TokenLosses, mask: jax.Array) -> dict[str, jax.Array]:
    """What TRL logs of a batch's loss, under TRL's names: the mean KL over completion tokens (where there is a
    reference), the share of completion tokens whose ratio was clipped below / above / either (and the least /
    most clipped row's share, rows without tokens left out), and the mean completion length in tokens."""
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    row_tokens = jnp.sum(mask, axis=-1)

    def token_mean(values):
        return jnp.sum(values * mask) / tokens

    def row_shares(values):  # each row's mean, NaN for a row without tokens (TRL's, then its nanmin / nanmax)
        return jnp.where(row_tokens > 0, jnp.sum(values * mask, axis=-1) / jnp.maximum(row_tokens, 1.0), jnp.nan)

    low = losses.low_clipped.astype(mask.dtype)
    high = losses.high_clipped.astype(mask.dtype)
    metrics = {
        "clip_ratio/low_mean": token_mean(low),
        "clip_ratio/high_mean": token_mean(high),
        "clip_ratio/region_mean": token_mean((losses.low_clipped | losses.high_clipped).astype(mask.dtype)),
        "clip_ratio/low_min": jnp.nanmin(row_shares(low)),
        "clip_ratio/high_max": jnp.nanmax(row_shares(high)),
        "completions/mean_length": jnp.mean(row_tokens),
    }
    if losses.kl is not None:
        metrics["kl"] = token_mean(losses.kl)
    return metrics
