"""Scoring models: perplexity of a text (`perplexity.py`).

`python -m llama_jax.evaluate` runs llama_jax/commands/evaluate.py (installed as `llama-jax-eval`).
"""
