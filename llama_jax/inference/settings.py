"""How to generate: one frozen settings object, checked when it is made, so nothing downstream checks again."""

from __future__ import annotations

import dataclasses

from llama_jax.config import ModelConfig
from llama_jax.inference.sampling import SamplingParams

MAX_SEED = 2**32 - 1  # JAX keys hold 32 bits: larger seeds would silently repeat smaller ones


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """max_new_tokens: most tokens generated per prompt. seed: with the prompt's index in the input, it picks
    the prompt's random stream. batch_size: prompts decoded together (never changes a result). chat: prompts
    are a user's message in the checkpoint's chat template. stop_ids: ids that end a completion, besides the
    tokenizer's own."""

    max_new_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    batch_size: int = 8
    chat: bool = False
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name, low, high in (("max_new_tokens", 1, None), ("batch_size", 1, None), ("seed", 0, MAX_SEED)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low or (high is not None and value > high):
                bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise ValueError(f"{name} must be an integer {bounds}, got {value}")
        object.__setattr__(self, "stop_ids", tuple(self.stop_ids))

    def check_model(self, config: ModelConfig) -> None:
        """ValueError unless these settings can run on a model of `config`."""
        bad = [i for i in self.stop_ids if not 0 <= i < config.vocab_size]
        if bad:
            raise ValueError(f"stop ids {bad} are outside the vocabulary (0..{config.vocab_size - 1})")
        if self.max_new_tokens >= config.max_seq_len:
            raise ValueError(
                f"max_new_tokens {self.max_new_tokens} leaves no room for a prompt in the model's "
                f"{config.max_seq_len} positions"
            )
