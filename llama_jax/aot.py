"""Ahead-of-time compilation for a TPU slice, from any host: will it fit, which kernels, how fast at best.

    report = compile_function("train_step", lambda: train_step.lower(state, batch), mesh, workload, "splash")

`jitted.lower(*args).compile()` with `args` as `jax.ShapeDtypeStruct`s sharded over the slice's devices
(`hardware.slice_devices`) builds the real TPU program, Mosaic kernels included. Its `memory_analysis()` is
per chip: the bytes of the arguments (parameters, optimizer state), the temporaries, and the peak (XLA's,
over the buffers' lifetimes, with donated arguments reused). The compiler itself refuses a program that
needs more than the HBM it may use (RESOURCE_EXHAUSTED): that is reported as not fitting, with the size it
asked for. What it may use is a little less than the data sheet's HBM; no API reports it for a chip this
host does not have, so `usable_hbm_bytes` asks the compiler for an impossible buffer and reads its refusal.

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

from llama_jax.hardware import GiB, TpuSlice, chip_spec

MOSAIC_CALL = 'custom_call_target="tpu_custom_call"'  # how a Pallas (Mosaic) kernel appears in TPU HLO
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
        }


def compile_function(
    name: str,
    lower: Callable[[], jax.stages.Lowered],
    mesh: jax.sharding.Mesh,
    workload: Workload,
    attention: str,
    status: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> FunctionReport:
    """Compile what `lower()` lowers (a jitted function over arguments sharded on `mesh`, a TPU slice's) and
    read what it needs. `attention`: the implementation the model was configured with, confirmed from the
    compiled program for "splash". `status` gets a line as compiling starts and one with the time it took."""
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
        return FunctionReport(name, attention, 0, 0, needed, hbm, False, **bounds, error="does not fit in HBM")
    done = time.perf_counter()
    status(f"{name}: lowered in {lowered_at - started:.1f} s, compiled in {done - lowered_at:.1f} s")
    memory = compiled.memory_analysis()
    peak = getattr(memory, "peak_memory_in_bytes", 0) or (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    if attention == "splash" and MOSAIC_CALL not in compiled.as_text():
        attention = "xla"  # sequences the kernel cannot tile take the reference path
    return FunctionReport(
        name, attention, memory.argument_size_in_bytes, memory.temp_size_in_bytes, peak, hbm, peak <= hbm, **bounds
    )


@functools.cache
def usable_hbm_bytes(device) -> int:
    """The HBM the TPU compiler lets a program of `device` use (15.75 GiB of a v5e's 16), read from its
    refusal of a 1 TiB buffer; the data sheet's size where the message has none."""
    sharding = NamedSharding(Mesh(np.array([device]), ("one",)), PartitionSpec())
    try:
        jax.jit(lambda: jnp.zeros((2**40,), jnp.int8), out_shardings=sharding).lower().compile()
    except Exception as e:  # JaxRuntimeError: RESOURCE_EXHAUSTED
        available = _size(_OOM_AVAILABLE, str(e))
        if available is not None:
            return available
    return chip_spec(device.device_kind).hbm_bytes


def _size(pattern: re.Pattern, message: str) -> int | None:
    """A size such as "(22.66G)" from the compiler's out-of-memory message."""
    match = pattern.search(message) if "RESOURCE_EXHAUSTED" in message else None
    if match is None:
        return None
    return int(float(match.group(1)) * 1024 ** ("KMGT".index(match.group(2)) + 1))


def report_table(tpu: TpuSlice, reports: list[FunctionReport]) -> str:
    """A table of the reports, for people; `report_json` is for programs."""
    lines = [
        f"{tpu.name}: {tpu.chips} chips ({tpu.topology}); per chip:",
        "| function | arguments GiB | temporaries GiB | peak GiB | usable HBM GiB | fits | attention "
        "| step ≥ s | MFU ≤ | tokens/s ≤ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        lines.append(
            f"| {r.name} | {r.argument_bytes / GiB:.2f} | {r.temp_bytes / GiB:.2f} | {r.peak_bytes / GiB:.2f} "
            f"| {r.hbm_bytes / GiB:.1f} | {'yes' if r.fits else 'NO'} | {r.attention} "
            f"| {r.step_seconds:.4g} | {r.mfu_bound:.0%} | {r.tokens_per_second:,.0f} |"
        )
    return "\n".join(lines)


def report_json(tpu: TpuSlice, reports: list[FunctionReport]) -> dict[str, Any]:
    return {
        "slice": tpu.name,
        "chips": tpu.chips,
        "fits": all(r.fits for r in reports),
        "functions": {r.name: r.to_json() for r in reports},
    }
