"""A training job from a TrainConfig: data, model, resume, the step loop, evaluation, checkpoints, samples.

`run(config)` is what `python train.py` runs; it returns the final report (step, losses, checkpoint).
Rerunning it with the same settings and run_dir continues from the newest checkpoint, and because every
batch is a function of (seed, step) alone the continued job computes exactly what an uninterrupted one
would. All processes of a multi-host job run it in lockstep; only the first writes files and logs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
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
from llama_jax.sharding import without_context
from llama_jax.train.batching import global_batch, host_batch
from llama_jax.train.checkpoints import TrainingCheckpoints
from llama_jax.train.config import TrainConfig
from llama_jax.train.inputs import Inputs, read_inputs
from llama_jax.train.metrics import TrainLogger
from llama_jax.train.multihost import PreemptionNotice
from llama_jax.train.rollouts import Rollouts, rollout_positions
from llama_jax.train.run_dir import RunFiles, has_checkpoints, open_run_dir, run_fingerprint
from llama_jax.train.state import StateLayout, TrainState, init_state
from llama_jax.train.step import TrainSteps, train_steps

SAMPLE_TEMPERATURE = 0.8
# Steps in a row whose loss or gradient is not finite (their updates skipped) before the run gives up: one
# bad batch is weathered, a diverged run stops before it saves again.
MAX_NONFINITE_STEPS = 3


@dataclasses.dataclass(frozen=True)
class _InitFromWeights:
    """init_from's parameters as the job uses them, read (and checked) before the run directory exists."""

    frozen: dict  # LoRA's frozen base (int8 for QLoRA); {} without LoRA
    reference: dict  # the reference model's copy (an objective with one, without LoRA); else {}
    start: dict | None  # full fine-tuning's starting parameters; None with LoRA, from scratch, or resuming


@dataclasses.dataclass(frozen=True)
class _Job:
    """One training job: what it read, its steps, its checkpoints and the fingerprint saved with them."""

    inputs: Inputs
    steps: TrainSteps
    checkpoints: TrainingCheckpoints
    fingerprint: dict[str, Any]
    rollouts: Rollouts | None  # GRPO's: the batches are the policy's own completions


@dataclasses.dataclass(frozen=True)
class _Start:
    """Where the job starts: its state (restored or fresh), the step and the train loss saved with it."""

    state: TrainState
    step: int
    train_loss: float | None


def run(config: TrainConfig) -> dict[str, Any]:
    """Check everything and tokenize the data, then create (or check) and lock the run directory, create or
    resume the state and train. Nothing is written before every check has passed."""
    inputs = read_inputs(config)
    config = inputs.config
    steps = train_steps(config, inputs.model_config, inputs.mesh)
    fingerprint = run_fingerprint(config, inputs.model_config, inputs.data_key)
    weights = _init_from_weights(inputs, steps.layout)
    lock = _open_run_dir(inputs, fingerprint)
    rollouts = None
    if inputs.prompts is not None:
        positions = rollout_positions(config, inputs.model_config)
        rollouts = Rollouts(
            inputs.prompts, inputs.rewards, config, inputs.chat_template, positions, inputs.shared_prompt
        )
    checkpoints = TrainingCheckpoints(inputs.run_dir, config.keep_checkpoints)
    job = _Job(inputs, steps, checkpoints, fingerprint, rollouts)
    start = _start(job, weights)
    logger = TrainLogger(
        inputs.run_dir,
        enabled=jax.process_index() == 0,
        steps=config.steps,
        start_step=start.step,
        tokens_per_step=config.batch_size * config.seq_len,
        flops_per_token=flops.training_flops_per_token(inputs.model_config, config.seq_len),
        peak_flops_total=_peak_flops_total(config, inputs.mesh),
    )
    for line in _introduction(inputs, start):
        logger.message(line)
    with jax.set_mesh(inputs.mesh), PreemptionNotice() as preemption:
        failed = True
        try:
            state, train_loss, (eval_loss, eval_metrics), preempted = _loop(job, start, logger, preemption)
            failed = False
        finally:  # a diverged run still finishes writing the checkpoints it started
            _close_run(job, logger, lock, failed)
    samples = [] if preempted else _samples(job, state)
    return {
        "step": int(jax.device_get(state.step)),
        "train_loss": train_loss,
        "eval_loss": eval_loss,
        # A DPO loss is no next-token loss (its evaluation reports the pairs' rewards), and GRPO has none.
        "eval_perplexity": None if eval_metrics or eval_loss is None else math.exp(min(eval_loss, 700.0)),
        **{f"eval_{name}": value for name, value in eval_metrics.items()},
        "vocab_size": inputs.model_config.vocab_size,
        "checkpoint": str(inputs.run_dir),
        "checkpoint_step": job.checkpoints.latest_step(),
        "preempted": preempted,
        "samples": samples,
    }


