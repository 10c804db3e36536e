"""GRPO's loss math (`llama_jax/train/grpo_loss.py`) against TRL 1.16's GRPOTrainer formulas, written again here in
PyTorch (not taken from our code): the advantages for each scale_rewards (a group of equal rewards, a NaN reward,
groups of one), the loss and its gradient for each loss_type with and without the KL term, the KL and the clip
ratios, on ragged masks with a row of no completion tokens; the policy-gradient identity at ratio 1, which no
wrong ratio or normaliser satisfies; and padding that holds -inf or NaN changing nothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.train.grpo_loss import group_advantages, loss_metrics, reduce_loss, token_losses

EPSILON, EPSILON_HIGH = 0.2, 0.28  # DAPO's clip-higher
GENERATIONS = 4
LENGTHS = [16, 3, 9, 0, 12, 1, 16, 7, 5, 14, 2, 10]  # completion tokens per row; row 3 has none
ROWS, T = len(LENGTHS), 16
MAX_COMPLETION_LENGTH = 20  # Dr. GRPO's constant: the generation limit, above the batch's padded T
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
TOLERANCE = {np.float32: dict(rtol=1e-6, atol=1e-7), np.float64: dict(rtol=1e-12, atol=1e-14)}


# --- TRL 1.16's GRPOTrainer formulas, independently in PyTorch ----------------------------------------------


def trl_nanstd(tensor, dim=None):
    """trl.trainer.utils.nanstd: the NaN-skipping std with Bessel's correction (NaN for fewer than two)."""
    torch = pytest.importorskip("torch")
    mean = torch.nanmean(tensor, dim=dim, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)
    correction = count / (count - 1)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    std = torch.sqrt(variance * correction)
    return std.squeeze() if dim is None else std.squeeze(dim)


def trl_advantages(rewards, num_generations, scale_rewards):
    """GRPOTrainer._generate_and_score_completions, one reward function (multi_objective_aggregation
    sum_then_normalize): the advantages and frac_reward_zero_std."""
    torch = pytest.importorskip("torch")
    grouped = rewards.view(-1, num_generations)
    mean_grouped_rewards = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        if num_generations > 1:
            std_rewards = trl_nanstd(grouped, dim=1).repeat_interleave(num_generations, dim=0)
        else:
            std_rewards = torch.zeros_like(rewards)
    else:
        std_rewards = trl_nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    return torch.nan_to_num(advantages, nan=0.0), is_std_zero.float().mean()


def trl_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, mask, beta, loss_type):
    """GRPOTrainer._compute_loss at token level, one process, no gradient accumulation, no optional extras:
    the loss and the metrics it logs (the KL computed even at beta 0, where TRL does not log it)."""
    torch = pytest.importorskip("torch")
    advantages = advantages.unsqueeze(1)
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    coef_2 = torch.clamp(coef_1, 1 - EPSILON, 1 + EPSILON_HIGH)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * MAX_COMPLETION_LENGTH)
    else:  # dapo: num_items_in_batch is the generation batch's completion tokens, here this batch's
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)

    def global_masked_mean(x):
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    def masked_seq_mean(x):
        return (x * mask).sum(-1) / mask.sum(-1)

    def nan_extreme(x, reduce):
        return torch.tensor(float("nan")) if torch.isnan(x).all() else reduce(x[~torch.isnan(x)])

    is_low_clipped = (coef_1 < 1 - EPSILON) & (advantages < 0)
    is_high_clipped = (coef_1 > 1 + EPSILON_HIGH) & (advantages > 0)
    metrics = {
        "kl": global_masked_mean(per_token_kl),
        "clip_ratio/low_mean": global_masked_mean(is_low_clipped.to(mask.dtype)),
        "clip_ratio/high_mean": global_masked_mean(is_high_clipped.to(mask.dtype)),
        "clip_ratio/region_mean": global_masked_mean((is_low_clipped | is_high_clipped).to(mask.dtype)),
        "clip_ratio/low_min": nan_extreme(masked_seq_mean(is_low_clipped.to(mask.dtype)), torch.min),
        "clip_ratio/high_max": nan_extreme(masked_seq_mean(is_high_clipped.to(mask.dtype)), torch.max),
        "completions/mean_length": mask.sum(-1).mean(),  # the generated lengths, which the mask counts here
    }
    return loss, metrics


