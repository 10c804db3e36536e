"""Safetensors files, read and written one tensor at a time with plain file I/O.

Layout: an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the data, with
offsets relative to its start. Parsing the header ourselves lets a converter read exactly one tensor's
bytes at a time (bf16 through ml_dtypes) and check every offset before trusting it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    path: Path
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors file, validated against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length_bytes = f.read(8)
        if len(length_bytes) < 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", length_bytes)
        if length > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path}: corrupt safetensors header (claims {length} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors entry for tensor {name}") from None
        if dtype_name not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {dtype_name}; supported: {', '.join(DTYPES)}")
        nbytes = math.prod(shape) * DTYPES[dtype_name].itemsize
        if not (isinstance(begin, int) and isinstance(end, int)) or begin < 0 or end - begin != nbytes:
            raise ValueError(f"{path}: corrupt safetensors entry for tensor {name} (offsets do not match its shape)")
        if data_start + end > size:
            raise ValueError(
                f"{path}: truncated file: tensor {name} ends at byte {data_start + end}, the file has {size}"
            )
        entries[name] = TensorEntry(path, name, DTYPES[dtype_name], shape, data_start + begin, nbytes)
    return entries


def read_tensor(entry: TensorEntry) -> np.ndarray:
    out = np.empty(entry.shape, entry.dtype)
    with open(entry.path, "rb") as f:
        f.seek(entry.start)
        got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    if got != entry.nbytes:
        raise ValueError(f"{entry.path}: truncated file: tensor {entry.name} is cut short")
    return out


@dataclasses.dataclass(frozen=True)
class TensorSource:
    """A tensor to write: its name, shape and dtype now, its values only when its turn comes."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    values: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_file(path: Path, tensors: Sequence[TensorSource]) -> None:
    """Write a safetensors file, computing and writing one tensor at a time."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"cannot write dtype {t.dtype} to safetensors")
        header[t.name] = {
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the data 8-byte aligned, as the safetensors library does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            array = np.ascontiguousarray(t.values(), dtype=t.dtype)
            if array.shape != t.shape:
                raise ValueError(f"tensor {t.name}: produced shape {array.shape}, declared {t.shape}")
            f.write(memoryview(array.reshape(-1).view(np.uint8)))


def shard_plan(tensors: Sequence[TensorSource], max_bytes: int) -> list[list[TensorSource]]:
    """Consecutive groups of at most `max_bytes` each (a tensor larger than that gets a file of its own)."""
    shards: list[list[TensorSource]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards
