"""The command lines, one module each, installed as commands (pyproject's [project.scripts]):

    llama-jax-train    = python train.py               (train.py)
    llama-jax-infer    = python infer.py               (infer.py)
    llama-jax-convert  = python -m llama_jax.convert   (convert.py)
    llama-jax-eval     = python -m llama_jax.evaluate  (evaluate.py)
    llama-jax-serve    = python -m llama_jax.serve     (serve.py)

Each parses its arguments before importing JAX, so `--help` and a mistyped flag answer at once, and runs
through `cli.run_cli`: a user's mistake is one `error:` line and exit status 2.
"""
