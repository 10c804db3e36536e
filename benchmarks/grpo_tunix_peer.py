"""The tunix side of the GRPO race: google-tunix 0.1.7's own GRPO (`tunix.rl.grpo.grpo_learner.GRPOLearner` on an
`RLCluster` with its "vanilla" rollout engine, tunix's `Sampler`) trains a `to-hf` export on a prompts file with an
exact-match reward, and this reports its step times. It runs ONLY in a Python with google-tunix installed (numpy,
jax, flax, optax, sentencepiece, tunix; nothing of llama_jax), as a subprocess of our side:

    /tmp/tunixenv/bin/python benchmarks/grpo_tunix_peer.py --hf-dir HF_DIR --tokenizer TOKENIZER.model \\
        --prompts PROMPTS.jsonl --num-generations 8 --prompts-per-step 2 --max-prompt-length 64 \\
        --max-completion-length 8 --temperature 1.0 --beta 0.0 --epsilon 0.2 --lr 1e-3 --steps 20 --seed 0 \\
        --answer-field response --out RESULT.json

What it does, per step: P = --prompts-per-step records of PROMPTS.jsonl (`{"prompt": TEXT, FIELD: ANSWER}`; TEXT is
the model's whole prompt, passed through unchanged, encoded as BOS + SentencePiece ids, no EOS), walked in a fixed
order (a seeded permutation per epoch; --order file keeps the file's order), each repeated G = --num-generations
times; tunix samples P×G completions of at most --max-completion-length tokens (stopping at the tokenizer's EOS),
rewards each 1.0 when its text, stripped, equals the record's --answer-field value, stripped (else 0.0), and makes
one AdamW update on all P×G completions (num_iterations 1: one optimizer step per GRPO step).

What it measures (wall clock, CPU or whatever JAX's default backend is; one mesh ("fsdp", "tp") = (all devices, 1)):
  * step_s: the median of the whole GRPO step (tunix's `_run_global_step`: rollout, reward, advantages, the
    reference log-probs when beta > 0, update), steps after the first; first_step_s: the first step, which
    includes every compilation;
  * rollout_s: the median of `RLCluster.generate` (tokenize, prefill + decode loop, detokenize), steps after the
    first; update_s: the median of `RLCluster.update_actor` (the policy loss's forward/backward and the AdamW
    update), blocked until the new parameters are ready, steps after the first;
  * rollout_tokens_per_s: completion tokens generated (each completion's tokens up to and including its EOS, at
    most --max-completion-length) over rollout time, summed over the steps after the first;
  * rewards: the mean reward of each step's P×G completions (every step, the first included).

RESULT.json: {"tunix_version", "steps", "first_step_s", "step_s", "rollout_s", "update_s", "rollout_tokens_per_s",
"rewards", "loss_type", "notes", plus per-step lists "step_times_s", "rollout_times_s", "update_times_s",
"completion_tokens" and the "settings" used}; one summary line goes to stdout.

Where tunix's defaults differ from what was asked, and what this does about it:
  * tunix's llama3 attention calls `apply_rope` without the config's rope_theta (its default is 10^6): the module's
    `apply_rope` is replaced by one bound to the export's rope_theta (as benchmarks/decode.py does), so tunix's model
    computes what ours does.
  * The SentencePiece model has no pad piece (pad_id -1), which tunix's SentencePiece adapter refuses; a small
    adapter gives tunix encode/decode/bos/eos and pad = EOS (as tunix does for HF Llama-3 tokenizers). Nothing
    tunix pads with is ever a live token: prompts hold no EOS and tunix cuts each completion before its EOS.
  * GRPOConfig's defaults: beta 0.04, loss_agg_mode "sequence-mean-token-mean", num_generations 2: set to --beta,
    "token-mean" (TRL's "dapo": the sum of the per-token losses over all completion tokens of the step, divided by
    their count) and G. beta 0 means tunix builds no reference model and computes no reference log-probs; beta > 0
    loads a second, frozen copy of the weights as the reference and sets kl_loss_mode "low_var_kl" (k3,
    exp(ref - logp) - (ref - logp) - 1, as TRL and ours) instead of tunix's default "kl" (k1, logp - ref).
    epsilon: tunix's clip is symmetric, [1 - epsilon, 1 + epsilon] (GRPOConfig has no epsilon_high).
  * Advantages (tunix's "grpo" estimator): (r - group mean) / (group std with ddof=1 + 1e-6); TRL adds 1e-4.
  * tunix trains on each completion's tokens BEFORE its EOS: the sampler cuts the completion at the EOS and the
    learner masks only the tokens it returns, so the EOS token itself gets no gradient (TRL's completion mask
    includes it). Not changeable without editing tunix; reported in notes.
  * RolloutConfig.seed defaults to None, which tunix's Sampler turns into PRNGKey(0) on every call (the same
    sampling noise every step): the seed is set to fold_in(PRNGKey(--seed), step) before each step's rollout.
  * RolloutConfig.temperature defaults to 0.9, max_prompt_length 64, max_tokens_to_generate 64, kv_cache_size
    1024: set to --temperature, --max-prompt-length, --max-completion-length and their sum. top_p 1.0, top_k None
    (pure sampling from softmax(logits / T)). tunix left-pads every prompt to --max-prompt-length, so the prefill
    is always that long; a prompt longer than that is an error here (tunix would silently grow the padded length).
  * Optimizer: optax.adamw(--lr, b1 --adam-b1 0.9, b2 --adam-b2 0.999, eps --adam-eps 1e-8, weight_decay
    --weight-decay 0.0), constant learning rate, no warmup; --grad-clip > 0 chains clip_by_global_norm first.
    Full-parameter training (no LoRA), parameters in --dtype (float32).
  * tunix's learner runs data preparation (rollout) in a worker thread and may overlap it with training when actor
    and rollout sit on different meshes; here they share one mesh (and one copy of the weights), so tunix runs
    rollout then update, in sequence, with no weight sync.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CPU race; set JAX_PLATFORMS to run elsewhere

from tunix_llama3 import load_llama3  # noqa: E402  (benchmarks/: tunix's model from the export)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="a Hugging Face Llama export (config.json + safetensors)")
    p.add_argument("--tokenizer", required=True, help="a SentencePiece tokenizer.model")
    p.add_argument("--prompts", required=True, help='JSONL records {"prompt": TEXT, ANSWER_FIELD: ANSWER}')
    p.add_argument("--answer-field", default="response")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--max-prompt-length", type=int, default=64)
    p.add_argument("--max-completion-length", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--epsilon", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--adam-b1", type=float, default=0.9)
    p.add_argument("--adam-b2", type=float, default=0.999)
    p.add_argument("--adam-eps", type=float, default=1e-8)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=0.0, help="global-norm clip before AdamW; 0: none")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--order",
        choices=["seeded", "file"],
        default="seeded",
        help="prompt order: a seeded permutation per epoch, or the file's order (cycled)",
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", required=True, help="RESULT.json")
    args = p.parse_args(argv)
    if args.num_generations < 2:
        p.error("--num-generations must be at least 2 (tunix's GRPOConfig refuses fewer)")
    if args.steps < 1 or args.prompts_per_step < 1:
        p.error("--steps and --prompts-per-step must be positive")
    return args


class SentencePieceForTunix:
    """What tunix's TokenizerAdapter needs (encode, decode, bos_id, eos_id, pad_id). The sampler prepends BOS
    itself, so encode adds nothing; pad is EOS (the model has no pad piece; see the module docstring)."""

    def __init__(self, path: str):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
            raise ValueError(f"{path}: SentencePiece model without BOS/EOS pieces")

    def encode(self, text, **_):
        return self._sp.encode(str(text))

    def decode(self, ids, **_):
        return self._sp.decode([int(i) for i in ids])

    def bos_id(self):
        return self._sp.bos_id()

    def eos_id(self):
        return self._sp.eos_id()

    def pad_id(self):
        return self._sp.eos_id()


def read_records(path: str, answer_field: str) -> list[tuple[str, str]]:
    records = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "prompt" not in record or answer_field not in record:
            raise ValueError(f"{path}:{n}: a record needs 'prompt' and {answer_field!r}")
        records.append((str(record["prompt"]), str(record[answer_field])))
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def prompt_order(n: int, steps: int, per_step: int, seed: int, order: str) -> list[list[int]]:
    """Each step's record indices: every record once per epoch, epochs in a seeded permutation (or file order)."""
    import numpy as np

    need = steps * per_step
    indices: list[int] = []
    epoch = 0
    while len(indices) < need:
        perm = np.arange(n) if order == "file" else np.random.default_rng([seed, epoch]).permutation(n)
        indices.extend(int(i) for i in perm)
        epoch += 1
    return [indices[s * per_step : (s + 1) * per_step] for s in range(steps)]


