"""The device mesh, the one table that maps logical axis names onto it, and the activation constraint.

Modules name the axes of every parameter and activation logically (`embed`, `q_heads`, `mlp`, ...).
`LOGICAL_AXIS_RULES` below is the only place that decides which mesh axis shards which logical axis, so
switching between data, FSDP and tensor parallelism is a change of mesh shape, never of model code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llama_jax.config import MESH_AXES, MeshConfig

# logical axis -> mesh axes (a tuple shards over their product; None replicates).
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # activations, caches and data batches
    "length": ("context",),  # a training sequence's tokens: context parallelism (`context_parallel.py`)
    # parameters only: FSDP shards weights along the model dimension, and so do context parallelism's devices
    # (they hold different tokens of the same rows, like FSDP's: MaxText's rule too)
    "embed": ("fsdp", "context"),
    "vocab": ("tensor",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "mlp": ("tensor",),
    "layers": None,
    "lora_rank": None,  # LoRA adapters' rank axis: small, never sharded
}


_AUTO = (AxisType.Auto,) * len(MESH_AXES)  # XLA lays out what the rules do not say, on every axis


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, context, tensor) mesh over all devices, or the given ones (e.g. a TPU slice's, from
    `hardware.target_devices`); `jax.make_mesh` orders them so that neighbours on the mesh are neighbours
    on the chips' interconnect.

    Devices of several TPU slices (a Multislice job, or `--compile-for 2xv5p-128`): `config` describes one
    slice, and the data axis grows by the number of slices, over the data-center network (DCN) — only the
    gradients' reduction crosses it, as MaxText's `dcn_data_parallelism` does."""
    config = config or MeshConfig()
    devices = list(devices) if devices is not None else jax.devices()
    slices = len({getattr(device, "slice_index", 0) for device in devices})
    if slices > 1:
        from jax.experimental import mesh_utils

        if len(devices) % slices:
            raise ValueError(f"{len(devices)} devices do not divide into {slices} equal slices")
        shape = config.shape(len(devices) // slices)
        # Within a slice, mesh axes may split the torus's (as jax.make_mesh lets them, e.g. tensor=2 of a side of 4).
        dcn = (slices,) + (1,) * (len(MESH_AXES) - 1)
        grid = mesh_utils.create_hybrid_device_mesh(shape, dcn, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=_AUTO)
    shape = config.shape(len(devices))
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=_AUTO, devices=devices)
    except (ValueError, NotImplementedError):  # a subset of a host's devices that has no physical layout
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=_AUTO)


def without_context(mesh: Mesh) -> Mesh:
    """The same devices with the context axis folded into fsdp: the mesh a model trained with context parallelism
    generates on (the engine keeps a sequence on one chip). Parameters keep their layout: a weight split over
    (fsdp, context) is split over the folded fsdp axis in the same device order."""
    if mesh.shape["context"] == 1:
        return mesh
    data, fsdp, context, tensor = (mesh.shape[axis] for axis in MESH_AXES)
    devices = mesh.devices.reshape(data, fsdp * context, 1, tensor)
    return Mesh(devices, MESH_AXES, axis_types=_AUTO)


def mesh_slices(mesh: Mesh) -> int:
    """How many TPU slices (DCN-joined) the mesh spans: 1 for one slice, one host or a CPU."""
    return len({getattr(device, "slice_index", 0) for device in mesh.devices.flat})


def mesh_platform(mesh: Mesh) -> str:
    """ "cpu", "gpu" or "tpu": the platform of the mesh's devices, which may not be this host's (a TPU topology
    compiled for on a CPU host). Platform choices read this, never `jax.default_backend()`."""
    return mesh.devices.flat[0].platform


def current_platform() -> str:
    """The platform of the mesh set with `jax.set_mesh` (inside a traced function too), else of the default
    devices: where the computation being built will run."""
    abstract = jax.sharding.get_abstract_mesh()
    device = getattr(abstract, "abstract_device", None)  # JAX >= 0.8: the mesh's device kind and platform
    if not abstract.empty and device is not None:
        return device.platform
    return jax.default_backend()


def in_manual_region() -> bool:
    """Whether the function being traced runs inside a `shard_map` (over some of the mesh's axes)."""
    return bool(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()))


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None
) -> PartitionSpec:
    """PartitionSpec for an array whose axes carry these logical names.

    With a shape and mesh, a mesh axis that does not divide its dimension is dropped (that dimension is
    replicated instead), so e.g. a single KV head still works on a tensor-parallel mesh.
    """
    used: dict[str, str] = {}
    # Inside `shard_map` its manual axes are already split off: the array is one group's, laid out over the rest.
    taken = set(getattr(mesh, "manual_axes", ()) or ())
    spec = []
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in LOGICAL_AXIS_RULES:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(LOGICAL_AXIS_RULES)}")
        axes = []
        for axis in LOGICAL_AXIS_RULES[name] or ():
            if axis in used:
                raise ValueError(
                    f"logical axes {used[axis]!r} and {name!r} of {tuple(names)} both map to mesh axis {axis!r}"
                )
            used[axis] = name
            size = mesh.shape[axis] if mesh is not None and axis not in taken else 1
            if size > 1 and (shape is None or shape[i] % (size * math.prod(mesh.shape[a] for a in axes)) == 0):
                axes.append(axis)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


def global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """`host`, the same on every process, as an array laid out by `sharding`: each process places only the
    pieces its own devices hold, so the sharding may span the devices of several hosts (where `device_put`
    would need them all)."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds all of it: what each process of a job can read whole on its own."""
    return NamedSharding(mesh, PartitionSpec())


def shard(x: jax.Array, *names: str | None) -> jax.Array:
    """Constrain an activation's sharding by logical axis names, under the mesh set with `jax.set_mesh`.

    Always applied when a mesh is set, on every platform, so CPU tests with fake devices exercise the
    same constraints as a TPU pod. Without any mesh (plain eager use in a notebook) there is nothing to
    constrain against.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"shard: {len(names)} names {names} for an array of rank {x.ndim}")
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def param_shardings(abstract_state, mesh: Mesh):
    """NamedShardings for an `nnx.State` whose Variables carry logical names in `out_sharding`."""

    def one(variable):
        names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
        return variable.replace(named_sharding(mesh, names, variable.shape))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
