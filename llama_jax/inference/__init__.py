"""Generation: one engine for every path (infer.py, the server, evaluation, the trainer's samples, the API).

The engine's users see only its settings and the values of types.py; everything from scheduler.py down is
the engine's own.

types.py         the boundary: Request (made by make_request), Event, Completion, Handle, Program, EngineStatus
settings.py      GenerationSettings (how to generate) and EngineSettings (the engine's size), each checked once
sampling.py      greedy, temperature, top-k, top-p, a setting per row; per-request random streams
prompts.py       prompt text → ids (BOS or a chat template), and the room check
engine.py        the engine: generate, stream, submit, status, warm-up, a background loop for the server
scheduler.py     continuous batching, host side: admission, chunked prefill, stop ids and strings, cancellation
pages.py         the page pool, host side: which pages of the KV cache each sequence holds, reference counts
prefix_cache.py  which whole prompt chunks the prefix cache keeps (their pages), keyed by everything before them
slots.py         continuous batching, device side: the decode slots' arrays and the calls that update them
compiled.py      which programs an engine runs, its state's layout, each program lowered and compiled once
packing.py       requests packed into the host arrays each program takes
programs.py      the device programs: prefill, extend, admit, decode
batch.py         many prompts through the engine, completions in input order (infer.py, evaluate generate)
api.py           `llama_jax.generate` and `llama_jax.stream`: text in, text out
prompt_files.py  reading infer.py's prompt files; results_file.py: its resumable JSONL output
compile.py       `--compile-for`: the engine's programs compiled for a TPU slice
"""
