"""Fine-tuning Llama 3 8B on one chip: full fine-tuning vs LoRA vs QLoRA, memory per chip from the TPU compiler.

    python benchmarks/finetune_memory.py            # needs the tpu extra (libtpu); no TPU, no weights
    python benchmarks/finetune_memory.py dpo        # the modes whose name contains this

For each single-chip slice (v5e-1: 16 GiB HBM, v6e-1: 32 GiB) and each mode, the real train step of
`train.py` is compiled for the chip (`--compile-for`'s code) and XLA's peak memory per chip is printed:
  * full:  every parameter trained (float32 master weights, AdamW moments);
  * lora:  rank-16 adapters on q, k, v, o, gate, up, down; the base frozen in bf16;
  * qlora: the same adapters on an int8 base (per-channel scales);
  * lora-dpo, qlora-dpo: DPO (`objective=dpo`) with those adapters: one preference pair per step (two
    sequences), the reference being the same frozen base with the adapters off;
  * lora-grpo, qlora-grpo: GRPO (`objective=grpo`) with those adapters: one prompt's 8 completions per step
    (8 rows of 2048 tokens, completions of up to 1024), and the engine's rollout programs on the same weights
    (a prefill of 4 prompts, the decode loop of 8 sequences with their KV cache) with the optimizer state held
    beside them; the row shows the function with the highest peak.
One 2048-token sequence (or pair) per step, full remat, bf16 compute, the splash attention kernel. The model directory
is a config.json alone (compiling reads no weights).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_jax.config import preset  # noqa: E402
from llama_jax.hardware import tpu_slice  # noqa: E402
from llama_jax.model_dir import write_config  # noqa: E402
from llama_jax.train.compile import compile_training  # noqa: E402
from llama_jax.train.config import load_train_config  # noqa: E402

GiB = 1 << 30
MODES = {
    "full": [],
    "lora": ["lora.rank=16", "lora.targets=q,k,v,o,gate,up,down"],
    "qlora": ["lora.rank=16", "lora.targets=q,k,v,o,gate,up,down", "lora.int8_base=true"],
}
MODES["lora-dpo"] = [*MODES["lora"], "objective=dpo", "batch_size=2"]
MODES["qlora-dpo"] = [*MODES["qlora"], "objective=dpo", "batch_size=2"]
# GRPO: one prompt's 8 completions a step, each row a prompt and a completion of up to 1024 tokens; the train step
# and the engine's rollout programs (prefill, decode of the 8 sequences) beside the train state.
GRPO = ["objective=grpo", "reward=exact_match:answer", "grpo.num_generations=8", "grpo.max_completion_length=1024"]
MODES["lora-grpo"] = [*MODES["lora"], *GRPO, "batch_size=8", "grad_accum=8"]
MODES["qlora-grpo"] = [*MODES["qlora"], *GRPO, "batch_size=8", "grad_accum=8"]


def main() -> None:
    wanted = sys.argv[1] if len(sys.argv) > 1 else ""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        write_config(base, preset("llama3-8b").replace(max_seq_len=2048), None, None)
        print("| slice | mode | arguments GiB | temporaries GiB | peak GiB per chip | HBM GiB | fits |")
        print("|---|---|---|---|---|---|---|")
        for slice_name in ("v5e-1", "v6e-1"):
            for mode, extra in MODES.items():
                if wanted not in mode:
                    continue
                config = load_train_config(
                    None,
                    [
                        f"init_from={base}",
                        "seq_len=2048",
                        "batch_size=1",
                        "dtype=bfloat16",
                        "model.remat=full",
                        "data=unused.txt",
                        *extra,  # after batch_size: DPO's pair
                    ],
                )
                reports = compile_training(config, tpu_slice(slice_name))
                train = max(reports, key=lambda report: report.peak_bytes)
                shown = mode if len(reports) < 3 else f"{mode} ({train.name})"  # GRPO: its largest program
                fits = all(report.fits for report in reports)
                print(
                    f"| {slice_name} | {shown} | {train.argument_bytes / GiB:.1f} | {train.temp_bytes / GiB:.1f} | "
                    f"{train.peak_bytes / GiB:.1f} | {train.hbm_bytes / GiB:.2f} | {'yes' if fits else 'no'} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
