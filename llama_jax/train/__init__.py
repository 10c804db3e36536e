"""Training: `run(config)` is what `python train.py` runs.

    config.py     TrainConfig: the settings, from YAML and key=value (OmegaConf)
    init_from.py  the model, tokenizer and chat template a run starts from
    data.py       corpora (pretraining text, SFT and preference records) tokenized once into a cache
    token_store.py   tensorstore token stores: a corpus for the hosts of a pod, each reading its rows
    batching.py   packed rows, the train/validation split, the batch of any step
    step.py       the jitted train and eval steps over the mesh
    preference.py    DPO: the losses and rewards of (chosen, rejected) pairs
    optimizer.py  AdamW with warmup and cosine decay
    run_dir.py    the run directory: created whole, resumed only by the same run
    checkpoints.py   orbax checkpoints of the train state
    metrics.py    progress bar, TensorBoard, metrics.jsonl
    multihost.py  jax.distributed and preemption
    trainer.py    the loop that ties them together
    compile.py    `train.py --compile-for`: the train and eval steps compiled for a TPU slice or GPUs

Names are imported on first use: `llama_jax.train.config` (and `train.py --help`) does not import JAX.
"""

import importlib

_EXPORTS = {
    "run": "llama_jax.train.trainer",
    "TrainConfig": "llama_jax.train.config",
    "load_train_config": "llama_jax.train.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llama_jax.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
