"""`python -m llama_jax.evaluate`: see llama_jax/commands/evaluate.py (installed as `llama-jax-eval`)."""

from llama_jax.commands.evaluate import cli

cli()
