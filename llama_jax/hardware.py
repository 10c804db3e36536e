"""The hardware we plan for: each chip's peak FLOP/s, HBM size and bandwidth, and what `--compile-for` names.

    chip_spec("TPU v5 lite")          -> ChipSpec(v5e: 197 TFLOP/s bf16, 16 GiB at 819 GB/s)
    target_devices(compile_target("v5p-128"))    -> the 64 chips of a v5p-128, compile-only (libtpu, no TPU)
    target_devices(compile_target("2xv5p-128"))  -> two such slices joined over DCN (a Multislice job)
    target_devices(compile_target("8xH100"))     -> 8 H100s of one host, compile-only (JAX's CUDA plugin, no GPU)

Slice names are Google Cloud's: v4-N and v5p-N count TensorCores (two per chip, one JAX device per chip),
v5e-N and v6e-N count chips. libtpu builds a slice's topology, and XLA's GPU compiler a GPU's from a
GpuTargetConfig (the device description a GPU would report), so programs compile for either on any host
(`jax.experimental.topologies`; MaxText's train_compile.py does the same).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from pathlib import Path


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
    topology: str  # one slice's, e.g. "v5e:4x4", "v5p:4x4x8"
    chip_config: str  # "megacore": one device per v4/v5p chip (both TensorCores)
    chips_per_host: tuple[int, int, int]
    wrap: tuple[bool, bool, bool]  # torus links per dimension
    slices: int = 1  # "2xv5p-128": slices joined over the data-center network (DCN), a Multislice job

    @property
    def chips_per_slice(self) -> int:
        return math.prod(int(d) for d in self.topology.split(":")[1].split("x"))

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.slices

    @property
    def hosts(self) -> int:
        """The TPU VMs of the job: one process each (a command runs on every worker)."""
        return self.chips // math.prod(self.chips_per_host)

    def describe(self) -> str:
        one = f"{self.chips_per_slice} chips ({self.topology})"
        hosts = f", {self.hosts} hosts" if self.hosts > 1 else ""
        return one + hosts if self.slices == 1 else f"{self.slices} slices of {one} over DCN, {self.chips} chips{hosts}"


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
_SLICE_NAME = re.compile(r"(?:(\d+)x)?(v4|v5p|v5e|v6e)-(\d+)")


def tpu_slice(name: str) -> TpuSlice:
    """The slice called `name` ("v5p-128"), or N of them joined over DCN ("2xv5p-128"); ValueError naming the
    accepted forms otherwise."""
    match = _SLICE_NAME.fullmatch(name.strip().lower())
    if match is None or int(match.group(1) or 1) < 1:
        raise ValueError(
            f"unknown TPU slice {name!r}: expected v4-N, v5p-N (N TensorCores), v5e-N or v6e-N "
            "(N chips), e.g. v5p-128, v5e-16, or several of one over DCN, e.g. 2xv5p-128"
        )
    one = _one_slice(match.group(2), int(match.group(3)))
    slices = int(match.group(1) or 1)
    return one if slices == 1 else dataclasses.replace(one, name=f"{slices}x{one.name}", slices=slices)


def _one_slice(generation: str, count: int) -> TpuSlice:
    name = f"{generation}-{count}"
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


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """`--compile-for 8xH100`: `count` GPUs of one host (NVLink), compiled for through XLA's GpuTargetConfig."""

    name: str  # "8xH100"
    gpu: str  # a GPU_DEVICES key: "H100", "H200"
    count: int
    slices: int = 1  # one host: no DCN axis

    @property
    def chips(self) -> int:
        return self.count

    hosts = 1

    def describe(self) -> str:
        return f"{self.count} × {self.gpu} of one host"


@dataclasses.dataclass(frozen=True)
class GpuDevice:
    """What XLA's GPU compiler reads of a device (its GpuDeviceInfoProto), from the vendor's data sheet."""

    compute_capability: tuple[int, int]
    sms: int
    memory_bytes: int  # what the driver reports (nvidia-smi's total)
    bandwidth: float  # bytes/s
    l2_bytes: int
    clock_ghz: float


MiB = 2**20
# NVIDIA H100 SXM5 and H200 SXM data sheets: one Hopper die (sm_90, 132 SMs, 50 MiB L2, 1.98 GHz boost) with
# 80 GB of HBM3 at 3.35 TB/s or 141 GB of HBM3e at 4.8 TB/s; memory sizes as nvidia-smi reports them.
GPU_DEVICES = {
    "H100": GpuDevice((9, 0), 132, 81559 * MiB, 3.35e12, 50 * MiB, 1.98),
    "H200": GpuDevice((9, 0), 132, 143771 * MiB, 4.8e12, 50 * MiB, 1.98),
}
_GPU_TARGET = re.compile(r"(\d+)x(h100|h200)")
GPUS_PER_HOST = 8  # an HGX board; more GPUs are more hosts, which --compile-for does not model
# JAX's GPU client takes this share of the memory at start-up (XLA_PYTHON_CLIENT_MEM_FRACTION) and allocates
# every buffer from it: what a program may use.
DEFAULT_GPU_MEMORY_FRACTION = 0.75
CUDA_PLUGIN_MISSING = (
    'compiling for NVIDIA GPUs needs JAX\'s CUDA plugin: pip install -e ".[gpu-compile]" '
    '(or pip install "jax[cuda12]==<your jax version>")'
)


def gpu_target(name: str) -> GpuTarget | None:
    """The GPU target called `name` ("8xH100"); None for names of another form (TPU slices)."""
    match = _GPU_TARGET.fullmatch(name.strip().lower())
    if match is None:
        return None
    count = int(match.group(1))
    if not 1 <= count <= GPUS_PER_HOST:
        raise ValueError(f"{name}: 1 to {GPUS_PER_HOST} GPUs of one host, e.g. 1xH100, 8xH100, 8xH200")
    return GpuTarget(f"{count}x{match.group(2).upper()}", match.group(2).upper(), count)


