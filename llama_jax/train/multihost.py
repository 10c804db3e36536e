"""Joining a multi-host job, and noticing preemption, with JAX's own runtime.

`initialize` must run before anything touches a JAX device:
  * Cloud TPU VM slices, SLURM and Open MPI jobs: `jax.distributed.initialize()` finds the coordinator,
    the process count and this process's id itself;
  * other GPU clusters: pass distributed.coordinator=HOST:PORT, distributed.num_processes=N,
    distributed.process_id=I (the same coordinator on every process);
  * CPU processes (the tests) talk through gloo collectives.
A single machine with none of these runs as one process.

Preemption arrives as SIGTERM. One process notes it and stops at the next step boundary; a multi-host job
must stop all hosts at the SAME step (their checkpoint is one collective save), which JAX's preemption
sync point agrees on through the coordination service.
"""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils

from llama_jax.train.config import DistributedConfig


def initialize(config: DistributedConfig) -> None:
    # gloo is JAX's default for CPU cross-process collectives today; named so that CPU multi-process runs
    # (the tests) do not depend on that default.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    explicit = (config.coordinator, config.num_processes, config.process_id)
    if any(value is not None for value in explicit):
        if None in explicit:
            raise ValueError(
                "distributed.coordinator, distributed.num_processes and distributed.process_id "
                "go together: set all three (or none, where JAX detects the cluster)"
            )
        if not 0 <= config.process_id < config.num_processes:
            raise ValueError(f"distributed.process_id must be in [0, {config.num_processes}), got {config.process_id}")
        jax.distributed.initialize(config.coordinator, config.num_processes, config.process_id)
        return
    try:
        jax.distributed.initialize()
    except ValueError as e:
        # JAX's cluster detection found no TPU VM, SLURM or MPI job: a single-process run.
        if "coordinator_address" not in str(e):
            raise
    except RuntimeError as e:
        # JAX already runs in this process (a notebook, a test calling main()): it stays single-process.
        if "must be called before" not in str(e):
            raise


class PreemptionNotice:
    """`reached(step)` is True at the step where every process should save and stop. A context manager:
    SIGTERM is watched inside it and handled as before outside."""

    def __init__(self):
        self.multi_process = jax.process_count() > 1
        self._received = False
        self._previous_handler = None

    def __enter__(self) -> PreemptionNotice:
        if not self.multi_process:  # JAX's coordination service watches SIGTERM for multi-process jobs
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)

    def _on_sigterm(self, signum, frame) -> None:
        self._received = True

    def reached(self, step: int) -> bool:
        if self.multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._received
