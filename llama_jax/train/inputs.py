"""What a training job reads and checks before it writes anything: its settings (the tokenizer named), init_from,
the data — a corpus packed into rows, or GRPO's prompts and reward functions — the mesh and the model.

    inputs = read_inputs(config)    # Inputs; nothing written but the data cache

Every check that can fail runs here, so a refused run leaves no run directory behind.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from jax.sharding import Mesh

from llama_jax.config import ModelConfig
from llama_jax.model_dir import ModelDir, read_model_dir
from llama_jax.sharding import make_mesh, mesh_platform
from llama_jax.tokenizers import Tokenizer
from llama_jax.train.batching import PackedRows, check_batch_fits_mesh
from llama_jax.train.config import TrainConfig
from llama_jax.train.data import named_tokenizer, prepare_data
from llama_jax.train.grpo_prompts import PromptSet
from llama_jax.train.init_from import build_model_config, chat_template, resolve_tokenizer
from llama_jax.train.rewards import Rewards, load_rewards, parse_reward_specs, parse_reward_weights
from llama_jax.train.rollout_rows import grpo_batch_shape, shares_prompt
from llama_jax.train.rollouts import rollout_positions
from llama_jax.train.run_dir import check_run_dir
from llama_jax.train.sources import data_files


@dataclasses.dataclass(frozen=True)
class Inputs:
    config: TrainConfig
    run_dir: Path
    source: ModelDir | None  # init_from
    chat_template: str | None
    mesh: Mesh
    tokenizer: Tokenizer
    tokenizer_path: Path
    data_key: str  # the data as tokenized (files, tokenizer, options): part of the run's fingerprint
    model_config: ModelConfig
    rows: PackedRows | None  # the corpus packed into rows (next-token and DPO runs)
    prompts: PromptSet | None = None  # GRPO's prompts
    rewards: Rewards | None = None  # GRPO's reward functions
    shared_prompt: bool = False  # GRPO's rows: a prompt and its completions each (`rollout_rows.shares_prompt`)


def read_inputs(config: TrainConfig) -> Inputs:
    """Read init_from and the data (tokenized, or found in the cache), checking the settings against them and
    the devices; nothing is written but the data cache."""
    run_dir = Path(config.run_dir)
    check_run_dir(run_dir)
    source = read_model_dir(config.init_from) if config.init_from else None
    config = resolve_tokenizer(config, source)
    template = chat_template(config, source)
    mesh = make_mesh(config.mesh)
    check_batch_fits_mesh(config, mesh)
    if config.objective == "grpo":
        return _grpo_inputs(config, run_dir, source, template, mesh)
    data = prepare_data(config, template)
    model_config = build_model_config(
        config, mesh_platform(mesh), source.config if source else None, data.tokenizer.vocab_size
    )
    rows = _packed_rows(config, data.corpus, data.tokenizer.pad_id)
    tokenizer, key = data.tokenizer, data.corpus.key
    return Inputs(config, run_dir, source, template, mesh, tokenizer, data.tokenizer_path, key, model_config, rows)


def _grpo_inputs(config: TrainConfig, run_dir: Path, source: ModelDir, template: str | None, mesh: Mesh) -> Inputs:
    """GRPO's: init_from's tokenizer, the prompt records (each checked to leave room for its completion) and the
    reward functions, imported and checked before anything is written."""
    tokenizer_path, tokenizer = named_tokenizer(config)
    model_config = build_model_config(config, mesh_platform(mesh), source.config, tokenizer.vocab_size)
    specs = parse_reward_specs(config.reward)
    rewards = load_rewards(specs, parse_reward_weights(config.reward_weights or "", len(specs)))
    prompts = PromptSet.read(
        data_files(config.data),
        tokenizer,
        tokenizer_path,
        template,
        config.val_fraction,
        config.grpo.max_completion_length,
        rollout_positions(config, model_config),
    )
    prompts.check_fields(specs, rewards)
    shared = shares_prompt(config, model_config, mesh_platform(mesh))
    rows = grpo_batch_shape(config, shared)[1]
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % shards:
        raise ValueError(
            f"a prompt and its completions share a row (grpo.share_prompt): the {rows} prompt(s) of a micro-batch "
            f"must be a multiple of the data-parallel size (mesh data x fsdp = {shards}); change batch_size, "
            "grad_accum or the mesh, or set grpo.share_prompt=false"
        )
    return Inputs(
        config,
        run_dir,
        source,
        template,
        mesh,
        tokenizer,
        tokenizer_path,
        prompts.key,
        model_config,
        None,
        prompts,
        rewards,
        shared,
    )


def _packed_rows(config: TrainConfig, corpus, pad_id: int) -> PackedRows:
    """The corpus packed into rows, checked to leave the evaluation something to score."""
    pairs = config.objective == "dpo"
    rows = PackedRows(corpus, config.seq_len, pad_id, config.sft, config.val_fraction, pairs)
    evaluated = rows.val_rows(config.batch_size, config.eval_batches)
    if rows.supervised_tokens(np.concatenate(evaluated)) == 0:  # an eval loss over nothing would read 0
        raise ValueError(
            f"the validation rows the run evaluates hold no response token: {rows.describe_supervision()}; "
            "raise seq_len, eval_batches or val_fraction"
        )
    return rows
