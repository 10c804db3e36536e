"""GRPO as the train step's objective (`objectives.GrpoLoss`) and its settings (`grpo.*`, `reward=`): whatever
the split into micro-batches, the summed loss and its gradient are `grpo_loss.reduce_loss` over the whole batch
for each loss_type, with and without the KL term, and the reported metrics are `grpo_loss.loss_metrics`'; the
settings parse and each bad one is one line naming its key; the log-probabilities are those of the logits divided
by grpo.temperature, as TRL's. No model: a fake forward pass scores each target token from a table."""

from __future__ import annotations

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.train import grpo_loss
from llama_jax.train.batching import FIELDS
from llama_jax.train.config import DpoSettings as DpoSettingsFromConfig
from llama_jax.train.config import load_train_config
from llama_jax.train.grpo_loss import group_advantages, loss_metrics, reduce_loss, token_losses
from llama_jax.train.objective_settings import GRPO_LOSS_TYPES, GRPO_SCALE_REWARDS, DpoSettings, GrpoSettings
from llama_jax.train.objectives import GrpoLoss, NextTokenLoss, objective_for
from llama_jax.train.state import TrainState

VOCAB = 11
GENERATIONS = 4
LENGTHS = [9, 3, 0, 6, 1, 8, 5, 2]  # completion tokens per row; row 2 has none
PROMPTS = [2, 1, 3, 2, 1, 2, 3, 1]  # prompt tokens before each completion
ROWS, T = len(LENGTHS), 12
MAX_COMPLETION_LENGTH = 10
SPLITS = (1, 2, 4)  # micro-batches per batch
TOLERANCE = dict(rtol=1e-6, atol=1e-7)
NOT_REPORTED = {"clip_ratio/low_min", "clip_ratio/high_max"}  # per-row extremes, not sums over micro-batches
# A valid GRPO run's settings.
VALID = ["objective=grpo", "init_from=somewhere", "reward=exact_match:answer", "batch_size=16", "seq_len=512"]


def forward(params, micro, dropout_key=None, temperature=1.0):
    """A stand-in for the model: each target token's log-probability log σ(table[token] / temperature),
    differentiable in the table; log Z is 0."""
    nll = jax.nn.softplus(-params["table"][micro["targets"]] / temperature)
    return nll, jnp.zeros_like(nll)


def rollout_batch() -> dict[str, np.ndarray]:
    """ROWS completions (GENERATIONS per prompt), each after its prompt, padded to T; the advantages of random
    rewards repeated over each row's positions, as the rollout loop lays them out."""
    rng = np.random.default_rng(0)
    index = np.arange(T)
    start = np.array(PROMPTS)[:, None] - 1  # the first completion token is the target of the prompt's last
    mask = (index >= start) & (index < start + np.array(LENGTHS)[:, None])
    tokens = rng.integers(0, VOCAB, (ROWS, T + 1))
    rewards = jnp.asarray(rng.normal(size=ROWS), jnp.float32)
    advantages = np.asarray(group_advantages(rewards, GENERATIONS).advantages)
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "positions": np.broadcast_to(index, (ROWS, T)).astype(np.int32),
        "segments": np.ones((ROWS, T), np.int32),
        "loss_mask": mask.astype(np.float32),
        "advantages": np.repeat(advantages[:, None], T, axis=1).astype(np.float32),
        "completion_size": (mask * np.array(LENGTHS)[:, None]).astype(np.float32),
        "completion_starts": (index == 0)[None].repeat(ROWS, axis=0).astype(np.float32),  # a row, a completion
    }


BATCH = rollout_batch()
POLICY = {"table": jnp.asarray(np.random.default_rng(1).normal(size=VOCAB), jnp.float32)}
REFERENCE = {"table": jnp.asarray(np.random.default_rng(2).normal(size=VOCAB), jnp.float32)}


def settings(loss_type: str, beta: float) -> GrpoSettings:
    return GrpoSettings(
        num_generations=GENERATIONS,
        max_completion_length=MAX_COMPLETION_LENGTH,
        beta=beta,
        epsilon_high=0.28,
        loss_type=loss_type,
    )


def step_loss(params, objective: GrpoLoss, micro_batches: int):
    """What the train step computes: the batch split into micro-batches, each one's loss divided by the whole
    batch's normaliser and added up, with their sums."""
    batch = {name: jnp.asarray(value).reshape(micro_batches, -1, T) for name, value in BATCH.items()}
    normaliser = objective.normaliser(batch)
    state = TrainState(jnp.int32(0), params, None, reference=REFERENCE)
    total, sums = jnp.float32(0), {name: jnp.float32(0) for name in objective.summed}
    for index in range(micro_batches):
        micro = {name: value[index] for name, value in batch.items()}
        reference = objective.reference_inputs(forward, state, micro)
        loss, micro_sums = objective.loss(forward, params, micro, normaliser, None, reference)
        total = total + loss
        sums = {name: sums[name] + micro_sums[name] for name in sums}
    return total, (sums, normaliser)