def compile_target(name: str) -> TpuSlice | GpuTarget:
    """What `--compile-for NAME` compiles for: NxH100 / NxH200 GPUs of one host, or a TPU slice (or N of one)."""
    gpus = gpu_target(name)
    if gpus is not None:
        return gpus
    try:
        return tpu_slice(name)
    except ValueError as e:
        raise ValueError(f"{e}; or the GPUs of one host, e.g. 1xH100, 8xH100, 8xH200") from None


def target_devices(target: TpuSlice | GpuTarget) -> list:
    """The target's devices as compile-only devices: `jax.jit(f).lower(...).compile()` builds the real program
    for them on a host that has none of them."""
    return gpu_devices(target) if isinstance(target, GpuTarget) else slice_devices(target)


def gpu_target_config(gpu: str) -> str:
    """The GpuTargetConfig text proto (the form of XLA's `xla/tools/hlo_opt/gpu_specs/`) XLA compiles for `gpu`
    with; the CUDA and cuDNN versions are the installed wheels', the ones the program will run with."""
    device = GPU_DEVICES[gpu]
    shared_per_sm = 228 * 1024  # Hopper; a block may opt in to 227 KiB of it
    return f"""gpu_device_info {{
  cuda_compute_capability {{ major: {device.compute_capability[0]} minor: {device.compute_capability[1]} }}
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: {shared_per_sm - 1024}
  shared_memory_per_core: {shared_per_sm}
  threads_per_core_limit: 2048
  core_count: {device.sms}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(device.bandwidth)}
  l2_cache_size: {device.l2_bytes}
  clock_rate_ghz: {device.clock_ghz}
  device_memory_size: {device.memory_bytes}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ {_version_fields("nvidia-cudnn-cu12")} }}
runtime_version {{ {_version_fields("nvidia-cuda-runtime-cu12")} }}
device_description_str: "{gpu}"
"""


def _version_fields(distribution: str) -> str:
    """ "major: 9 minor: 8 patch: 0" of an installed wheel (the CUDA plugin's dependencies)."""
    from importlib import metadata

    try:
        numbers = [int(n) for n in metadata.version(distribution).split(".")[:3]]
    except (metadata.PackageNotFoundError, ValueError):
        raise ValueError(CUDA_PLUGIN_MISSING) from None
    return " ".join(f"{field}: {n}" for field, n in zip(("major", "minor", "patch"), numbers))


def gpu_devices(target: GpuTarget) -> list:
    """`target`'s GPUs as compile-only devices (JAX's CUDA plugin installed; no GPU needed)."""
    from jax.experimental import topologies

    if not has_cuda_plugin():
        raise ValueError(CUDA_PLUGIN_MISSING)
    topology = topologies.get_topology_desc(
        platform="cuda", topology=f"1x1x{target.count}", target_config=gpu_target_config(target.gpu)
    )
    return list(topology.devices)


def gpu_memory_fraction() -> float:
    """The share of a GPU's memory JAX's client will allocate from (XLA_PYTHON_CLIENT_MEM_FRACTION, else JAX's
    default 0.75)."""
    value = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")
    try:
        fraction = float(value) if value else DEFAULT_GPU_MEMORY_FRACTION
    except ValueError:
        raise ValueError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={value!r} is not a number") from None
    if not 0 < fraction <= 1:
        raise ValueError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={value!r} is not in (0, 1]")
    return fraction


def has_cuda_plugin() -> bool:
    """Whether JAX's CUDA plugin (`jax[cuda12]`, the `gpu-compile` extra) is installed."""
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


def has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidiactl")


def has_tpu() -> bool:
    """Whether this host has TPU chips (a TPU VM exposes /dev/accel* or /dev/vfio)."""
    return os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio")


def quiet_libtpu_without_tpu() -> None:
    """On a host without TPU chips, where libtpu (the `tpu` extra) can only compile: let several processes
    load it (its lock guards chips that are not there) and name an accelerator, or its start-up prints
    lines about what it cannot detect. On a host with neither TPUs nor NVIDIA GPUs but JAX's CUDA plugin (the
    `gpu-compile` extra), JAX would try to start CUDA and print the failure's traceback: it runs on the CPU
    (compiling for GPUs and TPUs still works). Before JAX starts; nothing changes on a TPU VM or a GPU host."""
    if not has_tpu():
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
        if not has_nvidia_gpu() and has_cuda_plugin():
            os.environ.setdefault("JAX_PLATFORMS", "cpu")


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
        num_slices=tpu.slices,
        wrap=tpu.wrap,
    )
    return list(topology.devices)


def host_cpu() -> str:
    """This host's CPU model, core count and widest vector extensions ("AMD EPYC (2 cores; avx2, avx512f,
    avx512_bf16)"): what every CPU benchmark table names, since the project's machines differ."""
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "?")
    extensions = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if name in cpu_flags()]
    return f"{model} ({os.cpu_count()} cores; {', '.join(extensions) or 'no AVX2'})"


def cpu_flags() -> set[str]:
    """This host's CPU feature flags (/proc/cpuinfo's: "avx2", "avx512_bf16", "amx_bf16", ...); none elsewhere."""
    return set(next((line.split(":", 1)[1].split() for line in _cpuinfo() if line.startswith("flags")), []))


def _cpuinfo() -> list[str]:
    path = Path("/proc/cpuinfo")
    return path.read_text().splitlines() if path.exists() else []
