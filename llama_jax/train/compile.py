"""`train.py --compile-for TARGET`: compile a recipe's train and eval steps for a TPU slice (or several over DCN)
or the GPUs of one host, on any host; for GRPO the train step and the engine's rollout programs.

No data, tokenizer or weights are read: the vocabulary comes from the model config (an init_from directory
contributes its config.json only), the batch and the train state are `jax.ShapeDtypeStruct`s sharded over
the target's devices, and nothing runs on them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llama_jax import flops
from llama_jax.aot import FunctionReport, Workload, compile_function
from llama_jax.attention import choose_implementation
from llama_jax.config import ModelConfig
from llama_jax.hardware import GpuTarget, TpuSlice, target_devices
from llama_jax.inference.compile import compile_engine
from llama_jax.model_dir import read_model_dir
from llama_jax.sharding import make_mesh, mesh_platform
from llama_jax.train.batching import batch_sharding, check_batch_fits_mesh
from llama_jax.train.config import TrainConfig
from llama_jax.train.init_from import build_model_config
from llama_jax.train.objectives import Objective
from llama_jax.train.rollouts import rollout_engine_settings, rollout_positions
from llama_jax.train.state import StateLayout
from llama_jax.train.step import train_steps

# Bytes per parameter the optimizer update moves: the float32 parameter read and written, its float32
# gradient read, AdamW's two float32 moments read and written.
_UPDATE_BYTES_PER_PARAM = 4 + 4 + 4 + 2 * (4 + 4)


def compile_training(config: TrainConfig, target: TpuSlice | GpuTarget) -> list[FunctionReport]:
    mesh = make_mesh(config.mesh, target_devices(target))
    base = read_model_dir(config.init_from).config if config.init_from else None
    model = build_model_config(config, mesh_platform(mesh), base)
    check_batch_fits_mesh(config, mesh)
    steps = train_steps(config, model, mesh)
    sharding = batch_sharding(mesh, steps.batch_shape)
    batch = {
        name: jax.ShapeDtypeStruct(steps.batch_shape, dtype, sharding=sharding)
        for name, dtype in steps.objective.batch_fields.items()
    }
    attention = choose_implementation(model.attention, model.dtype, mesh_platform(mesh))
    reports = [
        compile_function(
            "train_step",
            lambda: steps.train_step.lower(steps.layout.abstract, batch),
            mesh,
            train_workload(model, config, mesh, steps.objective),
            attention,
        )
    ]
    if config.objective == "grpo":  # its evaluation is rollouts of held-out prompts, not the eval step
        return reports + compile_rollouts(config, model, mesh, steps.layout)
    eval_step = compile_function(
        "eval_step",
        lambda: steps.eval_step.lower(steps.layout.abstract, batch),
        mesh,
        eval_workload(model, config, mesh),
        attention,
    )
    return reports + [eval_step]


def compile_rollouts(config: TrainConfig, model: ModelConfig, mesh, layout: StateLayout) -> list[FunctionReport]:
    """GRPO's rollout programs as `rollouts.Rollouts` runs them on the policy's own parameters: the prefill of the
    longest prompt that leaves room for a completion (a step's prompts in one call) and the decode loop of
    batch_size sequences. While they run the optimizer state (and a reference copy, if any) stays in HBM: counted
    in their peak, so "fits" means the rollouts fit beside the train state."""
    max_len = rollout_positions(config, model)
    settings = rollout_engine_settings(config, max_len)
    held = per_chip_bytes(layout.abstract.opt_state) + per_chip_bytes(layout.abstract.reference)
    prompt = max_len - config.grpo.max_completion_length
    reports, _ = compile_engine(model, mesh, settings, [prompt], resident_bytes=held, prefix="rollout_")
    return reports


def per_chip_bytes(tree) -> int:
    """The bytes one chip holds of a tree of sharded ShapeDtypeStructs (the first device's share)."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def train_workload(model: ModelConfig, config: TrainConfig, mesh, objective: Objective) -> Workload:
    """One optimizer step per chip. Each micro-batch reads the layer weights in the forward and again in the
    backward (a third time under full remat): all of them, since FSDP gathers the shards it needs; tensor
    parallelism splits them. Activation traffic is left out, so the time is a lower bound."""
    tokens = config.batch_size * config.seq_len
    chips = mesh.devices.size
    useful = flops.training_flops_per_token(model, config.seq_len) * tokens
    if objective.uses_reference:  # the reference model's forward pass over the same tokens
        useful += flops.forward_flops_per_token(model, config.seq_len) * tokens
    recomputed = flops.remat_flops_per_token(model, config.seq_len) * tokens
    passes = 3 if model.remat == "full" else 2
    params = model.param_count()
    weights = passes * config.grad_accum * params * jnp.dtype(model.param_dtype).itemsize / mesh.shape["tensor"]
    update = params * _UPDATE_BYTES_PER_PARAM / (mesh.shape["fsdp"] * mesh.shape["tensor"])
    return Workload(useful / chips, (useful + recomputed) / chips, weights + update, tokens)


def eval_workload(model: ModelConfig, config: TrainConfig, mesh) -> Workload:
    """One evaluation batch per chip: a forward pass, the weights read once per micro-batch."""
    tokens = config.batch_size * config.seq_len
    forward = flops.forward_flops_per_token(model, config.seq_len) * tokens / mesh.devices.size
    weights = config.grad_accum * model.param_count() * jnp.dtype(model.param_dtype).itemsize / mesh.shape["tensor"]
    return Workload(forward, forward, weights, tokens)
