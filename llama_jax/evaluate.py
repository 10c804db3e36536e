"""Perplexity of a model on a text file.

    python -m llama_jax.evaluate --checkpoint DIR --data FILE [--seq-len N] [--dtype float32]
                                 [--batch-size B] [--mesh data=..,fsdp=..,tensor=..]

The whole file is one document: BOS is prepended to its ids, which are cut into consecutive,
non-overlapping windows of seq-len (default: the model's max_seq_len); each window predicts its own
tokens after the first, seeing only that window. The last window is padded to the same shape and
masked, so one function compiles. The last stdout line is JSON with `perplexity`, `nll_per_token` and
`tokens` (the number of predicted tokens).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from llama_jax.cli import ArgumentParser, run_cli
from llama_jax.config import DTYPES

_PROGRESS_MIN_BATCHES = 8


def windows(ids: Sequence[int], seq_len: int) -> list[np.ndarray]:
    """Consecutive windows of at most seq_len ids; a last window of one id predicts nothing and is dropped."""
    ids = np.asarray(ids, np.int32)
    return [ids[i:i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i:i + seq_len]) > 1]


def batches(chunks: list[np.ndarray], seq_len: int, batch_size: int, pad_id: int
            ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(inputs, targets, mask), each (batch_size, seq_len): targets[t] = inputs[t + 1] where mask is 1.
    Short windows and the missing rows of the last batch are padding with mask 0."""
    for start in range(0, len(chunks), batch_size):
        inputs = np.full((batch_size, seq_len), pad_id, np.int32)
        targets = np.full((batch_size, seq_len), pad_id, np.int32)
        mask = np.zeros((batch_size, seq_len), np.float32)
        for row, chunk in enumerate(chunks[start:start + batch_size]):
            inputs[row, :len(chunk)] = chunk
            targets[row, :len(chunk) - 1] = chunk[1:]
            mask[row, :len(chunk) - 1] = 1.0
        yield inputs, targets, mask


def perplexity(loaded, ids: Sequence[int], seq_len: int, batch_size: int, progress: bool = False) -> dict:
    """Score `ids` (BOS already first) with a loaded model (`llama_jax.load`) on its mesh."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tqdm import tqdm

    from llama_jax.loss import token_nll
    from llama_jax.sharding import named_sharding

    graphdef, state = nnx.split(loaded.model)

    @jax.jit
    def window_nll(state, inputs, targets, mask):
        nll, _ = token_nll(nnx.merge(graphdef, state), inputs, targets)
        return jnp.sum(nll * mask, axis=-1)

    chunks = windows(ids, seq_len)
    n_batches = math.ceil(len(chunks) / batch_size)
    sharding = named_sharding(loaded.mesh, ("batch", "length"), (batch_size, seq_len))
    total_nll, total_tokens = 0.0, 0
    bar = tqdm(total=n_batches, unit="batch", file=sys.stderr,
               disable=not progress or n_batches < _PROGRESS_MIN_BATCHES)
    with jax.set_mesh(loaded.mesh), bar:
        for inputs, targets, mask in batches(chunks, seq_len, batch_size, loaded.tokenizer.pad_id):
            placed = [jax.device_put(a, sharding) for a in (inputs, targets, mask)]
            total_nll += float(np.sum(np.asarray(window_nll(state, *placed), np.float64)))
            total_tokens += int(mask.sum())
            bar.update()
    nll_per_token = total_nll / total_tokens
    return {"perplexity": math.exp(nll_per_token), "nll_per_token": nll_per_token, "tokens": total_tokens,
            "windows": len(chunks), "seq_len": seq_len}


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m llama_jax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model directory (converted or trained)")
    parser.add_argument("--data", required=True, help="UTF-8 text file, scored as one document")
    parser.add_argument("--seq-len", type=int, help="window length (default: the model's max_seq_len)")
    parser.add_argument("--dtype", choices=DTYPES, help="parameter and compute dtype (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, help="windows per step (default: one per data-parallel device)")
    parser.add_argument("--mesh", default="", help="device mesh, e.g. data=2,tensor=4 (default: all data-parallel)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from llama_jax.checkpoint import load, read_model_dir
    from llama_jax.sharding import MeshConfig, make_mesh

    model_dir = read_model_dir(args.checkpoint)
    tokenizer = model_dir.tokenizer()
    if tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer: cannot encode the data")
    max_len = model_dir.config.max_seq_len
    seq_len = max_len if args.seq_len is None else args.seq_len
    if not 2 <= seq_len <= max_len:
        raise ValueError(f"--seq-len must be between 2 and the model's max_seq_len {max_len}, got {seq_len}")
    text = Path(args.data).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"data file {args.data} is empty")
    ids = tokenizer.encode(text, bos=True)
    mesh = make_mesh(MeshConfig.parse(args.mesh))
    batch_size = args.batch_size
    if batch_size is None:
        batch_size = min(mesh.shape["data"] * mesh.shape["fsdp"], len(windows(ids, seq_len)))
    if batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    loaded = load(args.checkpoint, mesh=mesh, dtype=args.dtype)
    result = perplexity(loaded, ids, seq_len, batch_size, progress=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run_cli(main)
