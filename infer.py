"""`python infer.py`: see llama_jax/commands/infer.py (installed as `llama-jax-infer`)."""

from llama_jax.commands.infer import cli, main  # noqa: F401  (tests call main)

if __name__ == "__main__":
    cli()