def whole_batch_losses(params, settings: GrpoSettings):
    """grpo_loss's functions over the whole batch at once, advantages one per row, as its docstring uses them."""
    logprobs = -forward(params, BATCH)[0]
    reference = -forward(REFERENCE, BATCH)[0] if settings.beta > 0 else None
    mask = jnp.asarray(BATCH["loss_mask"])
    return token_losses(
        logprobs,
        jax.lax.stop_gradient(logprobs),
        reference,
        jnp.asarray(BATCH["advantages"][:, 0]),
        mask,
        settings.epsilon,
        settings.epsilon_high,
        settings.beta,
    )


def whole_batch_loss(params, settings: GrpoSettings):
    losses = whole_batch_losses(params, settings)
    return reduce_loss(losses.loss, jnp.asarray(BATCH["loss_mask"]), settings.loss_type, MAX_COMPLETION_LENGTH)


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_any_split_gives_the_whole_batchs_loss_and_gradient(loss_type, beta):
    objective = GrpoLoss(settings(loss_type, beta))
    expected, expected_grad = jax.value_and_grad(whole_batch_loss)(POLICY, objective.settings)
    assert float(expected) != 0.0 and float(jnp.abs(expected_grad["table"]).max()) > 0.0
    for micro_batches in SPLITS:
        (loss, _), grad = jax.value_and_grad(step_loss, has_aux=True)(POLICY, objective, micro_batches)
        np.testing.assert_allclose(loss, expected, **TOLERANCE, err_msg=f"{micro_batches} micro-batches")
        np.testing.assert_allclose(grad["table"], expected_grad["table"], **TOLERANCE)


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_the_metrics_are_grpo_losss(loss_type, beta):
    objective = GrpoLoss(settings(loss_type, beta))
    expected = loss_metrics(whole_batch_losses(POLICY, objective.settings), jnp.asarray(BATCH["loss_mask"]))
    expected = {name: value for name, value in expected.items() if name not in NOT_REPORTED}
    expected["loss"] = whole_batch_loss(POLICY, objective.settings)
    assert ("kl" in expected) == (beta > 0)  # a KL only where there is a reference
    for micro_batches in SPLITS:
        _, (sums, normaliser) = step_loss(POLICY, objective, micro_batches)
        assert bool(objective.finite(sums))
        metrics = objective.train_metrics(sums, normaliser)
        assert metrics.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_allclose(metrics[name], value, **TOLERANCE, err_msg=name)
    assert float(metrics["completions/mean_length"]) == sum(LENGTHS) / ROWS
    if beta > 0:
        assert float(metrics["kl"]) > 0.0


def test_the_reference_only_with_a_kl_term():
    without, with_kl = GrpoLoss(GrpoSettings()), GrpoLoss(GrpoSettings(beta=0.04))
    assert (without.uses_reference, with_kl.uses_reference) == (False, True)
    state = TrainState(jnp.int32(0), POLICY, None, reference=REFERENCE)
    micro = {name: jnp.asarray(value) for name, value in BATCH.items()}
    assert without.reference_inputs(forward, state, micro) is None
    np.testing.assert_array_equal(with_kl.reference_inputs(forward, state, micro), -forward(REFERENCE, micro)[0])
    extra = {"advantages": np.float32, "completion_size": np.float32, "completion_starts": np.float32}
    assert GrpoLoss.batch_fields == {**FIELDS, **extra}
    grpo_config = types.SimpleNamespace(objective="grpo", grpo=GrpoSettings(beta=0.04))
    assert objective_for(grpo_config) == with_kl


def test_evaluation_is_the_completions_token_nll():
    micro = {name: jnp.asarray(value) for name, value in BATCH.items()}
    objective = GrpoLoss(GrpoSettings())
    sums = objective.eval_sums(forward, POLICY, micro, None)
    assert sums == NextTokenLoss().eval_sums(forward, POLICY, micro, None)
    mean_nll = float(jnp.sum(forward(POLICY, micro)[0] * micro["loss_mask"]) / sum(LENGTHS))
    loss, others = objective.eval_metrics({name: float(value) for name, value in sums.items()})
    assert loss == pytest.approx(mean_nll) and others == {}


def test_the_choices_are_grpo_losss():
    assert (GRPO_LOSS_TYPES, GRPO_SCALE_REWARDS) == (grpo_loss.LOSS_TYPES, grpo_loss.SCALE_REWARDS)


# --- settings --------------------------------------------------------------------------------------------


def test_grpo_keys_parse_from_the_command_line():
    config = load_train_config(
        None,
        [
            "grpo.num_generations=4",
            "grpo.max_completion_length=64",
            "grpo.temperature=0.7",
            "grpo.beta=0.04",
            "grpo.epsilon=0.2",
            "grpo.epsilon_high=0.28",
            "grpo.loss_type=dr_grpo",
            "grpo.scale_rewards=none",
            "grpo.num_iterations=1",
            "reward=exact_match:answer,regex:^<think>",
            "reward_weights=1,0.5",
        ],
    )
    assert config.grpo == GrpoSettings(4, 64, 0.7, 0.04, 0.2, 0.28, "dr_grpo", "none", 1)
    assert (config.reward, config.reward_weights) == ("exact_match:answer,regex:^<think>", "1,0.5")
    assert load_train_config(None, ["grpo.epsilon_high=null"]).grpo.epsilon_high is None
    assert load_train_config(None, ["init_from=none"]).init_from is None  # none: null where a key may be null
    assert DpoSettingsFromConfig is DpoSettings  # still importable from config.py


