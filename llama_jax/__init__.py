"""llama_jax: the LLaMA model family (1, 2, 3, 3.1, 3.2) in JAX + Flax NNX."""
from llama_jax.checkpoint import LoadedModel, load
from llama_jax.config import PRESETS, ModelConfig, RopeScaling, load_model_config, preset
from llama_jax.kv_cache import KVCache
from llama_jax.model import Llama, create_model
from llama_jax.sharding import MeshConfig, make_mesh

__all__ = ["KVCache", "Llama", "LoadedModel", "MeshConfig", "ModelConfig", "PRESETS", "RopeScaling", "create_model",
           "load", "load_model_config", "make_mesh", "preset"]
