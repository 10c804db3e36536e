"""An OpenAI-compatible server over the continuous-batching engine: `python -m llama_jax.serve`.

protocol.py  the OpenAI request and response formats
app.py       the FastAPI routes over an `inference.engine.Engine`
__main__.py  runs llama_jax/commands/serve.py, the command line (installed as `llama-jax-serve`)
"""
