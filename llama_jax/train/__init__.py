"""Training: `run(config)` is what `python train.py` runs.

    config.py     TrainConfig: the settings, from YAML and key=value (OmegaConf)
    init_from.py  the model, tokenizer and chat template a run starts from
    data.py       the corpus a run trains on: tokenized once through the cache, or a token store
    sources.py    data files and their records: documents, SFT and preference records
    examples.py   SFT and preference records encoded as token ids and target weights
    corpus_cache.py  the tokenized-corpus cache entry: built once, checksummed, memory-mapped
    token_store.py   tensorstore token stores: a corpus for the hosts of a pod, each reading its rows
    batching.py   packed rows, the train/validation split, the batch of any step
    objectives.py    training objectives as values: the next-token loss, DPO, GRPO
    objective_settings.py  the objectives' settings: dpo.*, grpo.*
    preference.py    DPO: the losses and rewards of (chosen, rejected) pairs
    grpo_loss.py     GRPO: advantages, the clipped token loss, KL, its reductions (TRL's formulas)
    rewards.py       GRPO's reward functions: FILE.py:FUNCTION and the built-in checks
    state.py      the train state and its layout over the mesh
    step.py       the jitted train and eval steps over the mesh, built for a run
    optimizer.py  AdamW with warmup and cosine decay
    run_dir.py    the run directory: created whole, resumed only by the same run
    checkpoints.py   orbax checkpoints of the train state
    metrics.py    progress bar, TensorBoard, metrics.jsonl
    multihost.py  jax.distributed and preemption
    trainer.py    the loop that ties them together
    compile.py    `train.py --compile-for`: the train and eval steps compiled for a TPU slice or GPUs

Names are imported on first use: `llama_jax.train.config` (and `train.py --help`) does not import JAX.
"""

from llama_jax.lazy import lazy_exports

_EXPORTS = {
    "run": "llama_jax.train.trainer",
    "TrainConfig": "llama_jax.train.config",
    "load_train_config": "llama_jax.train.config",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
