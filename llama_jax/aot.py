"""Ahead-of-time compilation for a TPU slice or NVIDIA GPUs, from any host: will it fit, which kernels, how
fast at best.

    report = compile_function("train_step", lambda: train_step.lower(state, batch), mesh, workload, "splash")

`jitted.lower(*args).compile()` with `args` as `jax.ShapeDtypeStruct`s sharded over the slice's devices
(`hardware.target_devices`) builds the real program, Mosaic kernels (TPU) or cuDNN calls (GPU) included. Its
`memory_analysis()` is per chip: the bytes of the arguments (parameters, optimizer state), the temporaries,
and the peak (XLA's, over the buffers' lifetimes, with donated arguments reused). The TPU compiler itself
refuses a program that needs more than the HBM it may use (RESOURCE_EXHAUSTED): that is reported as not
fitting, with the size it asked for. What it may use is a little less than the data sheet's HBM; no API
reports it for a chip this host does not have, so `usable_hbm_bytes` asks the compiler for an impossible
buffer and reads its refusal. A GPU program may use the share of the GPU's memory JAX's client takes
(XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by default).

Speed is bounded from the model's own arithmetic, never from `cost_analysis()` (which counts a scanned
layer body once): the time of one call is at least the larger of its FLOPs over the chip's peak and its HBM
traffic over the chip's bandwidth (the roofline), and MFU at most the model FLOPs done in that time.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.hardware import GPU_DEVICES, GiB, GpuTarget, TpuSlice, chip_spec, gpu_memory_fraction
from llama_jax.sharding import mesh_slices

MOSAIC_CALL = 'custom_call_target="tpu_custom_call"'  # how a Pallas (Mosaic) kernel appears in TPU HLO
CUDNN_ATTENTION_CALL = 'custom_call_target="__cudnn$fmha'  # cuDNN's fused (flash) attention in GPU HLO
_SIZE = r"\(([\d.]+)([KMGT])\)"
_OOM_NEEDED = re.compile(r"memory required[^(]*" + _SIZE)
_OOM_AVAILABLE = re.compile(r"available HBM " + _SIZE)


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one call of a function does, per chip: for the roofline."""

    model_flops: float  # useful work (what MFU counts)
    hardware_flops: float  # model FLOPs plus recomputation (remat)
    hbm_bytes: float  # lower bound of the bytes read and written in HBM
    tokens: int  # tokens one call processes over the whole slice


@dataclasses.dataclass(frozen=True)
class FunctionReport:
    name: str
    attention: str  # the attention implementation in the compiled program
    argument_bytes: int  # parameters, optimizer state, inputs (per chip)
    temp_bytes: int
    peak_bytes: int  # what must fit in HBM at once
    hbm_bytes: int  # the chip's
    fits: bool
    step_seconds: float  # roofline lower bound of one call
    mfu_bound: float
    tokens_per_second: float  # upper bound, over the slice
    dcn_bytes: float = 0.0  # per chip and call, over DCN
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "per_chip_gib": round(self.peak_bytes / GiB, 3),
            "hbm_gib": round(self.hbm_bytes / GiB, 2),
            "fits": self.fits,
            "attention": self.attention,
            "arguments_gib": round(self.argument_bytes / GiB, 3),
            "temporaries_gib": round(self.temp_bytes / GiB, 3),
            "step_seconds_bound": self.step_seconds,
            "mfu_bound": round(self.mfu_bound, 4),
            "tokens_per_second_bound": round(self.tokens_per_second, 1),
            "dcn_gib_per_chip": round(self.dcn_bytes / GiB, 4),
        }


def compile_function(
    name: str,
    lower: Callable[[], jax.stages.Lowered],
    mesh: jax.sharding.Mesh,
    workload: Workload,
    attention: str,
    status: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    resident_bytes: int = 0,
) -> FunctionReport:
    """Compile what `lower()` lowers (a jitted function over arguments sharded on `mesh`, a TPU slice's) and
    read what it needs. `attention`: the implementation the model was configured with, confirmed from the
    compiled program for "splash". `status` gets a line as compiling starts and one with the time it took.
    `resident_bytes` (per chip): what stays in HBM beside the program's arguments while it runs — GRPO's
    rollouts run with the optimizer state held — counted in its peak."""
    device = mesh.devices.flat[0]
    spec = chip_spec(device.device_kind)
    if spec is None:
        raise ValueError(f"no data sheet for device kind {device.device_kind!r}")
    hbm = usable_hbm_bytes(device)
    step_seconds = max(workload.hardware_flops / spec.peak_bf16_flops, workload.hbm_bytes / spec.hbm_bandwidth)
    bounds = dict(
        step_seconds=step_seconds,
        mfu_bound=workload.model_flops / spec.peak_bf16_flops / step_seconds,
        tokens_per_second=workload.tokens / step_seconds,
    )
    # Compiling a large model takes minutes: say what is being compiled, and afterwards how long it took.
    status(f"compiling {name} for {mesh.size} × {device.device_kind} ...")
    started = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = lower()
    lowered_at = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler's RESOURCE_EXHAUSTED arrives as a JaxRuntimeError
        needed = _size(_OOM_NEEDED, str(e))
        if needed is None:
            raise
        status(f"{name}: does not fit ({time.perf_counter() - started:.1f} s)")
        return FunctionReport(
            name, attention, 0, 0, needed + resident_bytes, hbm, False, **bounds, error="does not fit in HBM"
        )
    done = time.perf_counter()
    status(f"{name}: lowered in {lowered_at - started:.1f} s, compiled in {done - lowered_at:.1f} s")
    memory = compiled.memory_analysis()
    peak = resident_bytes + (
        getattr(memory, "peak_memory_in_bytes", 0)
        or (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes
        )
    )
    program = compiled.as_text()
    kernel_call = {"splash": MOSAIC_CALL, "ragged_paged": MOSAIC_CALL, "cudnn": CUDNN_ATTENTION_CALL}.get(attention)
    if kernel_call is not None and kernel_call not in program:
        attention = "xla"  # sequences the kernel cannot tile take the reference path
    dcn = dcn_payload_bytes(program) if mesh_slices(mesh) > 1 else 0.0
    return FunctionReport(
        name,
        attention,
        memory.argument_size_in_bytes,
        memory.temp_size_in_bytes,
        peak,
        hbm,
        peak <= hbm,
        **bounds,
        dcn_bytes=dcn,
    )


