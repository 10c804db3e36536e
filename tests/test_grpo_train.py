"""GRPO on train.py (`objective=grpo`), end to end on the real stories260K: the engine samples G completions per
prompt from the policy's own parameters, the rewards score them, the rows train only on completion tokens; the
metrics are TRL's; a run killed mid-run resumes to the same rollouts and losses; bad prompts and
rewards stop the run with one line. The loss formulas themselves are checked against TRL in test_grpo_loss.py
and test_grpo_objective.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from module_runner import free_port

from llama_jax.attention import SHARED_PREFIX
from llama_jax.inference.types import Completion
from llama_jax.train import run
from llama_jax.train.config import load_train_config
from llama_jax.train.rollout_rows import rows_one_per_completion, rows_shared_prompt

pytestmark = pytest.mark.slow  # the fast suite (-m 'not slow') leaves this module out

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
PROMPTS = ["Once upon a time", "Lily and Tom", "The big dog", "One day, a little", "Sam had a red"]
# A reward file as a user writes one for TRL: the signature, and fields of the record by keyword.
REWARD_FILE = """
def names_the_hero(completions, hero, **kwargs):
    return [1.0 if h in c else 0.0 for c, h in zip(completions, hero)]
"""


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("grpo_task")
    records = [{"prompt": p, "hero": hero} for p in PROMPTS for hero in ("Lily", "Tom")]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "reward.py").write_text(REWARD_FILE)
    return folder


def grpo_config(stories_model: Path, task: Path, run_dir: Path, *extra: str):
    return load_train_config(
        None,
        [
            f"init_from={stories_model}",
            "objective=grpo",
            f"data={task / 'prompts.jsonl'}",
            f"reward={task / 'reward.py'}:names_the_hero,regex:\\.$",
            "reward_weights=1,0.5",
            "grpo.num_generations=4",
            "grpo.max_completion_length=24",
            "grpo.beta=0.04",
            "seq_len=40",
            "batch_size=8",  # 2 prompts a step
            f"steps={STEPS}",
            "lr=1e-3",
            "warmup=1",
            "eval_every=3",
            "checkpoint_every=3",
            "log_every=1",
            "val_fraction=0.2",
            "samples=0",
            f"run_dir={run_dir}",
            *extra,
        ],
    )


def records(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.fixture(scope="module")
def trained(stories_model, task, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("grpo") / "run"
    return run_dir, run(grpo_config(stories_model, task, run_dir))


def test_a_grpo_run_reports_trls_metrics_and_its_held_out_reward(trained):
    run_dir, result = trained
    train = records(run_dir, "train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    names = {
        "loss",
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "rewards/names_the_hero/mean",
        "rewards/regex:\\.$/mean",
        "kl",
        "clip_ratio/region_mean",
        "completions/mean_length",
        "completions/clipped_ratio",
        "rollout_s",
    }
    assert names <= set(train[0]), sorted(train[0])
    # Step 1's policy is its reference (init_from), so the k3 KL is 0; later steps have moved away from it.
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert max(r["kl"] for r in train[1:]) > 0
    # One optimisation pass per batch: the ratio is exactly 1 and nothing is clipped (as in TRL).
    assert all(r["clip_ratio/region_mean"] == 0 for r in train)
    for r in train:  # the total is the weighted sum of the functions' means
        total = r["rewards/names_the_hero/mean"] + 0.5 * r["rewards/regex:\\.$/mean"]
        assert r["reward"] == pytest.approx(total, abs=1e-6)
        assert 0 < r["completions/mean_length"] <= 24
    evals = records(run_dir, "eval")
    # Step 0 too: the curve starts from init_from. Greedy and sampled, the loss None (GRPO has none to evaluate).
    assert [r["step"] for r in evals] == [0, 3, 6] and all(r["loss"] is None for r in evals)
    assert all(0 <= r["reward"] <= 1.5 and 0 <= r["sampled/reward"] <= 1.5 for r in evals)
    assert result["eval_loss"] is None and result["eval_reward"] == evals[-1]["reward"]
    assert result["step"] == STEPS and result["checkpoint_step"] == STEPS
    assert (run_dir / "loss.png").is_file()


def test_lora_grpo_samples_with_the_adapters_and_scores_kl_against_the_base_without_them(stories_model, task, tmp_path):
    """LoRA: the engine samples from the base and the adapters as trained, and the reference is the same base with
    the adapters off — so step 1's KL is 0 (B starts at zero) and it grows once the adapters move."""
    run_dir = tmp_path / "lora"
    extra = ("lora.rank=4", "lora.targets=q,v,down", "steps=3", "eval_every=3", "checkpoint_every=3", "lr=5e-3")
    result = run(grpo_config(stories_model, task, run_dir, *extra))
    train = records(run_dir, "train")
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-7) and train[-1]["kl"] > 0
    assert result["step"] == 3 and (run_dir / "checkpoints" / "3").is_dir()