def _close_run(job: _Job, logger: TrainLogger, lock: TextIO | None, failed: bool) -> None:
    """Finish the checkpoint saves the run started, close its logs and unlock its directory, each even when
    one before it fails. The first error is the one raised, and none after a failed run: its own error says
    what went wrong (a full disk fails every write after it)."""
    closing = [job.checkpoints.wait, job.checkpoints.close, functools.partial(logger.close, plot=not failed)]
    first_error = None
    for close in closing + ([lock.close] if lock is not None else []):
        try:
            close()
        except Exception as error:
            first_error = first_error or error
    if first_error is not None and not failed:
        raise first_error


def _init_from_weights(inputs: Inputs, layout: StateLayout) -> _InitFromWeights:
    """init_from's parameters are read (and checked) before the run directory exists, unless it will resume.
    LoRA freezes them (all of them, every run); full fine-tuning starts from them."""
    source, model_config = inputs.source, inputs.model_config
    lora = model_config.lora.enabled
    frozen = _frozen_base(source, model_config, inputs.mesh, layout) if lora else {}
    # A reference model without LoRA: init_from's parameters, read again on every start (they are never saved).
    reference = source.restore_params(layout.abstract.reference) if layout.abstract.reference else {}
    resumes = has_checkpoints(inputs.run_dir)
    start = source.restore_params(layout.abstract.params) if source is not None and not lora and not resumes else None
    return _InitFromWeights(frozen, reference, start)


def _open_run_dir(inputs: Inputs, fingerprint: dict[str, Any]) -> TextIO | None:
    """Create the run directory (or check that it holds this run) and lock it: the first process does, and
    holds the returned lock until the job ends; every process waits until it is done."""
    lock = None
    if jax.process_index() == 0:
        config, model_config = inputs.config, inputs.model_config
        lora_base = Path(config.init_from) if model_config.lora.enabled else None
        files = RunFiles(
            model_config,
            inputs.tokenizer_path,
            inputs.tokenizer.file_name,
            inputs.chat_template,
            config.to_dict(),
            fingerprint,
            lora_base,
        )
        lock = open_run_dir(inputs.run_dir, files)
    multihost_utils.sync_global_devices("run_dir ready")
    return lock


def _start(job: _Job, weights: _InitFromWeights) -> _Start:
    """From the newest intact checkpoint, else init_from's parameters (LoRA: fresh adapters on init_from's
    frozen ones), else a random init."""
    inputs, layout = job.inputs, job.steps.layout
    restored = job.checkpoints.restore_newest_intact(layout.abstract)
    if restored is not None:
        params, opt_state, meta = restored
        step = jax.device_put(np.int32(meta["step"]), layout.shardings.step)
        state = TrainState(step, params, opt_state, weights.frozen, weights.reference)
        return _Start(state, int(meta["step"]), meta.get("train_loss"))
    config, model_config = inputs.config, inputs.model_config
    if model_config.lora.enabled:
        params = init_adapters(model_config, inputs.mesh, config.seed)
    elif weights.start is not None:
        params = weights.start
    elif config.init_from is not None:  # every checkpoint of this run was damaged: start again from init_from
        params = read_model_dir(config.init_from).restore_params(layout.abstract.params)
    else:
        params = nnx.to_pure_dict(nnx.state(create_model(model_config, inputs.mesh, seed=config.seed)))
    state = init_state(params, job.steps.optimizer, layout.shardings, weights.frozen, weights.reference)
    return _Start(state, 0, None)


