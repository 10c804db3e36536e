"""Generation: from prompt text to completions on a mesh.

settings.py      GenerationSettings: how to generate, checked once
sampling.py      greedy, temperature, top-k, top-p; per-prompt random streams
decode.py        the device side: prefill, decode step, the on-device decode loop
prompts.py       prompt text → ids (BOS or a chat template), and the room check
generator.py     the text-level API: Generator, generate, stream
prompt_files.py  reading prompt files; results_file.py: the resumable JSONL output of infer.py
"""
