"""The settings of the objectives beyond the next-token loss: `dpo.*` (objective=dpo) and `grpo.*`
(objective=grpo), TrainConfig's nested keys, each with the checks of its own values. TrainConfig (`config.py`)
holds them and checks them, and the rest of the run's settings against them, when its objective is theirs.

Like config.py this module does not import JAX (`train.py --help` reads it): the GRPO choices are written
here again rather than imported from `grpo_loss.py`, and tests/test_grpo_objective.py checks that they agree.
"""

from __future__ import annotations

import dataclasses

from llama_jax.train.rewards import parse_reward_specs, parse_reward_weights

DPO_LOSSES = ("sigmoid", "ipo")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")  # grpo_loss.LOSS_TYPES
GRPO_SCALE_REWARDS = ("group", "batch", "none")  # grpo_loss.SCALE_REWARDS


@dataclasses.dataclass(frozen=True)
class DpoSettings:
    """Direct Preference Optimization (Rafailov et al. 2023), `objective=dpo`: the loss of TRL's DPOTrainer."""

    beta: float = 0.1  # how far the policy may move from the reference: the implicit reward's scale
    loss: str = "sigmoid"  # sigmoid: the paper's -log σ(β·margin); ipo: (margin - 1/(2β))² on mean log-probs
    label_smoothing: float = 0.0  # the share of pairs assumed to be labelled the wrong way round (cDPO)

    def validate(self, micro_batch: int) -> None:
        """Its values, and the rows of a micro-batch (batch_size / grad_accum), which must hold whole pairs."""
        _check(
            micro_batch % 2 == 0,
            f"DPO rows come in pairs (chosen, rejected): batch_size / grad_accum ({micro_batch}) must be even",
        )
        _check(self.beta > 0, f"dpo.beta must be positive, got {self.beta}")
        _check(self.loss in DPO_LOSSES, f"dpo.loss must be one of {DPO_LOSSES}, got {self.loss!r}")
        _check(0 <= self.label_smoothing < 0.5, f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


@dataclasses.dataclass(frozen=True)
class GrpoSettings:
    """Group Relative Policy Optimization (Shao et al. 2024), `objective=grpo`: TRL GRPOTrainer's settings under
    its names and with its defaults (TRL 1.x: `grpo_loss.py` says where versions differ)."""

    num_generations: int = 8  # completions sampled per prompt: a group, each scored against its group's mean
    max_completion_length: int = 256  # the generation limit in tokens; dr_grpo's loss divides by it
    temperature: float = 1.0  # the sampling temperature of the completions
    beta: float = 0.0  # the KL penalty's weight: 0 (TRL's default) needs no reference model
    epsilon: float = 0.2  # the ratio is clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # None: epsilon; DAPO's clip-higher sets it above (0.28 for 0.2)
    loss_type: str = "dapo"  # grpo: each completion's token mean; dr_grpo: / max_completion_length; dapo: / tokens
    scale_rewards: str = "group"  # advantages divided by the group's reward std, the batch's, or none (Dr. GRPO)
    num_iterations: int = 1  # optimisation passes over each batch of rollouts
    # One prompt and its G completions in a row, each completion seeing the prompt and itself: the prompt is run
    # once, not G times. Where the train step's attention takes a mask (XLA, cuDNN), not TPU's splash kernel.
    share_prompt: bool = True

    def validate(self, batch_size: int, seq_len: int) -> None:
        """Its values, and the shape of a step's batch: `batch_size` rows, whole groups of completions, each row
        `seq_len` tokens long, a prompt and its completion."""
        _check(
            self.num_generations >= 2,
            f"grpo.num_generations must be at least 2 (a group's advantages are relative to its mean reward), "
            f"got {self.num_generations}",
        )
        _check(
            self.max_completion_length >= 1,
            f"grpo.max_completion_length must be at least 1, got {self.max_completion_length}",
        )
        _check(self.temperature > 0, f"grpo.temperature must be positive, got {self.temperature}")
        _check(self.beta >= 0, f"grpo.beta must not be negative, got {self.beta}")
        _check(0 < self.epsilon < 1, f"grpo.epsilon must be in (0, 1), got {self.epsilon}")
        _check(
            self.epsilon_high is None or self.epsilon_high >= self.epsilon,
            f"grpo.epsilon_high must be at least grpo.epsilon ({self.epsilon}) or null, got {self.epsilon_high}",
        )
        _check(
            self.loss_type in GRPO_LOSS_TYPES,
            f"grpo.loss_type must be one of {GRPO_LOSS_TYPES}, got {self.loss_type!r}",
        )
        _check(
            self.scale_rewards in GRPO_SCALE_REWARDS,
            f"grpo.scale_rewards must be one of {GRPO_SCALE_REWARDS}, got {self.scale_rewards!r}",
        )
        _check(
            self.num_iterations == 1,
            "grpo.num_iterations must be 1 for now (one optimisation pass over each batch of rollouts: the policy "
            f"that sampled them is the one trained), got {self.num_iterations}",
        )
        _check(
            batch_size % self.num_generations == 0,
            f"batch_size ({batch_size}) must be a multiple of grpo.num_generations ({self.num_generations}): "
            "a step's rows are its prompts' groups of completions",
        )
        _check(
            self.max_completion_length < seq_len,
            f"grpo.max_completion_length ({self.max_completion_length}) must be less than seq_len ({seq_len}): "
            "a row holds a prompt and its completion",
        )


def check_rewards(reward: str | None, reward_weights: str | None) -> None:
    """objective=grpo's `reward=` (required) and `reward_weights=`, parsed as the run will parse them, so that
    a typo, a missing file or a wrong count of weights fails with the settings, before a model loads.
    `rewards.py`'s messages are already the settings' kind: one line that names the key (`reward= entry ...`,
    `reward_weights=...`)."""
    _check(reward is not None, "objective=grpo needs reward=: FILE.py:FUNCTION or a built-in, to score its completions")
    specs = parse_reward_specs(reward)
    parse_reward_weights(reward_weights or "", len(specs))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
