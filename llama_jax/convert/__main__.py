"""`python -m llama_jax.convert`: see llama_jax/commands/convert.py (installed as `llama-jax-convert`)."""

from llama_jax.commands.convert import cli

cli()
