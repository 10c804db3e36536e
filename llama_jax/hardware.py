"""The hardware we plan for: each chip's peak FLOP/s, HBM size and bandwidth, and Cloud TPU slices by name.

    chip_spec("TPU v5 lite")        -> ChipSpec(v5e: 197 TFLOP/s bf16, 16 GiB at 819 GB/s)
    slice_devices("v5p-128")        -> the 64 chips of a v5p-128, as compile-only devices (needs libtpu, no TPU)

Slice names are Google Cloud's: v4-N and v5p-N count TensorCores (two per chip, one JAX device per chip),
v5e-N and v6e-N count chips. `slice_devices` asks libtpu for the slice's topology, so programs compile for
it on any host (`jax.experimental.topologies`; MaxText's train_compile.py does the same).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    name: str
    peak_bf16_flops: float  # dense, per JAX device (a megacore v4/v5p chip is one device)
    hbm_bytes: int  # the data sheet's HBM per device
    hbm_bandwidth: float  # bytes/s


GiB = 2**30

# Vendors' data sheets (Cloud TPU system architecture pages; NVIDIA H100/H200/A100/L4 data sheets).
# Keys are JAX `device_kind` strings: a v5p reports "TPU v5", a v5e "TPU v5 lite", a v6e "TPU v6 lite".
CHIPS = {
    "TPU v4": ChipSpec("v4", 275e12, 32 * GiB, 1228e9),
    "TPU v5 lite": ChipSpec("v5e", 197e12, 16 * GiB, 819e9),
    "TPU v5": ChipSpec("v5p", 459e12, 95 * GiB, 2765e9),
    "TPU v6 lite": ChipSpec("v6e", 918e12, 32 * GiB, 1640e9),
    "H100": ChipSpec("H100 SXM", 989e12, 80 * GiB, 3350e9),
    "H100 PCIe": ChipSpec("H100 PCIe", 756e12, 80 * GiB, 2000e9),
    "H200": ChipSpec("H200", 989e12, 141 * GiB, 4800e9),
    "A100": ChipSpec("A100", 312e12, 80 * GiB, 2039e9),
    "L4": ChipSpec("L4", 121e12, 24 * GiB, 300e9),
}


def chip_spec(device_kind: str) -> ChipSpec | None:
    """The spec of a device kind: the longest table key it contains ("TPU v5 lite" is not read as
    "TPU v5", "H100 PCIe" not as "H100"); None for kinds we have no data for (CPUs)."""
    matches = [key for key in CHIPS if key.lower() in device_kind.lower()]
    return CHIPS[max(matches, key=len)] if matches else None


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """How libtpu's `get_topology_desc` builds a slice's devices."""

    name: str
    topology: str  # e.g. "v5e:4x4", "v5p:4x4x8"
    chip_config: str  # "megacore": one device per v4/v5p chip (both TensorCores)
    chips_per_host: tuple[int, int, int]
    wrap: tuple[bool, bool, bool]  # torus links per dimension

    @property
    def chips(self) -> int:
        return math.prod(int(d) for d in self.topology.split(":")[1].split("x"))


# v5e and v6e (2-D): chips -> (topology, wraparound links), as Google Cloud defines the pod slices.
_2D_SHAPES = {
    1: ("1x1", (False,) * 3),
    4: ("2x2", (False,) * 3),
    8: ("2x4", (False,) * 3),
    16: ("4x4", (False,) * 3),
    32: ("4x8", (False,) * 3),
    64: ("8x8", (False,) * 3),
    128: ("8x16", (False, True, False)),
    256: ("16x16", (True, True, False)),
}
# v4 and v5p (3-D) below a full 4x4x4 cube.
_3D_SMALL = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4"}
_SLICE_NAME = re.compile(r"(v4|v5p|v5e|v6e)-(\d+)")


def tpu_slice(name: str) -> TpuSlice:
    """The slice called `name` ("v5p-128"); ValueError naming the accepted forms otherwise."""
    match = _SLICE_NAME.fullmatch(name.strip().lower())
    if match is None:
        raise ValueError(
            f"unknown TPU slice {name!r}: expected v4-N, v5p-N (N TensorCores), v5e-N or v6e-N "
            "(N chips), e.g. v5p-128, v5e-16"
        )
    generation, count = match.group(1), int(match.group(2))
    if generation in ("v5e", "v6e"):
        if count not in _2D_SHAPES:
            raise ValueError(f"no {generation} slice of {count} chips; sizes: {', '.join(map(str, _2D_SHAPES))}")
        shape, wrap = _2D_SHAPES[count]
        return TpuSlice(name, f"{generation}:{shape}", "default", (1, 1, 1) if count == 1 else (2, 2, 1), wrap)
    chips, odd = divmod(count, 2)
    shape = _3D_SMALL.get(chips) or (_torus_shape(chips) if not odd else None)
    if shape is None:
        raise ValueError(
            f"no {generation} slice of {count} TensorCores: sizes are 8, 16, 32, 64, then multiples of 128"
        )
    wrap = (chips >= 64,) * 3
    return TpuSlice(name, f"{generation}:{shape}", "megacore", (2, 2, 1), wrap)


def _torus_shape(chips: int) -> str | None:
    """A full-torus v4/v5p shape: sides that are multiples of 4, as close to a cube as the count allows
    (320 chips -> 4x4x20, 576 -> 4x12x12), the way Google Cloud shapes its larger slices."""
    if chips % 64:
        return None
    cubes = chips // 64
    best = min(
        (
            (a, b, cubes // (a * b))
            for a in range(1, cubes + 1)
            for b in range(a, cubes + 1)
            if cubes % (a * b) == 0 and cubes // (a * b) >= b
        ),
        key=lambda s: (s[2], s[1]),
    )
    return "x".join(str(4 * side) for side in best)


def has_tpu() -> bool:
    """Whether this host has TPU chips (a TPU VM exposes /dev/accel* or /dev/vfio)."""
    return os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio")


def quiet_libtpu_without_tpu() -> None:
    """On a host without TPU chips, where libtpu (the `tpu` extra) can only compile: let several processes
    load it (its lock guards chips that are not there) and name an accelerator, or its start-up prints
    lines about what it cannot detect. Before JAX starts; nothing changes on a TPU VM."""
    if not has_tpu():
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")


def slice_devices(tpu: TpuSlice) -> list:
    """The slice's devices as compile-only TPU devices: `jax.jit(f).lower(...).compile()` builds the real TPU
    program for them on a host without a TPU. Needs libtpu (the `tpu` extra: `pip install -e ".[tpu]"`)."""
    # Imported here, not above: command lines read this module before they load JAX (`--help` stays fast).
    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(
            f'compiling for {tpu.name} needs libtpu: pip install -e ".[tpu]" '
            '(or pip install "jax[tpu]==<your jax version>")'
        )
    quiet_libtpu_without_tpu()
    topology = topologies.get_topology_desc(
        platform="tpu",
        topology_name=tpu.topology,
        chip_config_name=tpu.chip_config,
        chips_per_host_bounds=tpu.chips_per_host,
        num_slices=1,
        wrap=tpu.wrap,
    )
    return list(topology.devices)