def test_a_valid_grpo_run_loads():
    config = load_train_config(None, VALID)
    assert config.objective == "grpo" and objective_for(config) == GrpoLoss(config.grpo)


def test_the_policy_and_the_reference_are_scored_at_the_sampling_temperature():
    """TRL divides the logits by the temperature the completions were sampled at, for the policy and the reference:
    at temperature 0.5 the loss is that of a forward pass whose scores are doubled."""
    batch = {name: jnp.asarray(value[None]) for name, value in rollout_batch().items()}
    micro = jax.tree.map(lambda a: a[0], batch)
    cooled = GrpoLoss(GrpoSettings(num_generations=GENERATIONS, beta=0.04, temperature=0.5))
    plain = GrpoLoss(GrpoSettings(num_generations=GENERATIONS, beta=0.04))
    doubled = {"table": 2 * POLICY["table"]}
    state = types.SimpleNamespace(reference_params=lambda: REFERENCE)
    doubled_state = types.SimpleNamespace(reference_params=lambda: {"table": 2 * REFERENCE["table"]})
    reference = cooled.reference_inputs(forward, state, micro)
    np.testing.assert_allclose(reference, plain.reference_inputs(forward, doubled_state, micro), rtol=1e-6)
    normaliser = cooled.normaliser(batch)
    loss, _ = cooled.loss(forward, POLICY, micro, normaliser, None, reference)
    expected, _ = plain.loss(forward, doubled, micro, normaliser, None, reference)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


@pytest.mark.parametrize(
    "argument, message",
    [
        ("grpo.num_generations=four", "bad value for grpo.num_generations: expected an integer, got 'four'"),
        ("grpo.epsilon_high=wide", "bad value for grpo.epsilon_high: expected a number"),
        ("grpo.num_generations=1", "grpo.num_generations must be at least 2"),
        ("grpo.max_completion_length=0", "grpo.max_completion_length must be at least 1, got 0"),
        ("grpo.max_completion_length=512", "grpo.max_completion_length (512) must be less than seq_len (512)"),
        ("grpo.temperature=0", "grpo.temperature must be positive, got 0.0"),
        ("grpo.beta=-0.1", "grpo.beta must not be negative, got -0.1"),
        ("grpo.epsilon=1", "grpo.epsilon must be in (0, 1), got 1.0"),
        ("grpo.epsilon_high=0.1", "grpo.epsilon_high must be at least grpo.epsilon (0.2) or null, got 0.1"),
        ("grpo.loss_type=bnpo", "grpo.loss_type must be one of ('grpo', 'dr_grpo', 'dapo'), got 'bnpo'"),
        ("grpo.scale_rewards=true", "grpo.scale_rewards must be one of ('group', 'batch', 'none'), got 'true'"),
        ("grpo.num_iterations=2", "grpo.num_iterations must be 1 for now (one optimisation pass"),
        ("batch_size=12", "batch_size (12) must be a multiple of grpo.num_generations (8)"),
        ("reward=null", "objective=grpo needs reward="),
        ("reward=exact_mach:answer", "reward= entry 'exact_mach:answer' is neither FILE.py:FUNCTION nor a built-in"),
        ("reward=missing.py:score", "reward= entry 'missing.py:score': there is no file missing.py"),
        ("reward_weights=1,2", "reward_weights=1,2 has 2 weights for 1 reward functions"),
        ("reward_weights=heavy", "reward_weights=heavy: 'heavy' is not a finite number"),
        ("sft=true", "objective=grpo samples completions to prompt records: drop sft=true"),
        ("dpo.beta=0.5", "dpo.* settings apply to objective=dpo: drop them"),
        ("init_from=null", "GRPO fine-tunes a model by its rewards: set init_from"),
        ("z_loss=1e-4", "z_loss applies to the next-token loss, not to GRPO"),
    ],
)
def test_bad_grpo_settings_are_one_line_naming_the_key(argument, message):
    with pytest.raises(ValueError) as error:
        load_train_config(None, [*VALID, argument])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_dpo_settings_are_still_checked():
    dpo = ["objective=dpo", "init_from=somewhere"]
    assert load_train_config(None, [*dpo, "dpo.beta=0.5"]).dpo == DpoSettings(beta=0.5)
    for argument, message in [
        ("dpo.beta=0", "dpo.beta must be positive"),
        ("dpo.loss=hinge", "dpo.loss must be one of ('sigmoid', 'ipo')"),
        ("dpo.label_smoothing=0.5", "dpo.label_smoothing must be in [0, 0.5)"),
        ("batch_size=6", "DPO rows come in pairs"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            load_train_config(None, [*dpo, "grad_accum=2", argument])
