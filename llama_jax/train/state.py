"""The train state: a pytree of the trained parameters, the optimizer's state and the step, with its layout
over the mesh.

The state is a registered dataclass of plain pytrees (the parameter dict as `nnx.to_pure_dict` gives it,
optax state, step counter) so it goes straight into `jax.jit` and orbax; the model module is rebuilt
inside the trace by `nnx.merge`.

With LoRA (`config.lora`), `params` are the adapters alone, the only values with gradients and optimizer
moments; the frozen base weights ride along in `frozen`, read but never differentiated, updated or saved.

An objective with a reference model (DPO, `objectives.py`) scores against init_from: with LoRA the same
frozen base with the adapters off (their B matrices zero: no second copy of the weights), without it a copy
of init_from's parameters in `reference`, sharded like the policy and, like `frozen`, never saved (a resumed
run reads it from init_from again). The copy costs 4 bytes a parameter, a quarter of what AdamW's state
already holds; reference log-probabilities computed once before training would save it but tie a stored
array to the corpus, the tokenizer and seq_len, and cost an extra pass first.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.config import ModelConfig
from llama_jax.lora import join, split_adapters
from llama_jax.model import abstract_state


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict  # the trained parameters, a pure dict (nnx.to_pure_dict layout): all, or LoRA's adapters
    opt_state: Any
    frozen: dict = dataclasses.field(default_factory=dict)  # LoRA's base weights: never updated or saved
    reference: dict = dataclasses.field(default_factory=dict)  # a reference copy without LoRA: never saved

    def model_params(self) -> dict:
        """Every parameter of the model (the trained ones joined with the frozen ones)."""
        return join(self.frozen, self.params)

    def reference_params(self) -> dict:
        """The reference model: init_from's parameters, or with LoRA the frozen base with the adapters off."""
        if self.reference:
            return self.reference
        return join(self.frozen, jax.tree.map(jnp.zeros_like, self.params))


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """The model's graph and the train state's shapes and shardings: built once per run, used by every step
    function, the initialisation and the checkpoint restore."""

    graphdef: nnx.GraphDef
    abstract: TrainState  # jax.ShapeDtypeStruct leaves, with their shardings
    shardings: TrainState  # the NamedShardings alone


def state_layout(
    config: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh, reference: bool = False
) -> StateLayout:
    """The layout of a train state for `config` on `mesh`. Optimizer moments are sharded like their
    parameters; scalars (counters) are replicated. `reference`: a reference copy of the parameters (full
    fine-tuning; with LoRA the frozen base serves). Nothing touches a device, so `mesh` may hold the devices
    of a TPU topology that this host does not have."""
    graphdef, abstract = abstract_state(config, mesh)
    params = nnx.to_pure_dict(abstract)
    params, frozen = split_adapters(params) if config.lora.enabled else (params, {})
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Shapes without shardings: eval_shape would otherwise look for the shardings' devices on this host.
    opt_abstract = jax.eval_shape(
        optimizer.init, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    )
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, s: s, opt_abstract, param_shardings, transform_non_params=lambda _: replicated
    )
    reference_params = params if reference and not config.lora.enabled else {}
    shardings = TrainState(
        replicated,
        param_shardings,
        opt_shardings,
        jax.tree.map(lambda a: a.sharding, frozen),
        jax.tree.map(lambda a: a.sharding, reference_params),
    )
    abstract_train = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        params,
        jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_abstract, opt_shardings),
        frozen,
        reference_params,
    )
    return StateLayout(graphdef, abstract_train, shardings)


def init_state(
    params: dict,
    optimizer: optax.GradientTransformation,
    shardings: TrainState,
    frozen: dict | None = None,
    reference: dict | None = None,
) -> TrainState:
    """A fresh TrainState around `params` (already placed), the optimizer state created in place."""
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.int32(0), shardings.step)
    return TrainState(step, params, opt_state, frozen or {}, reference or {})
