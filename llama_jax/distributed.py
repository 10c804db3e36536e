"""Joining a multi-host job with JAX's own runtime, and what its processes tell each other.

Every command joins the same way, before anything touches a device (`join`):
  * Cloud TPU VM slices, SLURM and Open MPI jobs: JAX finds the coordinator, the process count and this
    process's id itself;
  * elsewhere (GPU clusters, several processes on one CPU host): the coordinator's HOST:PORT, the process
    count and this process's id, the same coordinator on every process;
  * CPU processes talk through gloo collectives.
A single machine with none of these runs as one process.

Beyond the devices' collectives, the processes of a job exchange small host values — the prompts process 0
read, where a resumed output continues, the requests a server's leader admitted this step — through the
key-value store of JAX's coordination service (`share`), which needs no device program and no compile.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

# Seconds without a heartbeat after which JAX's coordination service declares a process lost and ends every
# other process of the job (JAX's default is 100 s; a lost host should end the job within a minute).
# LLAMA_JAX_HEARTBEAT_TIMEOUT overrides it (a cluster with long stalls wants more; tests want less).
HEARTBEAT_TIMEOUT_S = 40
HEARTBEAT_VARIABLE = "LLAMA_JAX_HEARTBEAT_TIMEOUT"
# How long a process waits for a value process 0 shares: it may first read a large prompt file, load weights
# or compile (a lost process 0 ends the wait at once: the coordination service runs in it).
SHARE_TIMEOUT_MS = 3_600_000
PART_CHARS = 1 << 20  # a shared value goes in parts of at most this many characters


def join(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> None:
    """Join the job the arguments (all three) or the environment describe; alone, stay one process."""
    # gloo is JAX's default for CPU cross-process collectives today; named so that CPU multi-process runs (the
    # tests) do not depend on that default.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    explicit = (coordinator, num_processes, process_id)
    heartbeat = _heartbeat_timeout()
    if any(value is not None for value in explicit):
        if None in explicit:
            raise ValueError("the coordinator, the process count and the process id go together: give all three")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"the process id must be in [0, {num_processes}), got {process_id}")
        jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat)
        return
    try:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
    except ValueError as e:
        # JAX's cluster detection found no TPU VM, SLURM or MPI job: a single-process run.
        if "coordinator_address" not in str(e):
            raise
    except RuntimeError as e:
        # JAX already runs in this process (a notebook, a test calling main()): it stays single-process.
        if "must be called before" not in str(e):
            raise


def _heartbeat_timeout() -> int:
    value = os.environ.get(HEARTBEAT_VARIABLE, str(HEARTBEAT_TIMEOUT_S))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{HEARTBEAT_VARIABLE} must be a whole number of seconds, got {value!r}")
    return int(value)


def is_leader() -> bool:
    """Process 0: the one that reads inputs and writes outputs."""
    return jax.process_index() == 0


class Shared:
    """Values process 0 decides and every process uses, in the order they are shared: `value(compute)` runs
    `compute()` on process 0 only and returns its JSON-able result on every process. An error there (a
    ValueError or OSError: a bad prompt file, say) is raised on every process as a ValueError with the same
    message, so all of them stop with the same line instead of the others waiting forever. `keep`: how many of
    the latest values the coordination service holds (a server shares one per engine step)."""

    def __init__(self, topic: str, keep: int | None = None):
        self.topic, self.keep = topic, keep
        self._count = 0

    def value(self, compute) -> Any:
        key = self._key(self._count)
        self._count += 1
        if jax.process_count() == 1:
            return compute()
        client = _client()
        if is_leader():
            try:
                result = compute()
            except (ValueError, OSError) as e:
                _put(client, key, json.dumps({"error": _message(e)}))
                raise
            _put(client, key, json.dumps({"value": result}))
            if self.keep is not None and self._count > self.keep:
                client.key_value_delete(self._key(self._count - 1 - self.keep))
            return result
        shared = json.loads(_get(client, key))
        if "error" in shared:
            raise ValueError(shared["error"])
        return shared["value"]

    def _key(self, count: int) -> str:
        return f"llama_jax/{self.topic}/{count}"


def _put(client, key: str, text: str) -> None:
    """`text` under `key` in parts of at most PART_CHARS (a prompt file of many megabytes passes the
    coordination service's message limit), the parts first, then their count, which readers wait for."""
    parts = [text[i : i + PART_CHARS] for i in range(0, len(text), PART_CHARS)] or [""]
    for index, part in enumerate(parts):
        client.key_value_set(f"{key}/{index}", part)
    client.key_value_set(key, str(len(parts)))


def _get(client, key: str) -> str:
    count = int(client.blocking_key_value_get(key, SHARE_TIMEOUT_MS))
    return "".join(client.blocking_key_value_get(f"{key}/{index}", SHARE_TIMEOUT_MS) for index in range(count))


def _message(error: Exception) -> str:
    from llama_jax.errors import one_line

    return one_line(error)


def _client():
    """The coordination service's client (JAX's own; orbax and JAX's multihost utilities use it the same way)."""
    from jax._src import distributed

    return distributed.global_state.client
