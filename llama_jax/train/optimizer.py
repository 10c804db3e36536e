"""AdamW with the LLaMA recipe: β = (0.9, 0.95), ε = 1e-5, weight decay 0.1, gradient clipping at global
norm 1.0, linear warmup then cosine decay to 10% of the peak learning rate (LLaMA 1 §2.3, Llama 2 §2.2).

The papers do not say which parameters are decayed. We decay every weight matrix, the embedding and the
output projection included, and not the RMSNorm gains: decaying a gain pulls it towards zero, which
shrinks a whole layer's activations instead of regularising any weight (the GPT-2/3 and nanoGPT practice).
Norm gains are found by name, not by rank, because the stacked layers give them a leading `layers` axis.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from llama_jax.train.config import TrainConfig


def learning_rate(config: TrainConfig) -> optax.Schedule:
    """0 → lr linearly over `warmup` steps, then a cosine to lr·min_lr_ratio at `steps`. A warmup as long as
    the run never reaches the cosine (optax needs at least one decay step, so it ends one step later)."""
    warmup = min(config.warmup, config.steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=warmup,
        decay_steps=max(config.steps, warmup + 1),
        end_value=config.lr * config.min_lr_ratio,
    )


def decay_mask(params: Any) -> Any:
    """True for the parameters weight decay applies to: all but the norm gains (`.../scale`)."""

    def decayed(path, _):
        return getattr(path[-1], "key", None) != "scale"

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity(),
        optax.adamw(
            learning_rate(config),
            b1=config.beta1,
            b2=config.beta2,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            mask=decay_mask,
        ),
    )
