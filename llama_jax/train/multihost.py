"""Joining a multi-host job, and noticing preemption, with JAX's own runtime.

`initialize` must run before anything touches a JAX device (`llama_jax.distributed.join`, as for every
command): Cloud TPU VM slices, SLURM and Open MPI jobs are found by JAX itself; other GPU clusters pass
distributed.coordinator=HOST:PORT, distributed.num_processes=N, distributed.process_id=I (the same
coordinator on every process). A single machine with none of these runs as one process.

Preemption arrives as SIGTERM. One process notes it and stops at the next step boundary; a multi-host job
must stop all hosts at the SAME step (their checkpoint is one collective save), which JAX's preemption
sync point agrees on through the coordination service.
"""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils

from llama_jax.distributed import join
from llama_jax.train.config import DistributedConfig


def initialize(config: DistributedConfig) -> None:
    """Join the job `distributed.*` describes (or the environment does), as every command joins one."""
    explicit = (config.coordinator, config.num_processes, config.process_id)
    if any(value is not None for value in explicit) and None in explicit:
        raise ValueError(
            "distributed.coordinator, distributed.num_processes and distributed.process_id go together: set all "
            "three (or none, where JAX detects the cluster)"
        )
    join(*explicit)


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
