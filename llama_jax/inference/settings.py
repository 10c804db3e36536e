"""How to generate, and how big the engine is: two frozen settings objects, each checked when it is made, so
nothing downstream checks again.

    GenerationSettings   what a command's prompts get: token budget, sampling, seed, chat, extra stop ids
    EngineSettings       the engine's size: decode slots, positions per sequence, prefill chunk, prefix cache,
                         queue; `resolve(model, mesh)` fills in what depends on the model and the mesh. The
                         engine, `--compile-for` and the commands all take it, so they accept the same values.
"""

from __future__ import annotations

import dataclasses

from llama_jax.config import ModelConfig
from llama_jax.inference.sampling import SamplingParams

MAX_SEED = 2**32 - 1  # JAX keys hold 32 bits: larger seeds would silently repeat smaller ones
MAX_STEPS = 64  # decode steps one device call may run: the size of its token buffer
STREAM_STEPS_PER_DISPATCH = 8  # a stream's tokens arrive this many at a time
PREFILL_CHUNK = 256  # prompt tokens per prefill call, and per cached prefix chunk
MIN_PREFILL_CHUNK = 16  # the smallest prompt bucket
PREFILL_ROWS = 4  # prompts of one bucket prefilled together


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bounds}, got {value}")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """max_new_tokens: most tokens generated per prompt. seed: with the prompt's index in the input, it picks
    the prompt's random stream. chat: prompts are a user's message in the checkpoint's chat template.
    stop_ids: ids that end a completion, besides the tokenizer's own."""

    max_new_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    chat: bool = False
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        _check_int("seed", self.seed, 0, MAX_SEED)
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


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """The engine's size, in vLLM's names where it has one.

    max_num_seqs: sequences decoded together (the decode slots). max_model_len: positions of one sequence,
    prompt and completion (None: the model's max_seq_len). prefill_chunk: prompt tokens per prefill call and
    per cached prefix chunk, a power of two; longer prompts go a chunk at a time between decode calls.
    prefix_cache_tokens: prompt tokens the prefix cache keeps (None: a quarter of what the slots hold when a
    prompt can be longer than a chunk; 0: none). prefill_rows: prompts of one bucket prefilled together (None:
    up to 4). steps_per_dispatch: decode steps per device call. max_queue: requests waiting for a slot before
    `submit` refuses more."""

    max_num_seqs: int = 8
    max_model_len: int | None = None
    prefill_chunk: int = PREFILL_CHUNK
    prefix_cache_tokens: int | None = None
    prefill_rows: int | None = None
    steps_per_dispatch: int = MAX_STEPS
    max_queue: int = 1024

    def __post_init__(self):
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        if self.max_model_len is not None:
            _check_int("max_model_len", self.max_model_len, 2)
        chunk = self.prefill_chunk
        if not isinstance(chunk, int) or chunk < MIN_PREFILL_CHUNK or chunk & (chunk - 1):
            raise ValueError(f"prefill_chunk must be a power of two of at least {MIN_PREFILL_CHUNK}, got {chunk}")
        if self.prefix_cache_tokens is not None:
            _check_int("prefix_cache_tokens", self.prefix_cache_tokens, 0)
        if self.prefill_rows is not None:
            _check_int("prefill_rows", self.prefill_rows, 1)
        _check_int("steps_per_dispatch", self.steps_per_dispatch, 1, MAX_STEPS)
        _check_int("max_queue", self.max_queue, 1)

    def resolve(self, config: ModelConfig, batch_shards: int = 1) -> EngineSettings:
        """Every default filled in for a model of `config` on a mesh whose batch axes (data × fsdp) have
        `batch_shards` devices: max_num_seqs rounded up to a multiple of them (each holds as many slots; tokens
        never depend on the slot count), max_model_len at most the model's."""
        if self.max_model_len is not None and self.max_model_len > config.max_seq_len:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's max_seq_len {config.max_seq_len}")
        seqs = -(-self.max_num_seqs // batch_shards) * batch_shards
        max_len = self.max_model_len or config.max_seq_len
        prefix = self.prefix_cache_tokens
        if prefix is None:
            prefix = seqs * max_len // 4 if max_len > self.prefill_chunk else 0
        rows = min(seqs, self.prefill_rows or PREFILL_ROWS)
        return dataclasses.replace(
            self, max_num_seqs=seqs, max_model_len=max_len, prefix_cache_tokens=prefix, prefill_rows=rows
        )

    @property
    def prefix_cache_chunks(self) -> int:
        """Chunks the prefix pool holds (resolved settings)."""
        return (self.prefix_cache_tokens or 0) // self.prefill_chunk


DEFAULT_ENGINE = EngineSettings()
