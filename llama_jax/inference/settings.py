"""How to generate, and how big the engine is: two frozen settings objects, each checked when it is made, so
nothing downstream checks again.

    GenerationSettings   what a command's prompts get: token budget, sampling, seed, chat, extra stop ids
    EngineSettings       the engine's size: sequences decoded together, positions per sequence, the page pool
                         (its pages' size, its tokens, int8 or not), prefill chunk, prefix cache, queue;
                         `resolve(model, batch shards)` fills in what depends on the model and the mesh. The
                         engine, `--compile-for` and the commands all take it, so they accept the same values.
"""

from __future__ import annotations

import dataclasses

from llama_jax.config import ModelConfig
from llama_jax.inference.constraints import Constraint
from llama_jax.inference.sampling import SamplingParams

MAX_SEED = 2**32 - 1  # JAX keys hold 32 bits: larger seeds would silently repeat smaller ones
MAX_STEPS = 64  # decode steps one device call may run: the size of its token buffer
STREAM_STEPS_PER_DISPATCH = 8  # a stream's tokens arrive this many at a time
PREFILL_CHUNK = 256  # prompt tokens per prefill call, and per cached prefix chunk
MIN_PREFILL_CHUNK = 16  # the smallest prompt bucket
PREFILL_ROWS = 4  # prompts of one bucket prefilled together
# Positions per page of the KV cache. vLLM's default is 16; decoding here reads 128 positions at a time, and a
# read from one page is a plain slice where one from eight pages of 16 is a copy that joins them (a CPU decode
# step at batch 1 took twice as long).
BLOCK_SIZE = 128
KV_CACHE_DTYPES = ("auto", "int8")  # auto: the model's compute dtype
# A sequence's positions are a whole number of these: the decode attention's read block and the prefill chunk
# must divide them (`EngineSettings.positions_per_seq`).
READ_BLOCK = 128


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bounds}, got {value}")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """max_new_tokens: most tokens generated per prompt. seed: with the prompt's index in the input, it picks
    the prompt's random stream. chat: prompts are a user's message in the checkpoint's chat template.
    stop_ids: ids that end a completion, besides the tokenizer's own. constraint: what every completion's text
    must be (a JSON schema, a regex...), or None."""

    max_new_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    chat: bool = False
    stop_ids: tuple[int, ...] = ()
    constraint: Constraint | None = None

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
    prompt and completion (None: the model's max_seq_len). block_size: positions per page of the KV cache, a
    power of two (None: 128, or the prefill chunk when smaller). kv_cache_tokens: positions the page pool
    holds, all sequences together (None: max_num_seqs × max_model_len, as many as fixed slots would reserve —
    so nothing is ever preempted; fewer make room for more sequences, which take pages as they grow, the
    newest preempted and recomputed when the pool runs out). kv_cache_dtype: "auto" (the model's compute
    dtype) or "int8" (a float32 scale per position and head). prefill_chunk: prompt tokens per prefill call
    and per cached prefix chunk, a power of two; longer prompts go a chunk at a time between decode calls.
    prefix_cache_tokens: prompt tokens the prefix cache may keep in the pool (None: as many as no running
    sequence needs; 0: no prefix cache). prefill_rows: prompts of one
    bucket prefilled together (None: up to 4). steps_per_dispatch: decode steps per device call. max_queue:
    requests waiting for a slot before `submit` refuses more."""

    max_num_seqs: int = 8
    max_model_len: int | None = None
    block_size: int | None = None
    kv_cache_tokens: int | None = None
    kv_cache_dtype: str = "auto"
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
        block = self.block_size
        if block is not None and (not isinstance(block, int) or block < 1 or block & (block - 1) or block > chunk):
            raise ValueError(f"block_size must be a power of two of at most prefill_chunk {chunk}, got {block}")
        if self.kv_cache_tokens is not None:
            _check_int("kv_cache_tokens", self.kv_cache_tokens, 1)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
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
        unit = max(READ_BLOCK, self.prefill_chunk)
        pool = self.kv_cache_tokens or seqs * -(-max_len // unit) * unit
        if pool < max_len:
            raise ValueError(f"kv_cache_tokens {pool} cannot hold one sequence of max_model_len {max_len}")
        if max_len <= self.prefill_chunk:  # no prompt is chunked: there are no whole chunks to cache
            prefix = 0
        else:
            prefix = pool if self.prefix_cache_tokens is None else self.prefix_cache_tokens
        rows = min(seqs, self.prefill_rows or PREFILL_ROWS)
        block = self.block_size or min(BLOCK_SIZE, self.prefill_chunk)
        return dataclasses.replace(
            self,
            max_num_seqs=seqs,
            max_model_len=max_len,
            block_size=block,
            kv_cache_tokens=-(-pool // block) * block,
            prefix_cache_tokens=prefix,
            prefill_rows=rows,
        )

    @property
    def positions_per_seq(self) -> int:
        """Positions a sequence's page table covers (resolved settings): max_model_len rounded up to whole read
        blocks and prefill chunks."""
        unit = max(READ_BLOCK, self.prefill_chunk)
        return -(-self.max_model_len // unit) * unit

    @property
    def num_pages(self) -> int:
        """Pages of the pool (resolved settings)."""
        return self.kv_cache_tokens // self.block_size

    @property
    def prefix_cache_chunks(self) -> int:
        """Whole prompt chunks the prefix cache may keep (resolved settings); 0: none."""
        return (self.prefix_cache_tokens or 0) // self.prefill_chunk


DEFAULT_ENGINE = EngineSettings()
