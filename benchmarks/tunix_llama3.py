"""tunix's llama3 model from a `convert to-hf` export, for the benchmarks that race tunix (decode.py's tunix part,
grpo_tunix_peer.py). It runs in a Python with google-tunix installed: numpy, jax and tunix only, no llama_jax.

tunix's attention calls `apply_rope(inputs, positions, head_dim)` without the config's rope_theta, so it gets the
function's default of 10^6; the module's `apply_rope` is bound to the export's rope_theta here, so that tunix's
model computes what ours does.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path


def load_llama3(hf_dir: str | Path, dtype: str, mesh=None):
    """(model, config): tunix's llama3 model with the export's weights in `dtype`, placed on `mesh` (None: its
    default), apply_rope bound to the export's rope_theta."""
    import jax.numpy as jnp
    from tunix.models.llama3 import model as model_lib
    from tunix.models.llama3 import params as params_lib

    c = json.loads((Path(hf_dir) / "config.json").read_text())
    if c.get("rope_scaling"):
        raise ValueError(f"{hf_dir}: rope_scaling {c['rope_scaling']} is not what these benchmarks compare")
    config = model_lib.ModelConfig(
        num_layers=c["num_hidden_layers"],
        vocab_size=c["vocab_size"],
        embed_dim=c["hidden_size"],
        hidden_dim=c["intermediate_size"],
        num_heads=c["num_attention_heads"],
        head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        rope_theta=c["rope_theta"],
        norm_eps=c["rms_norm_eps"],
        weight_tying=c.get("tie_word_embeddings", False),
    )
    model_lib.apply_rope = functools.partial(model_lib.apply_rope, rope_theta=c["rope_theta"])
    model = params_lib.create_model_from_safe_tensors(str(hf_dir), config, mesh, dtype=getattr(jnp, dtype))
    return model, config