@functools.cache
def usable_hbm_bytes(device) -> int:
    """The HBM the TPU compiler lets a program of `device` use (15.75 GiB of a v5e's 16), read from its
    refusal of a 1 TiB buffer; the data sheet's size where the message has none. On a GPU, the share of its
    memory JAX's client allocates from."""
    if device.platform == "gpu":
        return int(GPU_DEVICES[device.device_kind].memory_bytes * gpu_memory_fraction())
    sharding = NamedSharding(Mesh(np.array([device]), ("one",)), PartitionSpec())
    try:
        jax.jit(lambda: jnp.zeros((2**40,), jnp.int8), out_shardings=sharding).lower().compile()
    except Exception as e:  # JaxRuntimeError: RESOURCE_EXHAUSTED
        available = _size(_OOM_AVAILABLE, str(e))
        if available is not None:
            return available
    return chip_spec(device.device_kind).hbm_bytes


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4}
_DTYPE_BYTES |= {"f64": 8, "s64": 8, "u64": 8}
_COMPUTATION = re.compile(r"^(?:ENTRY )?(%[\w.\-]+) ")
_DCN_SEND = re.compile(r"= \((\w+)\[([\d,]*)\]\S*, .* send\(.*_xla_megascale_transfer_type")
_WHILE = re.compile(r" while\(.*condition=(%[\w.\-]+), body=(%[\w.\-]+)")
_LOOP_BOUND = re.compile(r"s32\[\]\S* constant\((\d+)\)")


def dcn_payload_bytes(hlo: str) -> float:
    """Bytes each chip hands to DCN transfers in one call of a compiled multi-slice TPU program (its
    `as_text()`): the TPU compiler turns a collective across slices into a send to the Megascale runtime
    (`_xla_megascale_transfer_type`), so the sum of those sends' buffers, each times the trip count of the
    while loops around it (a loop's bound is the s32 constant its condition compares with), is what crosses
    the data-center network per chip. A ring all-reduce puts about twice that on the wire."""
    computations: dict[str, list[str]] = {}
    entry, name = None, None
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line) if line[:1] not in (" ", "") else None
        if header is not None:
            name = header.group(1)
            computations[name] = []
            entry = name if line.startswith("ENTRY") else entry
        elif name is not None:
            computations[name].append(line)

    def sent(computation: str) -> float:
        total = 0.0
        for line in computations.get(computation, ()):
            send = _DCN_SEND.search(line)
            if send is not None:
                dims = [int(d) for d in send.group(2).split(",") if d]
                total += _DTYPE_BYTES.get(send.group(1), 4) * float(np.prod(dims, dtype=np.float64))
            loop = _WHILE.search(line)
            if loop is not None:
                bounds = [int(b) for c in computations.get(loop.group(1), ()) for b in _LOOP_BOUND.findall(c)]
                total += (max(bounds) if bounds else 1) * sent(loop.group(2))
        return total

    return sent(entry) if entry is not None else 0.0


def _size(pattern: re.Pattern, message: str) -> int | None:
    """A size such as "(22.66G)" from the compiler's out-of-memory message."""
    match = pattern.search(message) if "RESOURCE_EXHAUSTED" in message else None
    if match is None:
        return None
    return int(float(match.group(1)) * 1024 ** ("KMGT".index(match.group(2)) + 1))


def report_table(target: TpuSlice | GpuTarget, reports: list[FunctionReport]) -> str:
    """A table of the reports, for people; `report_json` is for programs."""
    usable = "usable memory GiB" if isinstance(target, GpuTarget) else "usable HBM GiB"
    dcn = target.slices > 1
    lines = [
        f"{target.name}: {target.describe()}; per chip:",
        f"| function | arguments GiB | temporaries GiB | peak GiB | {usable} | fits | attention "
        f"| step ≥ s | MFU ≤ | tokens/s ≤ |{' DCN GiB sent |' if dcn else ''}",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if dcn else ""),
    ]
    for r in reports:
        lines.append(
            f"| {r.name} | {r.argument_bytes / GiB:.2f} | {r.temp_bytes / GiB:.2f} | {r.peak_bytes / GiB:.2f} "
            f"| {r.hbm_bytes / GiB:.1f} | {'yes' if r.fits else 'NO'} | {r.attention} "
            f"| {r.step_seconds:.4g} | {r.mfu_bound:.0%} | {r.tokens_per_second:,.0f} |"
            + (f" {r.dcn_bytes / GiB:.3f} |" if dcn else "")
        )
    if isinstance(target, GpuTarget):
        lines.append(f"(usable: {gpu_memory_fraction():.0%} of each GPU's memory, XLA_PYTHON_CLIENT_MEM_FRACTION)")
    return "\n".join(lines)


def report_json(target: TpuSlice | GpuTarget, reports: list[FunctionReport]) -> dict[str, Any]:
    return {
        "target": target.name,
        "chips": target.chips,
        "hosts": target.hosts,
        "slices": target.slices,
        "fits": all(r.fits for r in reports),
        "functions": {r.name: r.to_json() for r in reports},
    }
