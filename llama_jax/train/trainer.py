"""A training job from a TrainConfig: data, model, resume, the step loop, evaluation, checkpoints, samples.

`run(config)` is what `python train.py` runs; it returns the final report (step, losses, checkpoint).
Rerunning it with the same settings and run_dir continues from the newest checkpoint, and because every
batch is a function of (seed, step) alone the continued job computes exactly what an uninterrupted one
would. All processes of a multi-host job run it in lockstep; only the first writes files and logs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from llama_jax import flops
from llama_jax.config import ModelConfig
from llama_jax.inference.api import generate
from llama_jax.loading import LoadedModel
from llama_jax.lora import split_adapters
from llama_jax.model import abstract_state, create_model, init_adapters
from llama_jax.model_dir import read_model_dir
from llama_jax.quantize import quantize_params
from llama_jax.sharding import make_mesh, mesh_platform
from llama_jax.train.batching import PackedRows, check_batch_fits_mesh, global_batch
from llama_jax.train.checkpoints import TrainingCheckpoints
from llama_jax.train.config import TrainConfig
from llama_jax.train.data import PreparedData, prepare_data
from llama_jax.train.init_from import build_model_config, chat_template, resolve_tokenizer
from llama_jax.train.metrics import TrainLogger
from llama_jax.train.multihost import PreemptionNotice
from llama_jax.train.optimizer import learning_rate, make_optimizer
from llama_jax.train.run_dir import RunFiles, check_run_dir, has_checkpoints, open_run_dir, run_fingerprint
from llama_jax.train.step import StateLayout, TrainState, init_state, make_eval_step, make_train_step, state_layout

SAMPLE_TEMPERATURE = 0.8
# Steps in a row whose loss or gradient is not finite (their updates skipped) before the run gives up: one
# bad batch is weathered, a diverged run stops before it saves again.
MAX_NONFINITE_STEPS = 3


@dataclasses.dataclass
class _Job:
    """Everything one training job works with, set up by `_prepare`."""

    config: TrainConfig
    run_dir: Path
    data: PreparedData
    rows: PackedRows
    model_config: ModelConfig
    chat_template: str | None
    fingerprint: dict[str, Any]
    mesh: jax.sharding.Mesh
    layout: StateLayout
    state: TrainState
    start: int
    train_loss: float | None
    train_step: Callable
    eval_step: Callable
    checkpoints: TrainingCheckpoints
    lock: TextIO | None  # the run directory's lock, held by the process that writes (the first)


def run(config: TrainConfig) -> dict[str, Any]:
    job = _prepare(config)
    config = job.config
    logger = TrainLogger(
        job.run_dir,
        enabled=jax.process_index() == 0,
        steps=config.steps,
        start_step=job.start,
        tokens_per_step=config.batch_size * config.seq_len,
        flops_per_token=flops.training_flops_per_token(job.model_config, config.seq_len),
        peak_flops_total=_peak_flops_total(config, job.mesh),
    )
    trained = ""
    if job.model_config.lora.enabled:
        adapters = sum(a.size for a in jax.tree.leaves(job.state.params))
        trained = f" (LoRA rank {job.model_config.lora_rank}: {adapters:,} trained, the rest frozen)"
    logger.message(
        f"{job.run_dir}: {job.model_config.param_count():,} parameters{trained}, "
        f"{job.data.corpus.n_tokens:,} "
        f"tokens in {job.rows.n_train} training and {job.rows.n_val} validation rows of {config.seq_len}"
        + (f"; resuming at step {job.start}" if job.start else "")
    )
    if job.rows.supervision is not None:
        logger.message(f"{'DPO' if job.rows.pairs else 'SFT'}: {job.rows.describe_supervision()}")
    with jax.set_mesh(job.mesh), PreemptionNotice() as preemption:
        try:
            train_loss, eval_loss, preempted = _loop(job, logger, preemption)
        finally:  # a diverged run still finishes writing the checkpoints it started
            job.checkpoints.wait()
            job.checkpoints.close()
            logger.close()
            if job.lock is not None:
                job.lock.close()
    samples = [] if preempted else _samples(job)
    eval_loss, eval_metrics = eval_loss
    return {
        "step": int(jax.device_get(job.state.step)),
        "train_loss": train_loss,
        "eval_loss": eval_loss,
        # A DPO loss is no next-token loss: its evaluation reports the pairs' rewards instead.
        "eval_perplexity": None if eval_metrics else math.exp(min(eval_loss, 700.0)),
        **{f"eval_{name}": value for name, value in eval_metrics.items()},
        "vocab_size": job.model_config.vocab_size,
        "checkpoint": str(job.run_dir),
        "checkpoint_step": job.checkpoints.latest_step(),
        "preempted": preempted,
        "samples": samples,
    }


def _prepare(config: TrainConfig) -> _Job:
    """Check everything, tokenize the data, then create (or check) and lock the run directory, and create or
    resume the state; compile nothing yet. Nothing is written before every check has passed."""
    run_dir = Path(config.run_dir)
    check_run_dir(run_dir)
    source = read_model_dir(config.init_from) if config.init_from else None
    config = resolve_tokenizer(config, source)
    template = chat_template(config, source)
    mesh = make_mesh(config.mesh)
    check_batch_fits_mesh(config, mesh)
    data = prepare_data(config, template)
    model_config = build_model_config(
        config, mesh_platform(mesh), source.config if source else None, data.tokenizer.vocab_size
    )
    dpo = config.objective == "dpo"
    rows = PackedRows(data.corpus, config.seq_len, data.tokenizer.pad_id, config.sft, config.val_fraction, dpo)
    evaluated = rows.val_rows(config.batch_size, config.eval_batches)
    if rows.supervised_tokens(np.concatenate(evaluated)) == 0:  # an eval loss over nothing would read 0
        raise ValueError(
            f"the validation rows the run evaluates hold no response token: {rows.describe_supervision()}; "
            "raise seq_len, eval_batches or val_fraction"
        )
    optimizer = make_optimizer(config)
    layout = state_layout(model_config, optimizer, mesh, reference=dpo)
    fingerprint = run_fingerprint(config, model_config, data.corpus.key)
    # init_from's parameters are read (and checked) before the run directory exists, unless it will resume.
    # LoRA freezes them (all of them, every run); full fine-tuning starts from them.
    frozen = _frozen_base(source, model_config, mesh, layout) if model_config.lora.enabled else {}
    # DPO's reference without LoRA: init_from's parameters, read again on every start (they are never saved).
    reference = source.restore_params(layout.abstract.reference) if layout.abstract.reference else {}
    start_params = (
        source.restore_params(layout.abstract.params)
        if source is not None and not model_config.lora.enabled and not has_checkpoints(run_dir)
        else None
    )
    lock = None
    if jax.process_index() == 0:
        lora_base = Path(config.init_from) if model_config.lora.enabled else None
        lock = open_run_dir(
            run_dir,
            RunFiles(
                model_config,
                data.tokenizer_path,
                data.tokenizer.file_name,
                template,
                config.to_dict(),
                fingerprint,
                lora_base,
            ),
        )
    multihost_utils.sync_global_devices("run_dir ready")

    checkpoints = TrainingCheckpoints(run_dir, config.keep_checkpoints)
    state, meta = _initial_state(config, model_config, start_params, frozen, mesh, optimizer, layout, checkpoints)
    state = dataclasses.replace(state, reference=reference)
    batch_shape = (config.grad_accum, config.micro_batch, config.seq_len)
    train_step = make_train_step(
        layout,
        optimizer,
        mesh,
        batch_shape,
        config.z_loss,
        learning_rate(config),
        config.loss_chunk,
        config.seed if model_config.lora.dropout else None,
        config.dpo if dpo else None,
    )
    eval_step = make_eval_step(layout, mesh, batch_shape, config.loss_chunk, config.dpo if dpo else None)
    return _Job(
        config,
        run_dir,
        data,
        rows,
        model_config,
        template,
        fingerprint,
        mesh,
        layout,
        state,
        int(meta.get("step", 0)),
        meta.get("train_loss"),
        train_step,
        eval_step,
        checkpoints,
        lock,
    )


def _loop(job: _Job, logger: TrainLogger, preemption: PreemptionNotice) -> tuple[float | None, tuple, bool]:
    """Train from job.start to config.steps (or a preemption): (last train loss, the last evaluation,
    preempted)."""
    config, train_loss, eval_loss, preempted = job.config, job.train_loss, None, False
    nonfinite = NonFiniteWatch(job.run_dir, MAX_NONFINITE_STEPS)
    for step in range(job.start, config.steps):
        ids = job.rows.train_rows(step, config.batch_size, config.seed).reshape(config.grad_accum, -1)
        job.state, metrics = job.train_step(job.state, global_batch(job.rows, ids, job.mesh))
        done = step + 1
        nonfinite.observe(done, metrics["skipped"])  # the previous step's flag: the device stays busy
        logger.advance()
        preempted = preemption.reached(done)
        last = done == config.steps
        save = last or preempted or done % config.checkpoint_every == 0
        if step == job.start:
            jax.block_until_ready(metrics)
            logger.restart_clock(done)  # compilation is not training throughput
        if save or done % config.log_every == 0:
            train_loss = logger.train(done, {k: float(v) for k, v in jax.device_get(metrics).items()})["loss"]
        if last or done % config.eval_every == 0:
            eval_loss = _evaluate(job)
            logger.eval(done, *eval_loss)
        if save:
            nonfinite.settle()  # never save past a diverged step
            position = {"seed": config.seed, "samples_seen": done * config.batch_size}
            job.checkpoints.save(
                done, job.state, {"train_loss": train_loss, "data_position": position, "fingerprint": job.fingerprint}
            )
        if save or done % config.eval_every == 0:
            logger.restart_clock(done)
        if preempted:
            logger.message(f"preempted: saved step {done}; rerun the same command to continue")
            break
    return train_loss, eval_loss if eval_loss is not None else _evaluate(job), preempted


class NonFiniteWatch:
    """Counts the steps in a row whose update was skipped for a non-finite loss or gradient, and stops the run
    (a ValueError) when they reach `limit`. Each step's flag is read one step later, when it is ready."""

    def __init__(self, run_dir: Path, limit: int):
        self.run_dir, self.limit = run_dir, limit
        self.streak: list[int] = []
        self.pending: tuple[int, jax.Array] | None = None

    def observe(self, step: int, skipped: jax.Array) -> None:
        self.settle()
        self.pending = (step, skipped)

    def settle(self) -> None:
        if self.pending is None:
            return
        step, skipped = self.pending
        self.pending = None
        self.streak = self.streak + [step] if float(skipped) else []
        if len(self.streak) >= self.limit:
            raise ValueError(
                f"training diverged: the loss was not finite at steps {self.streak[0]}-{self.streak[-1]}; "
                f"their updates were skipped and nothing after them was saved: {self.run_dir} resumes "
                "from its last checkpoint (try a lower lr, more warmup or grad_clip)"
            )


