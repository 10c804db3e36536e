"""Generation: one engine for every path (infer.py, the server, evaluation, the trainer's samples, the API).

settings.py      GenerationSettings: how to generate, checked once
sampling.py      greedy, temperature, top-k, top-p, a setting per row; per-request random streams
prompts.py       prompt text → ids (BOS or a chat template), and the room check
scheduler.py     continuous batching, host side: admission, chunked prefill, stop ids and strings, cancellation
prefix_cache.py  which whole prompt chunks the prefix pool holds, keyed by everything before them (LRU)
slots.py         continuous batching, device side: decode slots over one KV cache and a prefix pool
programs.py      the device programs slots.py compiles and calls: prefill, extend, admit, decode, restore, save
engine.py        the engine: generate, stream, warm-up, a background loop for the server; Completion
batch.py         many prompts through the engine, completions in input order (infer.py, evaluate generate)
api.py           `llama_jax.generate` and `llama_jax.stream`: text in, text out
prompt_files.py  reading infer.py's prompt files; results_file.py: its resumable JSONL output
compile.py       `--compile-for`: the engine's programs compiled for a TPU slice
"""
