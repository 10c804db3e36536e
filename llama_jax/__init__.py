"""llama_jax: the LLaMA model family (1, 2, 3, 3.1, 3.2) in JAX + Flax NNX.

    import llama_jax
    loaded = llama_jax.load("models/stories260K")
    print(llama_jax.generate(loaded, ["Once upon a time"], max_new_tokens=50)[0].text)
    report = llama_jax.train.run(llama_jax.load_train_config("configs/tiny_test.yaml"))

Names are imported on first use, so `import llama_jax.tokenizers` (or a command line that fails on a bad
flag) does not pay for importing JAX.
"""

import importlib

from llama_jax.hardware import quiet_libtpu_without_tpu

quiet_libtpu_without_tpu()  # before JAX starts: a CPU host with the `tpu` extra stays quiet

_EXPORTS = {
    "load": "llama_jax.loading",
    "LoadedModel": "llama_jax.loading",
    "ModelConfig": "llama_jax.config",
    "RopeScaling": "llama_jax.config",
    "PRESETS": "llama_jax.config",
    "preset": "llama_jax.config",
    "load_model_config": "llama_jax.config",
    "KVCache": "llama_jax.kv_cache",
    "Llama": "llama_jax.model",
    "create_model": "llama_jax.model",
    "MeshConfig": "llama_jax.config",
    "make_mesh": "llama_jax.sharding",
    "load_tokenizer": "llama_jax.tokenizers",
    "generate": "llama_jax.inference.api",
    "stream": "llama_jax.inference.api",
    "Completion": "llama_jax.inference.engine",
    "Event": "llama_jax.inference.scheduler",
    "GenerationSettings": "llama_jax.inference.settings",
    "Engine": "llama_jax.inference.engine",
    "Request": "llama_jax.inference.scheduler",
    "SamplingParams": "llama_jax.inference.sampling",
    "perplexity": "llama_jax.evaluate.perplexity",
    "TrainConfig": "llama_jax.train.config",
    "load_train_config": "llama_jax.train.config",
}
# Subpackages reachable as attributes: `llama_jax.train.run(config)`.
_SUBPACKAGES = ("commands", "convert", "evaluate", "inference", "serve", "tokenizers", "train")

__all__ = sorted(_EXPORTS) + list(_SUBPACKAGES)


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"llama_jax.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llama_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
