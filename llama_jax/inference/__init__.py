"""Generation: from prompt text to completions on a mesh.

settings.py      GenerationSettings: how to generate, checked once
sampling.py      greedy, temperature, top-k, top-p; per-prompt random streams
prompts.py       prompt text → ids (BOS or a chat template), and the room check
decode.py        the device side of `generator.py`: prefill, decode step, the on-device decode loop
generator.py     the text-level API: Generator, generate, stream
scheduler.py     continuous batching, host side: admission, stop ids and strings, cancellation
slots.py         continuous batching, device side: decode slots over one KV cache
engine.py        the continuous-batching engine: generate, stream, a background loop for the server
batch.py         many prompts through the engine, results in input order (infer.py, evaluate generate)
prompt_files.py  reading infer.py's prompt files; results_file.py: its resumable JSONL output
compile.py       `infer.py --compile-for`: prefill and a decode step compiled for a TPU slice
"""
