"""The GRPO race: `train.py objective=grpo` against tunix 0.1.7's GRPO on the same model, task, group size, batch,
lengths and optimizer, each side in a process of its own, one after the other on the same machine.

    python benchmarks/grpo.py --tunix-python /tmp/tunixenv/bin/python            # README's table (runs/sft_early)
    python benchmarks/grpo.py --init-from RUN --steps 40 --config configs/grpo_example.yaml

The task is configs/grpo_example.yaml's (the SFT demo's question, an exact-match reward on the answer, 8 samples of
at most 4 tokens for each of 4 prompts a step), started from --init-from (the demo's `runs/sft_early`), which is
exported with `convert to-hf` for tunix's llama3 model. Both sides see the same prompts in the same order: this
script writes tunix's prompt file from the run's own `PromptSet.train(step, ...)`, each prompt as the text of its
ids (the chat template rendered), which tunix encodes again with BOS. Both train every parameter with AdamW at a
constant learning rate (b1 0.9, b2 0.95, eps 1e-5, no weight decay, the gradient norm clipped to 1), beta 0 (no
reference model), epsilon 0.2, one optimisation pass per batch, token-mean loss (TRL's "dapo").

Measured per step, the first step (compilation) apart, medians: the whole step, the rollout (generation, rewards
and the rows) and the rest (the update: forward, backward, AdamW); rollout tokens/s (completion tokens, the end
token included, over rollout time); and the mean training reward over the first and the last quarter of the steps.
tunix's side is `benchmarks/grpo_tunix_peer.py` (its docstring lists where tunix's GRPO differs: it never trains
the end token, it left-pads prompts to a fixed length). The table names the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from llama_jax.hardware import host_cpu  # noqa: E402

# The optimizer both sides run (tunix's peer takes them as flags; ours as train.py keys).
OPTIMIZER = {"beta1": 0.9, "beta2": 0.95, "adam_eps": 1e-5, "weight_decay": 0.0, "grad_clip": 1.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init-from", default="runs/sft_early", help="the model both sides start from (a run)")
    parser.add_argument("--config", default="configs/grpo_example.yaml", help="the GRPO run's settings")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--tunix-python", help="a Python with google-tunix 0.1.7 installed (else ours alone)")
    return parser.parse_args(argv)


def our_settings(args) -> list[str]:
    return [
        f"init_from={args.init_from}",
        f"steps={args.steps}",
        f"lr={args.lr}",
        "warmup=0",
        "min_lr_ratio=1",
        *(f"{key}={value}" for key, value in OPTIMIZER.items()),
        "grpo.beta=0",
        "grpo.epsilon=0.2",
        "grpo.loss_type=dapo",
        f"eval_every={args.steps}",
        f"checkpoint_every={args.steps}",
        "log_every=1",
        "samples=0",
    ]


def run_ours(args, run_dir: Path) -> dict:
    command = [sys.executable, "train.py", "--config", args.config, *our_settings(args), f"run_dir={run_dir}"]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    from llama_jax.train.config import load_train_config

    config = load_train_config(str(REPO / args.config), our_settings(args))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    later = [r for r in train if "tokens_per_s" in r]  # the first step has no rate: its clock started with it
    step_s = [config.batch_size * config.seq_len / r["tokens_per_s"] for r in later]
    rollout_s = [r["rollout_s"] for r in later]
    return summary(
        first_step_s=None,
        step_s=step_s,
        rollout_s=rollout_s,
        update_s=[s - r for s, r in zip(step_s, rollout_s)],
        tokens=sum(r["completion_tokens"] for r in later),
        rewards=[r["reward"] for r in train],
    )


def tunix_inputs(args, scratch: Path) -> tuple[list[str], Path, Path]:
    """tunix's flags and files: the to-hf export, and the prompts in the order our run draws them."""
    from llama_jax.train.config import load_train_config
    from llama_jax.train.inputs import read_inputs

    config = load_train_config(str(REPO / args.config), [*our_settings(args), f"run_dir={scratch / 'unused'}"])
    inputs = read_inputs(config)
    group = config.grpo.num_generations
    per_step = config.batch_size // group
    prompts_file = scratch / "prompts.jsonl"
    with prompts_file.open("w") as f:
        for step in range(args.steps):
            for record in inputs.prompts.train(step, per_step, config.seed):
                text = inputs.tokenizer.decode(list(record.ids[1:]))  # the template rendered; tunix adds BOS
                f.write(json.dumps({"prompt": text, "response": record.fields["response"]}) + "\n")
    hf = scratch / "hf"
    convert = [sys.executable, "-m", "llama_jax.convert", "to-hf", args.init_from, "--out", str(hf)]
    subprocess.run(convert, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    longest = max(len(r.ids) for r in inputs.prompts.records)
    flags = [
        "--hf-dir", str(hf), "--tokenizer", str(inputs.tokenizer_path), "--prompts", str(prompts_file),
        "--order", "file", "--answer-field", "response", "--num-generations", str(group),
        "--prompts-per-step", str(per_step), "--max-prompt-length", str(longest),
        "--max-completion-length", str(config.grpo.max_completion_length),
        "--temperature", str(config.grpo.temperature), "--beta", "0", "--epsilon", "0.2", "--lr", str(args.lr),
        "--adam-b1", str(OPTIMIZER["beta1"]), "--adam-b2", str(OPTIMIZER["beta2"]),
        "--adam-eps", str(OPTIMIZER["adam_eps"]), "--weight-decay", "0", "--grad-clip", str(OPTIMIZER["grad_clip"]),
        "--steps", str(args.steps), "--seed", str(config.seed),
    ]  # fmt: skip
    return flags, hf, prompts_file


def run_tunix(args, scratch: Path) -> dict:
    flags, _, _ = tunix_inputs(args, scratch)
    out = scratch / "tunix.json"
    peer = [args.tunix_python, str(HERE / "grpo_tunix_peer.py"), *flags, "--out", str(out)]
    subprocess.run(peer, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    later = slice(1, None)
    return summary(
        first_step_s=result["first_step_s"],
        step_s=result["step_times_s"][later],
        rollout_s=result["rollout_times_s"][later],
        update_s=result["update_times_s"][later],
        tokens=sum(result["completion_tokens"][later]),
        rewards=result["rewards"],
    )


def summary(first_step_s, step_s, rollout_s, update_s, tokens, rewards) -> dict:
    quarter = max(1, len(rewards) // 4)
    return {
        "step_s": statistics.median(step_s),
        "rollout_s": statistics.median(rollout_s),
        "update_s": statistics.median(update_s),
        "rollout_tok_s": tokens / sum(rollout_s),
        "reward_first": statistics.mean(rewards[:quarter]),
        "reward_last": statistics.mean(rewards[-quarter:]),
    }


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="llama_jax-grpo-") as scratch:
        scratch = Path(scratch)
        sides = {"llama_jax": run_ours(args, scratch / "run")}
        if args.tunix_python:
            sides["tunix 0.1.7"] = run_tunix(args, scratch)
    print(f"GRPO, {args.config} from {args.init_from}, {args.steps} steps, lr {args.lr}; CPU: {host_cpu()}")
    print("| side | s/step | rollout s | update s | rollout tok/s | reward, first quarter | reward, last quarter |")
    print("|---|---|---|---|---|---|---|")
    for name, side in sides.items():
        print(
            f"| {name} | {side['step_s']:.3f} | {side['rollout_s']:.3f} | {side['update_s']:.3f} | "
            f"{side['rollout_tok_s']:,.0f} | {side['reward_first']:.3f} | {side['reward_last']:.3f} |"
        )
    if "tunix 0.1.7" in sides:
        ours, theirs = sides["llama_jax"], sides["tunix 0.1.7"]
        print(
            f"llama_jax / tunix: {theirs['step_s'] / ours['step_s']:.2f}x steps per second, rollout "
            f"{theirs['rollout_s'] / ours['rollout_s']:.2f}x, update {theirs['update_s'] / ours['update_s']:.2f}x"
        )


if __name__ == "__main__":
    main()
