"""Bring weights in and out: llama2.c files, Hugging Face and Meta checkpoints → model directories, and
model directories → Hugging Face.

    python -m llama_jax.convert llama2c MODEL.bin --tokenizer TOKENIZER.bin --out DIR
    python -m llama_jax.convert hf HF_DIR [--tokenizer tokenizer.model] --out DIR
    python -m llama_jax.convert hf OWNER/NAME --out DIR      (a repo already in the Hugging Face cache)
    python -m llama_jax.convert meta META_DIR --out DIR
    python -m llama_jax.convert to-hf DIR --out HF_DIR          (a LoRA run: its adapters in PEFT's format)
    python -m llama_jax.convert merge-lora RUN_DIR --out DIR    (a LoRA run's base and adapters, merged)

Every importer streams: the output tree is allocated once and filled one source tensor at a time.
"""

from llama_jax.lazy import lazy_exports

# Imported on first use, so `--help` of the convert command does not pay for importing JAX.
_EXPORTS = {
    "convert_hf": "llama_jax.convert.hf",
    "load_hf": "llama_jax.convert.hf",
    "convert_llama2c": "llama_jax.convert.llama2c",
    "load_llama2c": "llama_jax.convert.llama2c",
    "export_peft": "llama_jax.convert.lora_outputs",
    "merge_lora": "llama_jax.convert.lora_outputs",
    "convert_meta": "llama_jax.convert.meta",
    "load_meta": "llama_jax.convert.meta",
    "export_hf": "llama_jax.convert.to_hf",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
