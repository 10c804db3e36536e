"""An OpenAI-compatible server over the continuous-batching engine: `python -m llama_jax.serve`.

protocol.py  the OpenAI request and response formats; fields it does not implement are refused by name
app.py       the FastAPI routes over an `inference.engine.Engine`, the body limit, the access log
metrics.py   Prometheus metrics under vLLM's names
__main__.py  runs llama_jax/commands/serve.py, the command line (installed as `llama-jax-serve`)
"""