# --- the inputs ---------------------------------------------------------------------------------------------


def completion_mask(dtype):
    return (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(dtype)


def policy_batch(dtype):
    """Log-probabilities whose ratios to the old policy's fall on both sides of both clip bounds, a reference
    some way off, and advantages of both signs with a group of zeros (a group of equal rewards)."""
    rng = np.random.default_rng(0)
    logprobs = -rng.gamma(1.0, 1.5, (ROWS, T))
    old_logprobs = logprobs + rng.normal(0.0, 0.3, (ROWS, T))
    ref_logprobs = logprobs + rng.normal(0.0, 0.5, (ROWS, T))
    advantages = rng.normal(0.0, 1.0, ROWS)
    advantages[GENERATIONS : 2 * GENERATIONS] = 0.0
    return [x.astype(dtype) for x in (logprobs, old_logprobs, ref_logprobs, advantages, completion_mask(dtype))]


def ours(logprobs, old_logprobs, ref_logprobs, advantages, mask, beta, loss_type):
    """Our loss, its gradient with respect to the policy's log-probabilities, and the metrics."""

    def loss_fn(policy_logprobs):
        losses = token_losses(
            policy_logprobs, old_logprobs, ref_logprobs, advantages, mask, EPSILON, EPSILON_HIGH, beta
        )
        return reduce_loss(losses.loss, mask, loss_type, MAX_COMPLETION_LENGTH), losses

    (loss, losses), gradient = jax.value_and_grad(loss_fn, has_aux=True)(logprobs)
    return loss, gradient, loss_metrics(losses, mask)


# --- the tests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_the_loss_its_gradient_and_metrics_are_trls(loss_type, beta, dtype):
    torch = pytest.importorskip("torch")
    inputs = policy_batch(dtype)
    with jax.enable_x64(dtype == np.float64):
        loss, gradient, metrics = ours(*map(jnp.asarray, inputs), beta, loss_type)
        loss, gradient, metrics = np.asarray(loss), np.asarray(gradient), jax.tree.map(np.asarray, metrics)
    assert loss.dtype == dtype and gradient.dtype == dtype

    logprobs, old_logprobs, ref_logprobs, advantages, mask = map(torch.from_numpy, inputs)
    logprobs.requires_grad_(True)
    expected_loss, expected_metrics = trl_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, beta, loss_type)
    expected_loss.backward()

    tolerance = TOLERANCE[dtype]
    np.testing.assert_allclose(loss, expected_loss.item(), **tolerance)
    np.testing.assert_allclose(gradient, logprobs.grad.numpy(), **tolerance)
    assert np.all(gradient[3] == 0) and np.all(gradient[mask == 0] == 0)  # the empty row, the padding
    assert set(metrics) == set(expected_metrics)
    for name, value in expected_metrics.items():
        np.testing.assert_allclose(metrics[name], value.item(), err_msg=name, **tolerance)
    # The inputs reach every branch: ratios clipped below and above, a row wholly clipped, a row never.
    assert 0 < metrics["clip_ratio/low_mean"] and 0 < metrics["clip_ratio/high_mean"]
    assert metrics["clip_ratio/low_min"] == 0 and metrics["clip_ratio/high_max"] > 0


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_the_advantages_are_trls(scale_rewards):
    torch = pytest.importorskip("torch")
    rewards = np.array([0.0, 1.0, 0.5, 2.0, 1.0, 1.0, 1.0, 1.0, 2.0, 0.0, 0.0, 0.5], np.float32)  # group 1: equal
    advantages, frac_zero_std = group_advantages(jnp.asarray(rewards), GENERATIONS, scale_rewards)
    expected, expected_frac = trl_advantages(torch.from_numpy(rewards), GENERATIONS, scale_rewards)
    np.testing.assert_allclose(np.asarray(advantages), expected.numpy(), rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(advantages)[GENERATIONS : 2 * GENERATIONS] == 0.0)  # equal rewards teach nothing
    # The share of groups whose rewards all equal: TRL's, except that with "batch" TRL tests the batch's std.
    _, group_frac = trl_advantages(torch.from_numpy(rewards), GENERATIONS, "group")
    assert float(frac_zero_std) == pytest.approx(1 / 3) == group_frac.item()
    if scale_rewards != "batch":
        assert expected_frac.item() == group_frac.item()


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_unscorable_completions_and_groups_of_one_are_trls(scale_rewards):
    torch = pytest.importorskip("torch")
    rewards = np.array([0.0, np.nan, 0.5, 2.0, np.nan, 1.0, np.nan, np.nan], np.float32)  # one scored in group 1
    for generations in (GENERATIONS, 1):
        advantages, frac_zero_std = group_advantages(jnp.asarray(rewards), generations, scale_rewards)
        expected, expected_frac = trl_advantages(torch.from_numpy(rewards), generations, scale_rewards)
        np.testing.assert_allclose(np.asarray(advantages), expected.numpy(), rtol=1e-6, atol=1e-7)
        assert np.all(np.asarray(advantages)[np.isnan(rewards)] == 0.0)
        if scale_rewards != "batch":
            assert float(frac_zero_std) == expected_frac.item()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_at_ratio_one_the_gradient_is_the_policy_gradient(loss_type):
    """With one optimisation pass (old = stop_gradient(logprobs)) and no KL, every ratio is 1, nothing is
    clipped, and d loss / d logp = -A · mask / normaliser, the loss -Σ A · mask / normaliser."""
    logprobs, _, ref_logprobs, advantages, mask = map(jnp.asarray, policy_batch(np.float32))

    def loss_fn(policy_logprobs):
        losses = token_losses(
            policy_logprobs, jax.lax.stop_gradient(policy_logprobs), ref_logprobs, advantages, mask,
            EPSILON, EPSILON_HIGH, beta=0.0,
        )  # fmt: skip
        return reduce_loss(losses.loss, mask, loss_type, MAX_COMPLETION_LENGTH), losses

    (loss, losses), gradient = jax.value_and_grad(loss_fn, has_aux=True)(logprobs)
    lengths = np.array(LENGTHS, np.float32)[:, None]
    normaliser = {
        "grpo": ROWS * np.maximum(lengths, 1.0),
        "dr_grpo": ROWS * MAX_COMPLETION_LENGTH,
        "dapo": lengths.sum(),
    }[loss_type]
    expected_gradient = -np.asarray(advantages)[:, None] * np.asarray(mask) / normaliser
    np.testing.assert_allclose(np.asarray(gradient), expected_gradient, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(float(loss), expected_gradient.sum(), rtol=1e-5, atol=1e-7)
    assert not np.any(losses.low_clipped) and not np.any(losses.high_clipped)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_garbage_in_the_padding_changes_nothing(loss_type):
    """-inf (a masked logit's log-probability) or NaN where the mask is 0 leaves the loss, its gradient and the
    metrics as they are with finite padding: finite."""
    logprobs, old_logprobs, ref_logprobs, advantages, mask = policy_batch(np.float32)
    clean = ours(*map(jnp.asarray, (logprobs, old_logprobs, ref_logprobs, advantages, mask)), 0.04, loss_type)
    padding = mask == 0
    logprobs, old_logprobs, ref_logprobs = logprobs.copy(), old_logprobs.copy(), ref_logprobs.copy()
    logprobs[padding], old_logprobs[padding], ref_logprobs[padding] = -np.inf, np.nan, -np.inf
    dirty = ours(*map(jnp.asarray, (logprobs, old_logprobs, ref_logprobs, advantages, mask)), 0.04, loss_type)
    for clean_value, dirty_value in zip(jax.tree.leaves(clean), jax.tree.leaves(dirty)):
        assert np.all(np.isfinite(dirty_value))
        np.testing.assert_array_equal(np.asarray(dirty_value), np.asarray(clean_value))


def test_empty_batches_and_bad_settings():
    mask = jnp.zeros((2, 4))
    losses = token_losses(jnp.zeros((2, 4)), jnp.zeros((2, 4)), None, jnp.ones(2), mask)
    for loss_type in LOSS_TYPES:
        assert float(reduce_loss(losses.loss, mask, loss_type, 4)) == 0.0
    with pytest.raises(ValueError, match="loss_type"):
        reduce_loss(losses.loss, mask, "bnpo", 4)
    with pytest.raises(ValueError, match="ref_logprobs"):
        token_losses(jnp.zeros((2, 4)), jnp.zeros((2, 4)), None, jnp.ones(2), mask, beta=0.04)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(jnp.zeros(4), 2, "std")
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(jnp.zeros(6), 4)
