"""A training run from a TrainConfig: data, model, resume, the step loop, evaluation, checkpoints, samples.

`train(config)` is what `python train.py` runs; it returns the final report (step, losses, checkpoint).
Rerunning it with the same settings and run_dir continues from the newest checkpoint, and because every
batch is a function of (seed, step) alone the continued run computes exactly what an uninterrupted one
would. All processes of a multi-host job run it in lockstep; only the first writes files and logs.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from llama_jax import flops
from llama_jax.batching import PackedRows, global_batch
from llama_jax.checkpoint import LoadedModel, ModelDir, read_model_dir, restore_params
from llama_jax.config import ModelConfig, load_model_config
from llama_jax.data import PreparedData, prepare_data
from llama_jax.model import abstract_state, create_model
from llama_jax.multihost import PreemptionNotice
from llama_jax.optimizer import learning_rate, make_optimizer
from llama_jax.sharding import make_mesh
from llama_jax.train_config import COMPUTE_FIELDS, TrainConfig, build_model_config
from llama_jax.train_logging import TrainLogger
from llama_jax.train_step import TrainState, init_state, make_eval_step, make_train_step, state_shardings
from llama_jax.training_checkpoint import TrainingCheckpoints, check_same_run, create_run_dir, read_run

SAMPLE_TEMPERATURE = 0.8
# Settings that change what a run computes; a rerun in the same run_dir must match them to resume.
TRAJECTORY_KEYS = ("init_from", "sft", "val_fraction", "steps", "batch_size", "seq_len", "seed", "lr", "warmup",
                   "min_lr_ratio", "weight_decay", "beta1", "beta2", "adam_eps", "grad_clip", "z_loss")


@dataclasses.dataclass
class _Run:
    """Everything one training run works with, set up by `_prepare`."""

    config: TrainConfig
    run_dir: Path
    data: PreparedData
    rows: PackedRows
    model_config: ModelConfig
    chat_template: str | None
    fingerprint: dict[str, Any]
    mesh: jax.sharding.Mesh
    state: TrainState
    start: int
    train_loss: float | None
    train_step: Callable
    eval_step: Callable
    checkpoints: TrainingCheckpoints


def train(config: TrainConfig) -> dict[str, Any]:
    run = _prepare(config)
    config = run.config
    logger = TrainLogger(run.run_dir, enabled=jax.process_index() == 0, steps=config.steps, start_step=run.start,
                         tokens_per_step=config.batch_size * config.seq_len,
                         flops_per_token=flops.training_flops_per_token(run.model_config, config.seq_len),
                         peak_flops_total=_peak_flops_total(config, run.mesh))
    logger.message(f"{run.run_dir}: {run.model_config.param_count():,} parameters, {len(run.data.corpus.tokens):,} "
                   f"tokens in {run.rows.n_train} training and {run.rows.n_val} validation rows of {config.seq_len}"
                   + (f"; resuming at step {run.start}" if run.start else ""))
    with jax.set_mesh(run.mesh), PreemptionNotice() as preemption:
        train_loss, eval_loss, preempted = _loop(run, logger, preemption)
        run.checkpoints.wait()
        run.checkpoints.close()
        logger.close()
    samples = [] if preempted else _samples(run)
    return {"step": int(jax.device_get(run.state.step)), "train_loss": train_loss, "eval_loss": eval_loss,
            "eval_perplexity": math.exp(min(eval_loss, 700.0)), "vocab_size": run.model_config.vocab_size,
            "checkpoint": str(run.run_dir), "checkpoint_step": run.checkpoints.latest_step(), "preempted": preempted,
            "samples": samples}


def _prepare(config: TrainConfig) -> _Run:
    """Check the run directory, tokenize the data, create or resume the state, compile nothing yet."""
    run_dir = Path(config.run_dir)
    stored = read_run(run_dir)
    source = read_model_dir(config.init_from) if config.init_from else None
    config = _resolve_tokenizer(config, source)
    chat_template = _chat_template(config, source)
    data = prepare_data(config, chat_template)
    model_config = build_model_config(config, jax.default_backend(), source.config if source else None,
                                      data.tokenizer.vocab_size)
    fingerprint = run_fingerprint(config, model_config, data)
    if stored is not None:
        check_same_run(run_dir, stored, fingerprint)
    elif jax.process_index() == 0:
        create_run_dir(run_dir, model_config, data.tokenizer_path, data.tokenizer.file_name, chat_template,
                       config.to_dict(), fingerprint)
    multihost_utils.sync_global_devices("run_dir ready")

    mesh = make_mesh(config.mesh)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.micro_batch % batch_shards:
        raise ValueError(f"the micro-batch (batch_size / grad_accum = {config.micro_batch}) must be a multiple of "
                         f"the data-parallel size (mesh data × fsdp = {batch_shards})")
    rows = PackedRows(data.corpus, config.seq_len, data.tokenizer.pad_id, config.sft, config.val_fraction)
    optimizer = make_optimizer(config)
    abstract, shardings = state_shardings(model_config, optimizer, mesh)
    checkpoints = TrainingCheckpoints(run_dir, config.keep_checkpoints)
    state, meta = _initial_state(config, model_config, source, mesh, optimizer, abstract, shardings, checkpoints)
    batch_shape = (config.grad_accum, config.micro_batch, config.seq_len)
    graphdef, _ = abstract_state(model_config)
    train_step = make_train_step(graphdef, optimizer, shardings, mesh, batch_shape, config.z_loss,
                                 learning_rate(config))
    eval_step = make_eval_step(graphdef, shardings.params, mesh, batch_shape)
    return _Run(config, run_dir, data, rows, model_config, chat_template, fingerprint, mesh, state,
                int(meta.get("step", 0)), meta.get("train_loss"), train_step, eval_step, checkpoints)


def _loop(run: _Run, logger: TrainLogger, preemption: PreemptionNotice) -> tuple[float | None, float, bool]:
    """Train from run.start to config.steps (or a preemption): (last train loss, eval loss, preempted)."""
    config, train_loss, eval_loss, preempted = run.config, run.train_loss, None, False
    for step in range(run.start, config.steps):
        ids = run.rows.train_rows(step, config.batch_size, config.seed).reshape(config.grad_accum, -1)
        run.state, metrics = run.train_step(run.state, global_batch(run.rows, ids, run.mesh))
        done = step + 1
        logger.advance()
        preempted = preemption.reached(done)
        last = done == config.steps
        save = last or preempted or done % config.checkpoint_every == 0
        if step == run.start:
            jax.block_until_ready(metrics)
            logger.restart_clock(done)  # compilation is not training throughput
        if save or done % config.log_every == 0:
            train_loss = logger.train(done, {k: float(v) for k, v in jax.device_get(metrics).items()})["loss"]
        if last or done % config.eval_every == 0:
            eval_loss = _evaluate(run)
            logger.eval(done, eval_loss)
        if save:
            position = {"seed": config.seed, "samples_seen": done * config.batch_size}
            run.checkpoints.save(done, run.state, {"train_loss": train_loss, "data_position": position,
                                                   "fingerprint": run.fingerprint})
        if save or done % config.eval_every == 0:
            logger.restart_clock(done)
        if preempted:
            logger.message(f"preempted: saved step {done}; rerun the same command to continue")
            break
    return train_loss, eval_loss if eval_loss is not None else _evaluate(run), preempted


def _evaluate(run: _Run) -> float:
    """Mean next-token loss over the validation rows (the same rows every time)."""
    total = count = 0.0
    for ids in run.rows.val_rows(run.config.batch_size, run.config.eval_batches):
        batch = global_batch(run.rows, ids.reshape(run.config.grad_accum, -1), run.mesh)
        nll, tokens = run.eval_step(run.state.params, batch)
        total, count = total + nll, count + tokens
    return float(total) / max(float(count), 1.0)


def run_fingerprint(config: TrainConfig, model_config, data: PreparedData) -> dict[str, Any]:
    """What a rerun must match to resume: the model's shape, the corpus as tokenized (its key covers the
    data bytes, the tokenizer and the tokenizing options) and the optimisation settings."""
    model = {k: v for k, v in model_config.to_dict().items() if k not in COMPUTE_FIELDS}
    return {"model": model, "corpus": data.corpus.key, **{k: getattr(config, k) for k in TRAJECTORY_KEYS}}


def _chat_template(config: TrainConfig, source: ModelDir | None) -> str | None:
    if config.chat_template != "auto":
        return config.chat_template
    if source.chat_template is None:
        raise ValueError(f"init_from {config.init_from} has no chat template; set chat_template=llama2 or llama3")
    return source.chat_template


def _resolve_tokenizer(config: TrainConfig, source: ModelDir | None) -> TrainConfig:
    """The config with its tokenizer named: init_from's file, or train:VOCAB with the model's vocab_size."""
    if config.tokenizer is not None:
        return config
    if source is not None:
        if source.tokenizer_path is None:
            raise ValueError(f"init_from {config.init_from} has no tokenizer; set tokenizer=FILE")
        return dataclasses.replace(config, tokenizer=str(source.tokenizer_path))
    vocab = dict(config.model_overrides).get("vocab_size") or load_model_config(config.model or "small").vocab_size
    return dataclasses.replace(config, tokenizer=f"train:{vocab}")


def _initial_state(config, model_config, source, mesh, optimizer, abstract, shardings, checkpoints):
    """(state, meta): from the newest checkpoint, else init_from's parameters, else a random init."""
    step = checkpoints.latest_step()
    if step is not None:
        params, opt_state, meta = checkpoints.restore(step, abstract)
        return TrainState(jax.device_put(np.int32(meta["step"]), shardings.step), params, opt_state), meta
    if source is not None:
        params = restore_params(source.params_path, model_config, mesh)
    else:
        params = nnx.to_pure_dict(nnx.state(create_model(model_config, mesh, seed=config.seed)))
    return init_state(params, optimizer, shardings), {}


def _peak_flops_total(config: TrainConfig, mesh) -> float | None:
    per_device = flops.peak_flops(mesh.devices.flat[0].device_kind, config.peak_tflops)
    return per_device * mesh.devices.size if per_device else None


def _samples(run: _Run) -> list[dict[str, str]]:
    """A few generations from the trained model (single-process runs: the texts come back to one host)."""
    config = run.config
    if config.samples == 0 or jax.process_count() > 1:
        return []
    from llama_jax.generation import generate

    model = nnx.merge(abstract_state(run.model_config)[0], run.state.params)
    loaded = LoadedModel(model, run.model_config, run.mesh, run.data.tokenizer, run.chat_template)
    prompts = list(config.sample_prompts or [""])
    prompts = (prompts * config.samples)[: config.samples]
    completions = generate(loaded, prompts, max_new_tokens=config.sample_tokens, temperature=SAMPLE_TEMPERATURE,
                           seed=config.seed, batch_size=len(prompts))
    return [{"prompt": c.prompt, "completion": c.completion} for c in completions]