def _evaluate(job: _Job) -> tuple[float, dict[str, float]]:
    """(loss, other metrics) over the validation rows (the same rows every time): the mean next-token loss;
    for DPO the mean DPO loss of the validation pairs and their mean rewards and reward accuracy."""
    sums: dict[str, float] = {}
    for ids in job.rows.val_rows(job.config.batch_size, job.config.eval_batches):
        batch = global_batch(job.rows, ids.reshape(job.config.grad_accum, -1), job.mesh)
        for name, value in jax.device_get(job.eval_step(job.state, batch)).items():
            sums[name] = sums.get(name, 0.0) + float(value)
    if "pairs" not in sums:
        return sums["nll"] / max(sums["tokens"], 1.0), {}
    pairs = max(sums.pop("pairs"), 1.0)
    means = {name: value / pairs for name, value in sums.items()}
    return means.pop("loss"), means


def _initial_state(config, model_config, start_params, frozen, mesh, optimizer, layout: StateLayout, checkpoints):
    """(state, meta): from the newest intact checkpoint, else init_from's parameters (LoRA: fresh adapters
    on init_from's frozen ones), else a random init."""
    restored = checkpoints.restore_newest_intact(layout.abstract)
    if restored is not None:
        params, opt_state, meta = restored
        step = jax.device_put(np.int32(meta["step"]), layout.shardings.step)
        return TrainState(step, params, opt_state, frozen), meta
    if model_config.lora.enabled:
        params = init_adapters(model_config, mesh, config.seed)
    elif start_params is not None:
        params = start_params
    elif config.init_from is not None:  # every checkpoint of this run was damaged: start again from init_from
        params = read_model_dir(config.init_from).restore_params(layout.abstract.params)
    else:
        params = nnx.to_pure_dict(nnx.state(create_model(model_config, mesh, seed=config.seed)))
    return init_state(params, optimizer, layout.shardings, frozen), {}


