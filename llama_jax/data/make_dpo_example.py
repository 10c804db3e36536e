"""Writes dpo_example.jsonl: preference pairs made from sft_example.jsonl's "is this a question?" records.

    python -m llama_jax.data.make_dpo_example      # rewrites llama_jax/data/dpo_example.jsonl

Each SFT record becomes a pair with the same prompt: its right answer chosen, the other answer ("Yes" for
"No", "No" for "Yes") rejected. The data of `configs/dpo_example.yaml`, in the same order as the SFT records,
so its held-out pairs ask about the same lines the SFT example holds out.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
OTHER = {"Yes": "No", "No": "Yes"}


def main() -> None:
    records = [json.loads(line) for line in (HERE / "sft_example.jsonl").read_text().splitlines() if line]
    with (HERE / "dpo_example.jsonl").open("w") as f:
        for record in records:
            pair = {"prompt": record["prompt"], "chosen": record["response"], "rejected": OTHER[record["response"]]}
            f.write(json.dumps(pair) + "\n")


if __name__ == "__main__":
    main()