def _introduction(inputs: Inputs, start: _Start) -> list[str]:
    """The run's first lines: the model, what it trains, the data and where it starts."""
    config, model_config, rows = inputs.config, inputs.model_config, inputs.rows
    trained = ""
    if model_config.lora.enabled:
        adapters = sum(a.size for a in jax.tree.leaves(start.state.params))
        trained = f" (LoRA rank {model_config.lora_rank}: {adapters:,} trained, the rest frozen)"
    if rows is None:
        group = config.grpo.num_generations
        layout = f"a prompt and its {group} completions a row" if inputs.shared_prompt else "one completion a row"
        data = f"{inputs.prompts.describe()}; {layout}"
    else:
        data = (
            f"{rows.corpus.n_tokens:,} tokens in {rows.n_train} training and {rows.n_val} validation rows of "
            f"{config.seq_len}"
        )
    resuming = f"; resuming at step {start.step}" if start.step else ""
    lines = [f"{inputs.run_dir}: {model_config.param_count():,} parameters{trained}, {data}{resuming}"]
    if rows is not None and rows.supervision is not None:
        lines.append(f"{'DPO' if rows.pairs else 'SFT'}: {rows.describe_supervision()}")
    return lines


def _loop(
    job: _Job, start: _Start, logger: TrainLogger, preemption: PreemptionNotice
) -> tuple[TrainState, float | None, tuple[float, dict[str, float]], bool]:
    """Train from the start to config.steps (or a preemption): (the state, the last train loss, the last
    evaluation, preempted)."""
    config = job.inputs.config
    state, train_loss, evaluation, preempted = start.state, start.train_loss, None, False
    nonfinite = NonFiniteWatch(job.inputs.run_dir, MAX_NONFINITE_STEPS)
    if job.rollouts is not None and start.step == 0:  # GRPO's curve starts from the model it was given
        logger.eval(0, *_evaluate(job, state))
        logger.restart_clock(0)
    for step in range(start.step, config.steps):
        batch, rollout_metrics = _train_batch(job, state, step)
        state, metrics = job.steps.train_step(state, batch)
        done = step + 1
        nonfinite.observe(done, metrics["skipped"])  # the previous step's flag: the device stays busy
        logger.advance()
        preempted = preemption.reached(done)
        last = done == config.steps
        save = last or preempted or done % config.checkpoint_every == 0
        if step == start.step:
            jax.block_until_ready(metrics)
            logger.restart_clock(done)  # compilation is not training throughput
        if save or done % config.log_every == 0:
            job.checkpoints.check()  # a save in the background failed: stop now, not at the next save
            step_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            train_loss = logger.train(done, step_metrics | rollout_metrics)["loss"]
        if last or done % config.eval_every == 0:
            evaluation = _evaluate(job, state)
            logger.eval(done, *evaluation)
        if save:
            nonfinite.settle()  # never save past a diverged step
            position = {"seed": config.seed, "samples_seen": done * config.batch_size}
            job.checkpoints.save(
                done, state, {"train_loss": train_loss, "data_position": position, "fingerprint": job.fingerprint}
            )
        if save or done % config.eval_every == 0:
            logger.restart_clock(done)
        if preempted:
            logger.message(f"preempted: saved step {done}; rerun the same command to continue")
            break
    if evaluation is None:  # a preempted GRPO run does not spend its notice generating: its checkpoint is written
        evaluation = (None, {}) if preempted and job.rollouts is not None else _evaluate(job, state)
    return state, train_loss, evaluation, preempted


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