def completion_tokens(tokens, max_len: int) -> int:
    """Tokens a completion cost to generate: those tunix returns (cut before EOS) plus the EOS, if it came."""
    n = len(tokens)
    return n + 1 if n < max_len else n


def main(argv=None) -> None:
    args = parse_args(argv)

    import jax
    import numpy as np
    import optax
    import tunix
    from flax import nnx
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    notes: list[str] = []
    records = read_records(args.prompts, args.answer_field)
    tokenizer = SentencePieceForTunix(args.tokenizer)
    G, P = args.num_generations, args.prompts_per_step
    for n, (text, _) in enumerate(records, 1):
        length = 1 + len(tokenizer.encode(text))  # BOS + text, as tunix's Sampler encodes it
        if length > args.max_prompt_length:
            raise ValueError(
                f"{args.prompts}:{n}: the prompt is {length} tokens (BOS included), over --max-prompt-length "
                f"{args.max_prompt_length}"
            )

    devices = jax.devices()
    # A Mesh with Auto axes (jax.make_mesh's default Explicit axes make tunix's embedding gather fail).
    mesh = jax.sharding.Mesh(np.array(devices).reshape(len(devices), 1), ("fsdp", "tp"))
    model, config = load_llama3(args.hf_dir, args.dtype, mesh)

    optimizer = optax.adamw(
        args.lr, b1=args.adam_b1, b2=args.adam_b2, eps=args.adam_eps, weight_decay=args.weight_decay
    )
    if args.grad_clip > 0:
        optimizer = optax.chain(optax.clip_by_global_norm(args.grad_clip), optimizer)
    cache_size = args.max_prompt_length + args.max_completion_length
    rollout_config = base_rollout.RolloutConfig(
        max_tokens_to_generate=args.max_completion_length,
        max_prompt_length=args.max_prompt_length,
        kv_cache_size=cache_size,
        temperature=args.temperature,
        top_p=1.0,
        top_k=None,
        eos_tokens=[tokenizer.eos_id()],
        seed=jax.random.PRNGKey(args.seed),
    )
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={
            rl_cluster_lib.Role.ACTOR: mesh,
            rl_cluster_lib.Role.REFERENCE: mesh,
            rl_cluster_lib.Role.ROLLOUT: mesh,
        },
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optimizer,
            eval_every_n_steps=10**9,
            max_steps=args.steps,
            mini_batch_size=None,  # the whole step's batch: one optimizer update per step
            train_micro_batch_size=None,
        ),
        rollout_config=rollout_config,
    )
    reference = None
    if args.beta != 0.0:
        # A second, frozen copy of the starting weights (tunix needs its own module for the reference role).
        reference, _ = load_llama3(args.hf_dir, args.dtype, mesh)
    cluster = rl_cluster_lib.RLCluster(
        actor=model, reference=reference, tokenizer=tokenizer, cluster_config=cluster_config
    )
    grpo_config = grpo_learner.GRPOConfig(
        num_generations=G,
        num_iterations=1,
        beta=args.beta,
        epsilon=args.epsilon,
        loss_agg_mode="token-mean",
        kl_loss_mode="low_var_kl",  # k3, as TRL; tunix's default "kl" is k1. Unused with beta 0.
    )

    step_rewards: list[float] = []

    def exact_match(prompts, completions, answer, **_):
        rewards = [float(str(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]
        step_rewards.append(float(np.mean(rewards)))
        return rewards

    learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=grpo_config, reward_fns=[exact_match])

    # Timing hooks: instance attributes shadowing the methods tunix's learner calls.
    times: dict[str, list[float]] = {"step": [], "rollout": [], "update": []}
    tokens_per_step: list[int] = []
    base_key = jax.random.PRNGKey(args.seed)
    generate, update_actor, run_global_step = cluster.generate, cluster.update_actor, learner._run_global_step

    def timed_generate(*a, **k):
        # tunix's default seed (None) would be PRNGKey(0) every step: a fresh key per step instead.
        rollout_config.seed = jax.random.fold_in(base_key, len(times["rollout"]))
        start = time.perf_counter()
        out = generate(*a, **k)  # tokens come back as host arrays: synced
        times["rollout"].append(time.perf_counter() - start)
        tokens_per_step.append(sum(completion_tokens(t, args.max_completion_length) for t in out.tokens))
        return out

    def timed_update_actor(*a, **k):
        start = time.perf_counter()
        out = update_actor(*a, **k)
        jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
        times["update"].append(time.perf_counter() - start)
        return out

    def timed_global_step(*a, **k):
        start = time.perf_counter()
        out = run_global_step(*a, **k)
        jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
        times["step"].append(time.perf_counter() - start)
        print(
            f"step {len(times['step'])}: {times['step'][-1]:.3f}s (rollout {times['rollout'][-1]:.3f}s, update "
            f"{times['update'][-1]:.3f}s), {tokens_per_step[-1]} completion tokens, mean reward "
            f"{step_rewards[-1]:.3f}",
            file=sys.stderr,
            flush=True,
        )
        return out

    cluster.generate = timed_generate
    cluster.update_actor = timed_update_actor
    learner._run_global_step = timed_global_step

    # One batch per step: numpy arrays (tunix repeats every field G times along axis 0; a list of strings would
    # be a pytree of leaves instead). Extra fields reach the reward function as keyword arguments.
    batches = [
        {
            "prompts": np.array([records[i][0] for i in step], dtype=object),
            "answer": np.array([records[i][1] for i in step], dtype=object),
        }
        for step in prompt_order(len(records), args.steps, P, args.seed, args.order)
    ]
    start = time.perf_counter()
    learner.train(batches)
    total_s = time.perf_counter() - start

    steps_done = len(times["step"])
    if steps_done != args.steps:
        notes.append(f"tunix ran {steps_done} steps of the {args.steps} asked for")

    def median_after_first(values):
        return statistics.median(values[1:]) if len(values) > 1 else None

    later_rollout = sum(times["rollout"][1:])
    notes += [
        "pad id = EOS id (the SentencePiece model has no pad piece); tunix cuts each completion before its EOS, "
        "so the EOS token gets no gradient",
        f"optimizer: optax.adamw(lr={args.lr}, b1={args.adam_b1}, b2={args.adam_b2}, eps={args.adam_eps}, "
        f"weight_decay={args.weight_decay}), constant lr, no warmup"
        + (f", clip_by_global_norm({args.grad_clip})" if args.grad_clip > 0 else ", no gradient clipping"),
        "loss: tunix GRPOLearner, policy_loss_fn 'grpo', loss_agg_mode 'token-mean' (sum over all completion "
        "tokens of the step / their count); symmetric clip [1-eps, 1+eps]; advantages (r - mean) / (std ddof=1 "
        "+ 1e-6) per group",
        "beta 0: no reference model"
        if args.beta == 0.0
        else f"beta {args.beta}: reference = a frozen copy of "
        "the starting weights, KL = k3 (tunix's kl_loss_mode 'low_var_kl'; its default 'kl' is k1)",
        f"rollout: tunix vanilla Sampler, temperature {args.temperature}, top_p 1.0, no top_k, prompts left-padded "
        f"to {args.max_prompt_length}, KV cache {cache_size}, seed fold_in(PRNGKey({args.seed}), step) per step "
        "(tunix's default would reuse PRNGKey(0) every step)",
        f"prompt order: {'a seeded permutation per epoch' if args.order == 'seeded' else 'file order'}",
        f"devices: {len(devices)} x {devices[0].platform}, mesh (fsdp, tp) = ({len(devices)}, 1), dtype {args.dtype}",
    ]
    result = {
        "tunix_version": tunix.__version__,
        "steps": steps_done,
        "first_step_s": times["step"][0] if times["step"] else None,
        "step_s": median_after_first(times["step"]),
        "rollout_s": median_after_first(times["rollout"]),
        "update_s": median_after_first(times["update"]),
        "rollout_tokens_per_s": sum(tokens_per_step[1:]) / later_rollout if later_rollout > 0 else None,
        "rewards": step_rewards,
        "loss_type": "token-mean",
        "notes": notes,
        "step_times_s": times["step"],
        "rollout_times_s": times["rollout"],
        "update_times_s": times["update"],
        "completion_tokens": tokens_per_step,
        "total_s": total_s,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    def fmt(value, unit="s"):
        return "-" if value is None else f"{value:.3f}{unit}"

    tps = result["rollout_tokens_per_s"]
    line = [
        f"tunix {result['tunix_version']} GRPO: {steps_done} steps of {P}x{G},",
        f"first step {fmt(result['first_step_s'])}, then step {fmt(result['step_s'])}",
        f"(rollout {fmt(result['rollout_s'])}, update {fmt(result['update_s'])}),",
        f"rollout {'-' if tps is None else f'{tps:,.0f}'} tok/s, mean reward first/last",
        f"{step_rewards[0]:.3f}/{step_rewards[-1]:.3f}" if step_rewards else "-",
        f"-> {args.out}",
    ]
    print(" ".join(line))


if __name__ == "__main__":
    main()
