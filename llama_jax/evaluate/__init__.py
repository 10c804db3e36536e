"""Scoring models: `python -m llama_jax.evaluate` (llama_jax/commands/evaluate.py, installed as `llama-jax-eval`).

perplexity.py       perplexity of a text file, in windows of the model's length
held_out.py         a training run's own validation rows, scored as its evaluation scored them
generation_task.py  prompts completed by the engine and scored against references (`evaluate generate`)
text_metrics.py     BLEU (sacrebleu), ROUGE (rouge-score), exact match
harness.py          lm-evaluation-harness tasks with a llama_jax model (`evaluate harness`)
"""