def _train_batch(job: _Job, state: TrainState, step: int) -> tuple[dict[str, jax.Array], dict[str, float]]:
    """Step `step`'s batch, a function of (seed, step) — for GRPO also of the parameters, which sample it — and
    what its making measured (GRPO's rewards and rollout time; nothing otherwise)."""
    config, mesh = job.inputs.config, job.inputs.mesh
    if job.rollouts is not None:
        # The rollout reads the parameters the last step makes: waiting for them here (it would wait anyway)
        # keeps its rollout_s the rollout's own time.
        jax.block_until_ready(state.params)
        rollout = job.rollouts.collect(_policy(job, state), step)
        return host_batch(rollout.fields, mesh), rollout.metrics
    rows = job.inputs.rows
    ids = rows.train_rows(step, config.batch_size, config.seed).reshape(config.grad_accum, -1)
    return global_batch(rows, ids, mesh), {}


def _evaluate(job: _Job, state: TrainState) -> tuple[float | None, dict[str, float]]:
    """(loss, other metrics) over the validation rows (the same rows every time), as the objective reports
    them: the mean next-token loss; for DPO the mean DPO loss of the validation pairs and their mean rewards
    and reward accuracy. The eval step sums each batch; the sums of all batches are added here. GRPO has no loss
    to evaluate: its held-out prompts' greedy completions are scored by the rewards (loss None)."""
    if job.rollouts is not None:
        return None, job.rollouts.evaluate(_policy(job, state))
    config, rows = job.inputs.config, job.inputs.rows
    sums: dict[str, float] = {}
    for ids in rows.val_rows(config.batch_size, config.eval_batches):
        batch = global_batch(rows, ids.reshape(config.grad_accum, -1), job.inputs.mesh)
        for name, value in jax.device_get(job.steps.eval_step(state, batch)).items():
            sums[name] = sums.get(name, 0.0) + float(value)
    return job.steps.objective.eval_metrics(sums)


def _policy(job: _Job, state: TrainState) -> LoadedModel:
    """The model being trained as the engine runs it, on the state's own arrays (no copy): with LoRA the frozen
    base and the adapters as trained. Trained with context parallelism, it runs on the same chips with the
    context axis folded into fsdp (`sharding.without_context`), its arrays laid out again for that mesh."""
    inputs = job.inputs
    mesh, params = without_context(inputs.mesh), state.model_params()
    if mesh is not inputs.mesh:
        _, abstract = abstract_state(inputs.model_config, mesh)
        params = jax.device_put(params, jax.tree.map(lambda a: a.sharding, nnx.to_pure_dict(abstract)))
    model = nnx.merge(job.steps.layout.graphdef, params)
    return LoadedModel(model, inputs.model_config, mesh, inputs.tokenizer, inputs.chat_template)


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


def _samples(job: _Job, state: TrainState) -> list[dict[str, str]]:
    """A few generations from the trained model. Every process of a multi-host job runs the same engine steps
    (the parameters span their devices) and reads the same texts back."""
    inputs, config = job.inputs, job.inputs.config
    if config.samples == 0:
        return []
    loaded = _policy(job, state)
    prompts = list(config.sample_prompts or [""])
    prompts = (prompts * config.samples)[: config.samples]
    # A model fine-tuned on chat-formatted records is asked in the same format (as `infer.py --chat`).
    chat = (config.sft or config.objective != "lm") and inputs.chat_template is not None
    completions = generate(
        loaded,
        prompts,
        max_new_tokens=config.sample_tokens,
        temperature=SAMPLE_TEMPERATURE,
        seed=config.seed,
        max_num_seqs=len(prompts),
        chat=chat,
    )
    return [{"prompt": prompt, "completion": c.text} for prompt, c in zip(prompts, completions)]