def test_a_grpo_run_killed_mid_run_resumes_to_the_same_rollouts_and_losses(trained, stories_model, task, tmp_path):
    """`train.py` killed (SIGKILL) after step 4, past the step-3 checkpoint, then run again: rollouts are a function
    of (seed, step) and the restored parameters, so steps 4-6 sample the same completions (rewards, lengths) and
    compute the same losses as the uninterrupted run (the module's, in this process on the same two devices)."""
    run_dir = tmp_path / "killed"
    config = grpo_config(stories_model, task, run_dir)
    args = [f"{key}={value}" for key, value in _overrides(config).items()]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [sys.executable, "train.py", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while not any(r["step"] >= 4 for r in _records_so_far(run_dir)):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL  # killed mid-run, not finished before the kill
    assert not (run_dir / "checkpoints" / str(STEPS)).exists()
    resumed = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    compared = ("loss", "reward", "kl", "completions/mean_length", "grad_norm")
    first = {r["step"]: [r[k] for k in compared] for r in records(trained[0], "train")}
    again = {r["step"]: [r[k] for k in compared] for r in records(run_dir, "train")}  # the rerun's lines last
    assert {step: again[step] for step in (4, 5, 6)} == {step: first[step] for step in (4, 5, 6)}
    assert json.loads(resumed.stdout.splitlines()[-1])["eval_reward"] == trained[1]["eval_reward"]


def test_two_processes_sample_score_and_train_as_one_does(trained, stories_model, task, tmp_path):
    """A two-host job (one CPU device each, gloo collectives): both engines sample in lockstep, process 0 scores
    and sends the rewards, and every step's rewards, lengths and losses are those of one process of two devices."""
    run_dir = tmp_path / "two"
    args = [f"{key}={value}" for key, value in _overrides(grpo_config(stories_model, task, run_dir)).items()]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    port = free_port()
    hosts = [
        subprocess.Popen(
            [sys.executable, "train.py", *args, f"distributed.coordinator=localhost:{port}"]
            + ["distributed.num_processes=2", f"distributed.process_id={i}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [host.communicate(timeout=600) for host in hosts]
    for host, (_, stderr) in zip(hosts, outputs):
        assert host.returncode == 0, stderr[-3000:]
    results = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
    assert results[0] == results[1] and results[0]["eval_reward"] == trained[1]["eval_reward"]
    one, two = records(trained[0], "train"), records(run_dir, "train")
    assert [(r["reward"], r["completions/mean_length"]) for r in two] == [
        (r["reward"], r["completions/mean_length"]) for r in one
    ]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5, atol=1e-7)


def _overrides(config) -> dict[str, str]:
    """The command line of `grpo_config`'s settings."""
    return {
        "init_from": config.init_from,
        "objective": "grpo",
        "data": config.data,
        "reward": config.reward,
        "reward_weights": config.reward_weights,
        "grpo.num_generations": config.grpo.num_generations,
        "grpo.max_completion_length": config.grpo.max_completion_length,
        "grpo.beta": config.grpo.beta,
        "seq_len": config.seq_len,
        "batch_size": config.batch_size,
        "steps": config.steps,
        "lr": config.lr,
        "warmup": config.warmup,
        "eval_every": config.eval_every,
        "checkpoint_every": config.checkpoint_every,
        "log_every": config.log_every,
        "val_fraction": config.val_fraction,
        "samples": 0,
        "run_dir": config.run_dir,
    }


def _records_so_far(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []  # the last may be half written
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def test_a_rollout_row_is_its_prompt_then_its_completion_trained_on_the_completion_only():
    prompts = [[1, 5, 6], [1, 7]]
    completions = [Completion([8, 9], "", "stop", []), Completion([10, 11, 12], "", "length", [])]
    rows = rows_one_per_completion(prompts, completions, 2, np.array([0.5, -1.0]), seq_len=7, pad_id=0)
    # Row 0: prompt 1 5 6, completion 8 9, then the end id it stopped at (trained too); row 1 ran out of tokens.
    np.testing.assert_array_equal(rows["inputs"], [[1, 5, 6, 8, 9, 2, 0], [1, 7, 10, 11, 12, 0, 0]])
    np.testing.assert_array_equal(rows["targets"], [[5, 6, 8, 9, 2, 0, 0], [7, 10, 11, 12, 0, 0, 0]])
    np.testing.assert_array_equal(rows["loss_mask"], [[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(rows["segments"], [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, 3, 4, 5, 0])
    np.testing.assert_array_equal(rows["advantages"][:, 0], [0.5, -1.0])
    assert (rows["advantages"] == rows["advantages"][:, :1]).all()
    np.testing.assert_array_equal(rows["completion_size"], [[0, 0, 3, 3, 3, 0, 0], [0, 3, 3, 3, 0, 0, 0]])
    np.testing.assert_array_equal(rows["completion_starts"].sum(axis=1), [1, 1])
    with pytest.raises(ValueError, match="does not fit a row"):
        rows_one_per_completion(prompts, completions, 2, np.zeros(2), seq_len=4, pad_id=0)


def test_a_shared_prompt_row_holds_the_prompt_once_and_each_completion_after_it():
    """Prompt 1 5 6 with completions (8 9, stopped) and (10): the prefix 1 5 (segment SHARED_PREFIX), then each
    completion's segment starting from the prompt's last token 6 at position 2, its target the first token."""
    completions = [Completion([8, 9], "", "stop", []), Completion([10], "", "length", [])]
    rows = rows_shared_prompt([[1, 5, 6]] * 2, completions, 2, np.array([0.5, -1.0]), group=2, row_len=9, pad_id=0)
    np.testing.assert_array_equal(rows["inputs"], [[1, 5, 6, 8, 9, 6, 0, 0, 0]])
    np.testing.assert_array_equal(rows["targets"], [[5, 6, 8, 9, 2, 10, 0, 0, 0]])
    np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 3, 4, 2, 0, 0, 0]])
    np.testing.assert_array_equal(rows["segments"], [[SHARED_PREFIX, SHARED_PREFIX, 1, 1, 1, 2, 0, 0, 0]])
    np.testing.assert_array_equal(rows["loss_mask"], [[0, 0, 1, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(rows["advantages"], [[0, 0, 0.5, 0.5, 0.5, -1, 0, 0, 0]])
    np.testing.assert_array_equal(rows["completion_size"], [[0, 0, 3, 3, 3, 1, 0, 0, 0]])
    np.testing.assert_array_equal(rows["completion_starts"], [[0, 0, 1, 0, 0, 1, 0, 0, 0]])
    with pytest.raises(ValueError, match="take 6 positions, a row holds 5"):
        rows_shared_prompt([[1, 5, 6]] * 2, completions, 2, np.zeros(2), group=2, row_len=5, pad_id=0)


def test_a_prompt_shares_its_row_only_where_the_attention_takes_a_mask():
    from llama_jax.config import preset
    from llama_jax.train.rollout_rows import grpo_batch_shape, shares_prompt

    model = preset("tiny")
    grpo = ["objective=grpo", "init_from=x", "reward=regex:a", "grpo.num_generations=4", "grpo.max_completion_length=8"]
    config = load_train_config(None, [*grpo, "batch_size=16", "grad_accum=2", "seq_len=32"])
    assert shares_prompt(config, model, "cpu") and shares_prompt(config, model.replace(dtype="bfloat16"), "gpu")
    assert not shares_prompt(config, model, "tpu")  # splash's segment ids cannot show a prefix to other segments
    off = load_train_config(None, [*grpo, "batch_size=16", "grad_accum=2", "seq_len=32", "grpo.share_prompt=false"])
    assert not shares_prompt(off, model, "cpu")
    assert grpo_batch_shape(config, True) == (2, 2, 32 + 3 * 8)  # 4 prompts in 2 micro-batches, 4 completions a row
    assert grpo_batch_shape(config, False) == (2, 8, 32)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_a_shared_prompt_row_gives_each_completion_what_its_own_row_gives(stories_model, loss_type):
    """The real stories260K scores the same completions laid out both ways: every completion token's
    log-probability, the GRPO loss (each loss_type, with the KL to a reference) and its gradient agree — the
    completions see their prompt through the shared prefix exactly as they do in rows of their own."""
    import jax
    from flax import nnx

    from llama_jax.loading import load
    from llama_jax.train.objective_settings import GrpoSettings
    from llama_jax.train.objectives import GrpoLoss
    from llama_jax.train.step import token_losses

    model = load(stories_model, dtype="float32").model
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    reference = jax.tree.map(lambda w: w * 1.01, params)
    rng = np.random.default_rng(0)
    group, longest = 3, 6
    prompts = [prompt for size in (9, 4) for prompt in [[1, *rng.integers(3, 500, size)]] * group]
    completions = [
        Completion(list(rng.integers(3, 500, n)), "", reason, [])
        for n, reason in zip([5, 2, 6, 0, 3, 6], ["stop", "stop", "length", "stop", "stop", "length"])
    ]
    gains = rng.normal(size=len(completions)).astype(np.float32)
    alone = rows_one_per_completion(prompts, completions, 2, gains, 24, 0)
    shared = rows_shared_prompt(prompts, completions, 2, gains, group, 24 + (group - 1) * longest, 0)

    def forward(params, micro, dropout_key=None, temperature=1.0):
        return token_losses(graphdef, params, micro, 0, dropout_key, temperature)

    settings = GrpoSettings(num_generations=group, max_completion_length=longest, loss_type=loss_type, beta=0.1)
    objective = GrpoLoss(settings)
    results = []
    for rows in (alone, shared):
        micro = {name: np.asarray(value) for name, value in rows.items()}
        ref = -forward(reference, micro)[0]
        normaliser = objective.normaliser({name: value[None] for name, value in micro.items()})

        def loss_of(p, micro=micro, normaliser=normaliser, ref=ref):
            return objective.loss(forward, p, micro, normaliser, None, ref)[0]

        loss, grads = jax.value_and_grad(loss_of)(params)
        logprobs = -np.asarray(forward(params, micro)[0])[micro["loss_mask"] > 0]  # completion tokens, in order
        results.append((float(loss), grads, logprobs))
    (loss_a, grads_a, logprobs_a), (loss_b, grads_b, logprobs_b) = results
    np.testing.assert_allclose(logprobs_b, logprobs_a, rtol=1e-5, atol=1e-5)
    assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-7)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6)


def test_a_prompt_without_room_for_its_completion_is_refused_before_anything_is_written(stories_model, task, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "hero": "Lily"}) + "\n" for p in PROMPTS + ["word " * 30]))
    with pytest.raises(ValueError, match=r"long.jsonl:6: the prompt is \d+ tokens; with grpo.max_completion_length"):
        run(grpo_config(stories_model, task, tmp_path / "run", f"data={data}"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "last_record, reward, message",
    [
        ({"prompt": "Tom", "hero": "Tom", "completions": 1}, "regex:x", r"bad.jsonl:6: no field may be named complet"),
        ({"prompt": "Tom"}, "exact_match:hero", r"bad.jsonl:6: reward exact_match:hero compares with hero, which this"),
        ({"prompt": "Tom", "hero": "Tom"}, "FILE:wants_answer", r"wants_answer takes answer, which no record has"),
    ],
)
def test_records_that_do_not_give_the_rewards_their_fields_are_refused_before_anything_is_written(
    stories_model, task, tmp_path, last_record, reward, message
):
    """Checked on every record when the run starts: a record drawn hours into the run must not be the first to fail."""
    data = tmp_path / "bad.jsonl"
    records = [{"prompt": p, "hero": "Lily"} for p in PROMPTS] + [last_record]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    needs = "def wants_answer(completions, answer):\n    return [0.0 for _ in completions]\n"
    (tmp_path / "needs.py").write_text(needs)
    reward = reward.replace("FILE", str(tmp_path / "needs.py"))
    with pytest.raises(ValueError, match=message):
        run(grpo_config(stories_model, task, tmp_path / "run", f"data={data}", f"reward={reward}", "reward_weights=1"))
    assert not (tmp_path / "run").exists()


def test_a_reward_that_raises_stops_the_run_with_one_line_naming_it(stories_model, task, tmp_path):
    (tmp_path / "bad.py").write_text("def score(completions, **kwargs):\n    return [1 / 0 for _ in completions]\n")
    args = [f"init_from={stories_model}", f"data={task / 'prompts.jsonl'}", f"run_dir={tmp_path / 'run'}"]
    args += [f"reward={tmp_path / 'bad.py'}:score", "objective=grpo", "grpo.num_generations=2", "batch_size=4"]
    args += ["grpo.max_completion_length=4", "seq_len=32", "steps=1", "samples=0"]
    result = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad.py:score" in errors[0] and "ZeroDivisionError" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
