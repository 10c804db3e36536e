"""`python train.py`: see llama_jax/commands/train.py (installed as `llama-jax-train`)."""

from llama_jax.commands.train import cli, main  # noqa: F401  (tests call main)

if __name__ == "__main__":
    cli()
