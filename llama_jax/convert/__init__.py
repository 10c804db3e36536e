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

from llama_jax.convert.hf import convert_hf, load_hf
from llama_jax.convert.llama2c import convert_llama2c, load_llama2c
from llama_jax.convert.lora_outputs import export_peft, merge_lora
from llama_jax.convert.meta import convert_meta, load_meta
from llama_jax.convert.to_hf import export_hf

__all__ = [
    "convert_hf",
    "convert_llama2c",
    "convert_meta",
    "export_hf",
    "export_peft",
    "load_hf",
    "load_llama2c",
    "load_meta",
    "merge_lora",
]