def _frozen_base(source, model_config: ModelConfig, mesh, layout: StateLayout) -> dict:
    """LoRA's frozen weights: init_from's, placed as the layout says; int8 with per-channel scales for QLoRA."""
    if model_config.quantize == "none":
        return source.restore_params(layout.abstract.frozen)
    _, abstract = abstract_state(model_config.replace(quantize="none"), mesh)
    full_precision = source.restore_params(split_adapters(nnx.to_pure_dict(abstract))[1])
    return jax.jit(quantize_params, out_shardings=layout.shardings.frozen)(full_precision)


def _peak_flops_total(config: TrainConfig, mesh) -> float | None:
    per_device = flops.peak_flops(mesh.devices.flat[0].device_kind, config.peak_tflops)
    return per_device * mesh.devices.size if per_device else None


def _samples(job: _Job) -> list[dict[str, str]]:
    """A few generations from the trained model (single-process runs: the texts come back to one host)."""
    config = job.config
    if config.samples == 0 or jax.process_count() > 1:
        return []
    model = nnx.merge(job.layout.graphdef, job.state.model_params())
    loaded = LoadedModel(model, job.model_config, job.mesh, job.data.tokenizer, job.chat_template)
    prompts = list(config.sample_prompts or [""])
    prompts = (prompts * config.samples)[: config.samples]
    # A model fine-tuned on chat-formatted records is asked in the same format (as `infer.py --chat`).
    chat = (config.sft or config.objective == "dpo") and job.chat_template is not None
    completions = generate(
        loaded,
        prompts,
        max_new_tokens=config.sample_tokens,
        temperature=SAMPLE_TEMPERATURE,
        seed=config.seed,
        batch_size=len(prompts),
        chat=chat,
    )
    return [{"prompt": prompt, "completion": c.text} for prompt, c in zip(prompts, completions)]
