"""One module per tokenizer file format; use `llama_jax.tokenizer.load_tokenizer` to pick one."""
