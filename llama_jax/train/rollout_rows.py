"""GRPO's rollouts laid out as the train step's rows, in one of two layouts:

* one completion a row (`rows_one_per_completion`): the prompt, the completion and its end token, padding —
  batch_size rows of seq_len; the prompt of a group is run G times;
* a prompt and its G completions in a row (`rows_shared_prompt`, where the train step's attention takes a mask):
  the prompt but its last token once, as the row's shared prefix (segment `attention.SHARED_PREFIX`, seen by
  every later token of the row), then each completion as a segment of its own that starts with the prompt's last
  token — whose target is the completion's first — at the position it has after the prompt. Each completion
  token attends to exactly what it does in the first layout (the prompt and its own completion, at the same
  positions), so the losses are the same; the prompt is run once: batch_size / G rows of
  seq_len + (G - 1) × max_completion_length positions.

Both give each completion token its `loss_mask` 1.0, its completion's `advantages`, and `completion_size` (the
completion's token count, "grpo" loss_type's per-completion mean), and mark one position per completion in
`completion_starts` (the completions a batch holds, for the normalisers; a row's first position in the first
layout, so that a completion with no tokens counts, as in TRL).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llama_jax.attention import MASKED_PATHS, SHARED_PREFIX, choose_implementation
from llama_jax.config import ModelConfig
from llama_jax.inference.types import Completion
from llama_jax.train.config import TrainConfig


def shares_prompt(config: TrainConfig, model: ModelConfig, platform: str) -> bool:
    """Whether a GRPO run lays a prompt and its completions in one row: grpo.share_prompt, where the train step's
    attention builds a mask (`attention.MASKED_PATHS`: XLA, cuDNN; TPU's splash kernel cannot show one segment to
    the others)."""
    attention = choose_implementation(model.attention, model.dtype, platform)
    return config.objective == "grpo" and config.grpo.share_prompt and attention in MASKED_PATHS


def grpo_batch_shape(config: TrainConfig, shared: bool) -> tuple[int, int, int]:
    """(micro-batches, rows per micro-batch, positions) of a GRPO step's batch in its layout."""
    if not shared:
        return config.grad_accum, config.micro_batch, config.seq_len
    grpo = config.grpo
    prompts = config.batch_size // grpo.num_generations
    return (
        config.grad_accum,
        prompts // config.grad_accum,
        config.seq_len + (grpo.num_generations - 1) * (grpo.max_completion_length),
    )


def completion_ids(completion: Completion, end_id: int) -> list[int]:
    """What a completion trains on: its tokens and, when it stopped, the end token it stopped at."""
    return [*completion.token_ids, *([end_id] if completion.finish_reason == "stop" else [])]


def rows_one_per_completion(
    prompt_ids: Sequence[Sequence[int]],
    completions: Sequence[Completion],
    end_id: int,
    advantages: np.ndarray,
    seq_len: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """The train step's fields for each (prompt, completion), (rows, seq_len): the prompt, the completion's tokens
    and, when it stopped, `end_id`, then padding."""
    n = len(completions)
    tokens = np.full((n, seq_len + 1), pad_id, np.int32)
    loss_mask = np.zeros((n, seq_len), np.float32)
    lengths = np.zeros(n, np.int64)
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completions)):
        ids = [*prompt, *completion_ids(completion, end_id)]
        if len(ids) > seq_len + 1:
            raise ValueError(f"a rollout of {len(ids)} tokens does not fit a row of {seq_len + 1}")
        tokens[row, : len(ids)] = ids
        loss_mask[row, len(prompt) - 1 : len(ids) - 1] = 1.0
        lengths[row] = len(ids)
    steps = np.arange(seq_len)
    real = steps[None, :] < lengths[:, None]  # an input that is a token of the row, not padding
    starts = np.zeros((n, seq_len), np.float32)
    starts[:, 0] = 1.0
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.where(real, steps, 0).astype(np.int32),
        "segments": real.astype(np.int32),
        "loss_mask": loss_mask,
        "advantages": np.repeat(np.asarray(advantages, np.float32)[:, None], seq_len, axis=1),
        "completion_size": loss_mask * loss_mask.sum(axis=1, keepdims=True),
        "completion_starts": starts,
    }


def rows_shared_prompt(
    prompt_ids: Sequence[Sequence[int]],
    completions: Sequence[Completion],
    end_id: int,
    advantages: np.ndarray,
    group: int,
    row_len: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """The train step's fields for groups of `group` completions of one prompt each (`prompt_ids` and
    `completions` one per completion, group by group, as the rollouts make them), (groups, row_len)."""
    rows = len(completions) // group
    fields = {
        "inputs": np.full((rows, row_len), pad_id, np.int32),
        "targets": np.full((rows, row_len), pad_id, np.int32),
        "positions": np.zeros((rows, row_len), np.int32),
        "segments": np.zeros((rows, row_len), np.int32),
        **{name: np.zeros((rows, row_len), np.float32) for name in ("loss_mask", "advantages")},
        **{name: np.zeros((rows, row_len), np.float32) for name in ("completion_size", "completion_starts")},
    }
    for row in range(rows):
        prompt = list(prompt_ids[row * group])
        prefix = len(prompt) - 1
        _put(fields, row, 0, prompt[:-1], prompt[1:], np.arange(prefix), SHARED_PREFIX)
        at = prefix
        for i in range(group):
            index = row * group + i
            ids = completion_ids(completions[index], end_id)
            n = len(ids)
            if at + n > row_len:
                raise ValueError(f"a prompt's {group} completions take {at + n} positions, a row holds {row_len}")
            _put(fields, row, at, [prompt[-1], *ids[:-1]], ids, prefix + np.arange(n), i + 1)
            span = slice(at, at + n)
            fields["loss_mask"][row, span] = 1.0
            fields["advantages"][row, span] = advantages[index]
            fields["completion_size"][row, span] = n
            fields["completion_starts"][row, at] = 1.0
            at += n
    return fields


def _put(fields: dict[str, np.ndarray], row: int, at: int, inputs, targets, positions, segment: int) -> None:
    span = slice(at, at + len(inputs))
    fields["inputs"][row, span] = inputs
    fields["targets"][row, span] = targets
    fields["positions"][row, span] = positions
    fields["segments"][row, span] = segment
