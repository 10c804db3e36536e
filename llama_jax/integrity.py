"""Checksums of parameter trees, written with every checkpoint and checked on every restore, and the check that
restored values are finite.

Orbax verifies the structure of what it reads, not the bytes: a checkpoint whose array files were damaged
(bits flipped on disk, a copy cut short) restores "successfully" into garbage or NaN. Each leaf's checksum is
two sums over its bytes read as unsigned words w_i (flat, row-major): Σ w_i and Σ (2i + 1)·w_i, modulo 2³².
The same numbers come from numpy on host arrays (the converters) and from one jitted pass over sharded
device arrays (training), so any host of a pod can check any checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Checksums = dict[str, list[int]]  # "layers/attention/wq" -> [Σ w, Σ (2i+1) w]
_HOST_CHUNK = 1 << 24  # elements summed at a time on the host: bounded temporaries for a 70B tensor
_MASK = 0xFFFFFFFF


def leaf_key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def host_checksums(tree: Any) -> Checksums:
    """Checksums of a tree of numpy arrays."""
    return {
        leaf_key(path): _host_checksum(np.asarray(leaf)) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _host_checksum(array: np.ndarray) -> list[int]:
    words = np.ascontiguousarray(array).reshape(-1).view(f"uint{8 * array.dtype.itemsize}")
    plain = weighted = 0
    for start in range(0, words.size, _HOST_CHUNK):
        chunk = words[start : start + _HOST_CHUNK].astype(np.uint32)
        index = np.arange(start, start + chunk.size, dtype=np.uint64).astype(np.uint32)
        plain += int(chunk.sum(dtype=np.uint32))
        weighted += int((chunk * (2 * index + 1)).sum(dtype=np.uint32))
    return [plain & _MASK, weighted & _MASK]


@jax.jit
def _device_sums(tree):
    def one(leaf):
        bits = 8 * leaf.dtype.itemsize
        words = jax.lax.bitcast_convert_type(leaf, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)
        index = jnp.zeros(leaf.shape, jnp.uint32)
        stride = 1
        for axis in reversed(range(leaf.ndim)):  # the flat row-major index, modulo 2**32 as on the host
            index = index + jax.lax.broadcasted_iota(jnp.uint32, leaf.shape, axis) * jnp.uint32(stride & _MASK)
            stride *= leaf.shape[axis]
        return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)])

    return jax.tree.map(one, tree)


def device_checksums(tree: Any) -> Checksums:
    """Checksums of a tree of (sharded) jax arrays: one jitted pass, the results replicated to every host."""
    sums = jax.device_get(_device_sums(tree))
    return {leaf_key(path): [int(s) for s in leaf] for path, leaf in jax.tree_util.tree_flatten_with_path(sums)[0]}


@jax.jit
def _all_finite(tree) -> jax.Array:
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def damage(tree: Any, expected: Checksums | None) -> str | None:
    """Why a restored tree of jax arrays cannot be trusted (a checksum that differs from the one written
    with it, a value that is not finite), or None when it can. `expected` None: only finiteness is known."""
    if expected is not None:
        found = device_checksums(tree)
        wrong = sorted(key for key, sums in found.items() if expected.get(key) != sums)
        if wrong:
            return f"{wrong[0]}{f' and {len(wrong) - 1} more' if len(wrong) > 1 else ''} changed since it was saved"
    if not bool(_all_finite(tree)):
        return "it holds values that are not finite (inf or NaN)"
    return None


def file_digest(path: Path) -> str:
    """SHA-256 of a small file (config.json, a tokenizer): what it held when it was written."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def changed_files(directory: Path, digests: dict[str, str]) -> list[str]:
    """The files of `digests` (name -> SHA-256) in `directory` whose bytes are not those digested."""
    return [
        name
        for name, digest in digests.items()
        if not (directory / name).is_file() or file_digest(directory / name) != digest
    ]


SEAL = "sha256"


def sealed(record: dict[str, Any]) -> dict[str, Any]:
    """`record` with the SHA-256 of its canonical JSON: an edit to any field (a training step's number, its
    data position, its checksums) is then detected, not trusted."""
    return {**record, SEAL: _json_digest(record)}


def seal_problem(record: dict[str, Any]) -> str | None:
    """Why a sealed record cannot be trusted, or None. A record without a seal is reported by the caller."""
    body = {k: v for k, v in record.items() if k != SEAL}
    return None if record.get(SEAL) == _json_digest(body) else "it was changed after it was written"


def _json_digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
