"""GRPO's rollouts: a step's prompts completed by the inference engine on the policy's current parameters, scored by
the reward functions and laid out as the train step's rows.

    rollouts = Rollouts(prompts, rewards, config, chat_template, rollout_positions(config, model_config))
    batch = rollouts.collect(policy, step)      # Rollout: the step's fields (grad_accum, micro_batch, seq_len), metrics
    metrics = rollouts.evaluate(policy)         # the held-out prompts' rewards, greedy and sampled

`policy` is a LoadedModel over the train state's own arrays (no copy; with LoRA the frozen base and the adapters
as trained). A step's batch_size rows are batch_size / G prompts (`PromptSet.train`: a function of (seed, step)),
each sampled G = grpo.num_generations times at grpo.temperature, completion c of step s on random stream
s × batch_size + c (its index in the run) — so a run resumed from a checkpoint samples what the uninterrupted
one did. The engine
prefills each prompt's G copies together and decodes all rows in its slots; a completion ends at the chat
template's end of turn (EOS without a template), which is trained as its last token, or after
grpo.max_completion_length tokens.

The rows (`rollout_rows.py`) hold a prompt and its G completions each where the attention allows it, else one
completion each: `loss_mask` is 1.0 on the targets that are completion tokens, `advantages` the completion's
advantage (`grpo_loss.group_advantages`). On a multi-host job every
process runs the same engine steps and gets the same completions; the rewards are computed by the first process
and sent to the others, so that a reward function that is not deterministic cannot make the processes disagree.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from llama_jax.config import ModelConfig
from llama_jax.inference.engine import Engine
from llama_jax.inference.sampling import SamplingParams
from llama_jax.inference.settings import EngineSettings
from llama_jax.inference.types import Completion, Request
from llama_jax.loading import LoadedModel
from llama_jax.train.config import TrainConfig
from llama_jax.train.examples import response_end
from llama_jax.train.grpo_loss import group_advantages
from llama_jax.train.grpo_prompts import PromptRecord, PromptSet
from llama_jax.train.rewards import Rewards
from llama_jax.train.rollout_rows import completion_ids, grpo_batch_shape, rows_one_per_completion, rows_shared_prompt

# The held-out prompts' sampled completions draw from random streams no training completion uses (those count
# from 0: step × batch_size + completion).
HELD_OUT_STREAMS = 1 << 30
PREFILL_ROWS = 64


@dataclasses.dataclass(frozen=True)
class Rollout:
    fields: dict[str, np.ndarray]  # the train step's batch fields, (grad_accum, micro_batch, seq_len) each
    metrics: dict[str, float | None]  # TRL's names: reward, reward_std, rewards/NAME/mean, frac_reward_zero_std, ...


class Rollouts:
    def __init__(
        self,
        prompts: PromptSet,
        rewards: Rewards,
        config: TrainConfig,
        chat_template: str | None,
        max_len: int,
        shared: bool = False,
    ):
        """`max_len`: the positions a prompt and its completion share (`rollout_positions`); `shared`: a prompt and
        its completions in one row (`rollout_rows.shares_prompt`), else one completion a row."""
        self.prompts, self.rewards, self.config, self.shared = prompts, rewards, config, shared
        self.settings = config.grpo
        self.engine_settings = rollout_engine_settings(config, max_len)
        self.chat_template = chat_template
        self.field_names = sorted({name for record in prompts.records for name in record.fields})

    def collect(self, policy: LoadedModel, step: int) -> Rollout:
        """Step `step`'s rows: its prompts, G completions each, their rewards and advantages."""
        config, group = self.config, self.settings.num_generations
        records = [r for r in self.prompts.train(step, config.batch_size // group, config.seed) for _ in range(group)]
        sampling = SamplingParams(temperature=self.settings.temperature)
        first_stream = step * config.batch_size
        start = time.perf_counter()
        completions = self._generate(policy, records, sampling, first_stream)
        rollout_s = time.perf_counter() - start
        totals, per_function = self._score(records, completions)
        advantages = group_advantages(jnp.asarray(totals), group, self.settings.scale_rewards)
        end = response_end(policy.tokenizer, self.chat_template)
        prompt_ids, pad = [r.ids for r in records], policy.tokenizer.pad_id
        shape = grpo_batch_shape(config, self.shared)
        if self.shared:
            rows = rows_shared_prompt(
                prompt_ids, completions, end, np.asarray(advantages.advantages), group, shape[2], pad
            )
        else:
            rows = rows_one_per_completion(
                prompt_ids, completions, end, np.asarray(advantages.advantages), shape[2], pad
            )
        fields = {name: value.reshape(shape) for name, value in rows.items()}
        grouped = totals.reshape(-1, group)
        lengths = np.array([len(completion_ids(c, end)) for c in completions])
        stopped = np.array([c.finish_reason == "stop" for c in completions])
        metrics = {
            "reward": float(np.mean(totals)),
            "reward_std": float(np.mean(np.std(grouped, axis=1, ddof=1))),
            "frac_reward_zero_std": float(advantages.frac_reward_zero_std),
            **_per_function(per_function),
            "completions/clipped_ratio": float(np.mean(~stopped)),
            "completions/mean_terminated_length": float(np.mean(lengths[stopped])) if stopped.any() else 0.0,
            "completion_tokens": float(np.sum(lengths)),
            "rollout_s": rollout_s,
        }
        if self.settings.beta == 0:  # no reference, no KL: the records still carry the key, as null
            metrics["kl"] = None
        return Rollout(fields, metrics)

    def evaluate(self, policy: LoadedModel) -> dict[str, float]:
        """The held-out prompts' rewards (at most eval_batches × batch_size of them): `reward` and each function's
        mean over one greedy completion per prompt (the same every time for the same parameters), and
        `sampled/reward` over one completion per prompt sampled at grpo.temperature, as training samples (the same
        random streams at every evaluation)."""
        records = list(self.prompts.held_out[: self.config.eval_batches * self.config.batch_size])
        greedy = self._generate(policy, records, SamplingParams(), 0)
        totals, per_function = self._score(records, greedy)
        means = {name: value for name, value in _per_function(per_function).items() if name.endswith("/mean")}
        sampling = SamplingParams(temperature=self.settings.temperature)
        sampled, _ = self._score(records, self._generate(policy, records, sampling, HELD_OUT_STREAMS))
        return {
            "reward": float(np.mean(totals)),
            **means,
            "completions/mean_length": float(np.mean([len(c.token_ids) + (c.finish_reason == "stop") for c in greedy])),
            "sampled/reward": float(np.mean(sampled)),
        }

    def _generate(
        self, policy: LoadedModel, records: Sequence[PromptRecord], sampling: SamplingParams, first_stream: int
    ) -> list[Completion]:
        settings = self.settings
        stop = (response_end(policy.tokenizer, self.chat_template),)
        requests = [
            Request(record.ids, settings.max_completion_length, sampling, self.config.seed, first_stream + i, stop)
            for i, record in enumerate(records)
        ]
        return Engine(policy, self.engine_settings).generate(requests)

    def _score(
        self, records: Sequence[PromptRecord], completions: Sequence[Completion]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(each completion's weighted reward, each function's rewards): computed by the first process, the same
        on every process."""
        fields = {name: [record.fields.get(name) for record in records] for name in self.field_names}
        prompts = [record.prompt for record in records]
        if jax.process_index() == 0:
            result = self.rewards(prompts, [c.text for c in completions], [c.token_ids for c in completions], fields)
            table = np.stack([result.total, *result.per_function.values()])
        else:
            table = np.zeros((1 + len(self.rewards.names), len(records)), np.float32)
        if jax.process_count() > 1:
            table = np.asarray(multihost_utils.broadcast_one_to_all(table))
        return table[0], dict(zip(self.rewards.names, table[1:]))


def rollout_positions(config: TrainConfig, model: ModelConfig) -> int:
    """The positions a prompt and its completion share: a row's seq_len + 1 tokens (inputs and the last target),
    or the model's max_seq_len if fewer."""
    return min(config.seq_len + 1, model.max_seq_len)


def rollout_engine_settings(config: TrainConfig, max_len: int) -> EngineSettings:
    """The engine the rollouts run on, and `--compile-for` compiles: batch_size sequences of `max_len` positions,
    the same for every call so that its programs compile once per run, and a step's prompts prefilled in one call
    (up to PREFILL_ROWS), not the engine's default few at a time between decode steps."""
    rows = min(config.batch_size, PREFILL_ROWS)
    return EngineSettings(max_num_seqs=config.batch_size, max_model_len=max_len, prefill_rows=rows)


def _per_function(per_function: dict[str, np.ndarray]) -> dict[str, float]:
    """rewards/NAME/mean and /std over the completions a function scored (NaN: it returned None)."""
    metrics = {}
    for name, values in per_function.items():
        scored = values[~np.isnan(values)]
        metrics[f"rewards/{name}/mean"] = float(np.mean(scored)) if scored.size else 0.0
        metrics[f"rewards/{name}/std"] = float(np.std(scored, ddof=1)) if scored.size > 1 else 0.0
    return metrics
