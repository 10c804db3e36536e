"""Direct Preference Optimization (Rafailov et al. 2023): the loss of a batch of (chosen, rejected) pairs.

A batch's rows come in pairs, row 2i the chosen response to prompt i and row 2i + 1 the rejected one, each
with its loss mask on the response tokens (`batching.PackedRows(pairs=True)`). A response's log-probability
under the policy and under the frozen reference is the sum of its tokens' (their mean for IPO, as TRL does);
with margin m = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected):

    sigmoid (the paper's):  -(1 - ε) · log σ(β·m) - ε · log σ(-β·m)      (ε: label smoothing, cDPO)
    ipo (Azar et al. 2023): (m - 1 / (2β))²

and the implicit rewards β · (policy - reference) of each response, whose ordering is the reward accuracy.
These are TRL's DPOTrainer formulas (tests/test_dpo.py checks them and their gradients against them written
independently in PyTorch). A pair one of whose responses has no token in its row (cut off by seq_len, or a
padding pair of an evaluation batch) is left out: it counts nowhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.train.config import DpoSettings

# What the train step reports of DPO, summed over a batch's pairs (then divided by their count).
PAIR_METRICS = ("loss", "rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin")


def valid_pairs(response_tokens: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """A pair counts only if both its rows hold a response token: (..., pairs) booleans from each row's count
    of response tokens (..., rows), the rows interleaved chosen / rejected. numpy or jax arrays alike, so the
    data's count of the pairs it cut off and the loss apply the same rule."""
    return (response_tokens[..., 0::2] > 0) & (response_tokens[..., 1::2] > 0)


def response_logprobs(nll: jax.Array, mask: jax.Array, mean: bool) -> jax.Array:
    """Each row's response log-probability (rows,): the sum of its masked tokens' (the mean where `mean`)."""
    total = -jnp.sum(nll * mask, axis=-1)
    return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0) if mean else total


def pair_losses(
    policy: jax.Array, reference: jax.Array, counted: jax.Array, settings: DpoSettings
) -> dict[str, jax.Array]:
    """Per-pair loss and rewards (pairs,), from the rows' response log-probabilities (rows,) of the policy and
    the reference, the rows interleaved chosen / rejected. `counted` (rows,) is each row's number of response
    tokens: a pair with a row of none gets 0 everywhere and `pairs` = 0."""
    policy_chosen, policy_rejected = policy[0::2], policy[1::2]
    reference_chosen, reference_rejected = reference[0::2], reference[1::2]
    margin = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    beta, smoothing = settings.beta, settings.label_smoothing
    if settings.loss == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - smoothing) * jax.nn.log_sigmoid(beta * margin) - smoothing * jax.nn.log_sigmoid(-beta * margin)
    chosen = jax.lax.stop_gradient(beta * (policy_chosen - reference_chosen))
    rejected = jax.lax.stop_gradient(beta * (policy_rejected - reference_rejected))
    valid = valid_pairs(counted).astype(jnp.float32)
    return {
        "loss": losses * valid,
        "rewards_chosen": chosen * valid,
        "rewards_rejected": rejected * valid,
        "reward_accuracy": (chosen > rejected).astype(jnp.float32) * valid,
        "reward_margin": (chosen - rejected) * valid,
        "pairs": valid,
    }
