"""llama_jax: the LLaMA model family (1, 2, 3, 3.1, 3.2) in JAX + Flax NNX.

    import llama_jax
    loaded = llama_jax.load("models/stories260K")
    print(llama_jax.generate(loaded, ["Once upon a time"], max_new_tokens=50)[0].text)
    report = llama_jax.train.run(llama_jax.load_train_config("configs/tiny_test.yaml"))

Names are imported on first use, so `import llama_jax.tokenizers` (or a command line that fails on a bad
flag) does not pay for importing JAX.
"""

from llama_jax.hardware import quiet_libtpu_without_tpu
from llama_jax.lazy import lazy_exports

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
    "Completion": "llama_jax.inference.types",
    "Event": "llama_jax.inference.types",
    "GenerationSettings": "llama_jax.inference.settings",
    "Engine": "llama_jax.inference.engine",
    "EngineSettings": "llama_jax.inference.settings",
    "Request": "llama_jax.inference.types",
    "make_request": "llama_jax.inference.types",
    "SamplingParams": "llama_jax.inference.sampling",
    "perplexity": "llama_jax.evaluate.perplexity",
    "TrainConfig": "llama_jax.train.config",
    "load_train_config": "llama_jax.train.config",
}
# Subpackages reachable as attributes: `llama_jax.train.run(config)`.
_SUBPACKAGES = ("commands", "convert", "evaluate", "inference", "serve", "tokenizers", "train")

__all__ = sorted(_EXPORTS) + list(_SUBPACKAGES)
__getattr__ = lazy_exports(__name__, _EXPORTS, _SUBPACKAGES)
