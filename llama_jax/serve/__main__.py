"""`python -m llama_jax.serve`: see llama_jax/commands/serve.py (installed as `llama-jax-serve`)."""

from llama_jax.commands.serve import cli

cli()
