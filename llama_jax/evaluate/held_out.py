"""The loss of a training run's own validation rows, as its evaluation computed them: the same corpus, the
same packing, the same held-out rows (the last `val_fraction` of them, up to `eval_batches` batches), each
row's documents masked from each other. Scoring the whole corpus instead mixes in the rows the model
trained on and measures something else."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.loading import load
from llama_jax.model_dir import read_model_dir
from llama_jax.sharding import global_array, named_sharding
from llama_jax.train.batching import PackedRows
from llama_jax.train.config import train_config_from_dict
from llama_jax.train.data import prepare_data
from llama_jax.train.run_dir import RUN_FILE
from llama_jax.train.step import token_losses


def held_out_loss(
    run_dir: str | Path,
    mesh: jax.sharding.Mesh | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
) -> dict:
    """{"perplexity", "nll_per_token", "tokens", "rows"} of `run_dir`'s newest intact checkpoint on
    its validation rows."""
    run_dir = Path(run_dir)
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise ValueError(f"{run_dir} is not a training run directory (no {RUN_FILE})")
    recorded = json.loads(run_file.read_text())
    config = train_config_from_dict(recorded["settings"])
    if config.objective == "dpo":
        raise ValueError(
            f"{run_dir} is a DPO run: its held-out evaluation is the DPO loss and reward accuracy of its validation "
            "pairs (eval lines of its metrics.jsonl), not a next-token loss"
        )
    if config.objective == "grpo":
        raise ValueError(
            f"{run_dir} is a GRPO run: its held-out evaluation is the reward of its held-out prompts' greedy "
            "completions (eval lines of its metrics.jsonl), not a next-token loss"
        )
    model_dir = read_model_dir(run_dir)
    # The run's own tokenizer file (a trained one lives in the run directory); the corpus key covers its
    # bytes, so the cached tokens are found again.
    config = dataclasses.replace(config, tokenizer=str(model_dir.tokenizer_path))
    data = prepare_data(config, model_dir.chat_template)
    if data.corpus.key != recorded["fingerprint"]["corpus"]:
        raise ValueError(
            f"the data {config.data} is not what {run_dir} trained on (it changed or moved): "
            "its held-out rows cannot be found again"
        )
    rows = PackedRows(data.corpus, config.seq_len, data.tokenizer.pad_id, config.sft, config.val_fraction)
    loaded = load(run_dir, mesh=mesh, dtype=dtype, quantize=quantize)
    graphdef, params = nnx.split(loaded.model)
    score = jax.jit(lambda params, batch: _sums(graphdef, params, batch, config.loss_chunk))
    total = count = 0.0
    started = time.perf_counter()
    batches = rows.val_rows(config.batch_size, config.eval_batches)
    for ids in batches:
        fields = rows.arrays(ids)
        sharding = named_sharding(loaded.mesh, ("batch", "length"), fields["inputs"].shape)
        nll, tokens = score(params, {name: global_array(a, sharding) for name, a in fields.items()})
        total, count = total + float(nll), count + float(tokens)
    if count == 0:  # every held-out response cut off by packing: there is nothing to score
        raise ValueError(f"the held-out rows of {run_dir} hold no token to score: {rows.describe_supervision()}")
    nll_per_token = total / count
    return {
        "perplexity": math.exp(min(nll_per_token, 700.0)),
        "nll_per_token": nll_per_token,
        "tokens": int(count),
        "tokens_per_second": round(count / (time.perf_counter() - started), 1),
        "rows": int(sum(np.count_nonzero(ids >= 0) for ids in batches)),
    }


def _sums(graphdef, params, batch, loss_chunk):
    nll, _ = token_losses(graphdef, params, batch, loss_chunk)
    return jnp.sum(nll * batch["loss_mask"]), jnp.sum(batch["loss_mask"])
