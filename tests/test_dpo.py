"""DPO (`objective=dpo`): the loss and its gradient are TRL's formulas (written again here in PyTorch, not taken
from our code), the reference is init_from (LoRA: the same base with the adapters off; otherwise a frozen
copy) so the first step's loss is exactly log 2, the loss falls and the rewards separate on the real
stories260K, a run that lost its last checkpoint resumes to the same losses, sharding the batch or the weights
gives the same losses, and malformed preference data is refused with one clear error."""

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.train import run
from llama_jax.train.config import DpoSettings, load_train_config
from llama_jax.train.preference import pair_losses, response_logprobs, valid_pairs

pytestmark = pytest.mark.slow  # the fast suite (-m 'not slow') leaves this module out

STEPS = 16


def dpo_config(stories_model: Path, run_dir: Path, *extra: str):
    return load_train_config(
        None,
        [
            f"init_from={stories_model}",
            "objective=dpo",
            "chat_template=llama2",
            "data=dpo_example.jsonl",
            "seq_len=96",
            "batch_size=8",  # 4 pairs
            f"steps={STEPS}",
            "lr=2e-3",
            "warmup=2",
            "eval_every=8",
            "eval_batches=4",
            "checkpoint_every=8",
            "log_every=1",
            "samples=0",
            f"run_dir={run_dir}",
            *extra,
        ],
    )


def records(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


# --- the loss: TRL's DPOTrainer formulas, independently in PyTorch ------------------------------------------


def torch_dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, smoothing):
    """TRL DPOTrainer.dpo_loss for loss_type sigmoid (with label smoothing) and ipo."""
    torch = pytest.importorskip("torch")
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = (
            -torch.nn.functional.logsigmoid(beta * logits) * (1 - smoothing)
            - torch.nn.functional.logsigmoid(-beta * logits) * smoothing
        )
    return losses.mean(), beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


@pytest.mark.parametrize("loss, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_the_loss_and_its_gradient_are_trls(loss, smoothing):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    pairs = 6
    policy = rng.normal(-20, 5, 2 * pairs)  # rows interleaved: chosen, rejected, chosen, ...
    reference = policy + rng.normal(0, 2, 2 * pairs)
    settings = DpoSettings(beta=0.3, loss=loss, label_smoothing=smoothing)
    counted = jnp.ones(2 * pairs)

    def ours(policy):
        per_pair = pair_losses(policy, jnp.asarray(reference), counted, settings)
        return jnp.mean(per_pair["loss"]), per_pair

    (value, per_pair), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(policy))
    p = torch.tensor(policy, dtype=torch.float64, requires_grad=True)
    r = torch.tensor(reference, dtype=torch.float64)
    expected, chosen, rejected = torch_dpo(p[0::2], p[1::2], r[0::2], r[1::2], 0.3, loss, smoothing)
    expected.backward()
    np.testing.assert_allclose(float(value), expected.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), p.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(per_pair["rewards_chosen"]), chosen.numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(per_pair["rewards_rejected"]), rejected.numpy(), rtol=1e-5)
    accuracy = (chosen > rejected).double().numpy()
    np.testing.assert_array_equal(np.asarray(per_pair["reward_accuracy"]), accuracy)


def test_a_response_s_log_probability_is_the_sum_of_its_tokens_or_their_mean_for_ipo():
    nll = jnp.asarray([[0.5, 1.0, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    mask = jnp.asarray([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert response_logprobs(nll, mask, mean=False).tolist() == [-3.0, -1.0]
    assert response_logprobs(nll, mask, mean=True).tolist() == [-1.5, -1.0]


def test_a_pair_with_an_empty_side_counts_nowhere():
    per_pair = pair_losses(jnp.zeros(4), jnp.zeros(4), jnp.asarray([3.0, 0.0, 2.0, 5.0]), DpoSettings())
    assert per_pair["pairs"].tolist() == [0.0, 1.0]
    assert per_pair["loss"][0] == 0 and per_pair["loss"][1] == pytest.approx(math.log(2))
    # The data counts the pairs it cut off by the same rule, on numpy counts.
    assert valid_pairs(np.asarray([[3, 0, 2, 5]])).tolist() == [[False, True]]


# --- training on the real stories260K ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(stories_model, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dpo") / "run"
    result = run(dpo_config(stories_model, run_dir, "lora.rank=8", "lora.alpha=16", "lora.targets=q,v,o,down"))
    return run_dir, result


def test_lora_dpo_starts_at_log_2_and_the_rewards_separate(trained):
    """At step 1 the policy is the reference (the adapters' B matrices start at zero), so every pair's margin
    is 0 and the loss is log 2 exactly: the reference really is the base with the adapters off."""
    run_dir, result = trained
    train = records(run_dir, "train")
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[0]["reward_accuracy"] == 0 and train[0]["rewards_chosen"] == 0 == train[0]["rewards_rejected"]
    assert train[0]["pairs"] == 4
    late = train[-8:]  # 4 pairs a step: single steps are noisy
    assert np.mean([r["loss"] for r in late]) < math.log(2), [r["loss"] for r in train]
    assert np.mean([r["reward_margin"] for r in late]) > 0
    evals = records(run_dir, "eval")
    assert {"loss", "rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin"} <= set(evals[-1])
    assert evals[-1]["loss"] < math.log(2) and evals[-1]["reward_accuracy"] > 0.5, evals
    assert result["eval_perplexity"] is None and result["eval_reward_accuracy"] == evals[-1]["reward_accuracy"]


def test_a_dpo_run_that_lost_its_last_checkpoint_resumes_to_the_same_losses(trained, stories_model, tmp_path):
    run_dir, result = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / str(STEPS))
    resumed = run(dpo_config(stories_model, copy, "lora.rank=8", "lora.alpha=16", "lora.targets=q,v,o,down"))
    assert (resumed["train_loss"], resumed["eval_loss"]) == (result["train_loss"], result["eval_loss"])


def test_full_dpo_against_a_frozen_copy_is_the_same_sharded_either_way(stories_model, tmp_path):
    """Without LoRA the reference is a copy of init_from: step 1's loss is log 2 again; the batch split over
    the devices (data=2) and the weights split over them (tensor=2) give the same losses."""
    losses = {}
    for mesh in ("mesh.data=2", "mesh.tensor=2"):
        run_dir = tmp_path / mesh
        extra = (mesh, "mesh.data=1") if mesh != "mesh.data=2" else (mesh,)
        run(dpo_config(stories_model, run_dir, "steps=4", "eval_every=4", "checkpoint_every=4", "lr=1e-3", *extra))
        losses[mesh] = [r["loss"] for r in records(run_dir, "train")]
    assert losses["mesh.data=2"][0] == pytest.approx(math.log(2), abs=1e-6)
    np.testing.assert_allclose(losses["mesh.data=2"], losses["mesh.tensor=2"], rtol=2e-5)
    assert abs(losses["mesh.data=2"][-1] - math.log(2)) > 1e-3  # the policy moved away from its reference


@pytest.mark.parametrize(
    "record, extra, message",
    [
        ({"prompt": "a", "chosen": "b"}, (), 'needs string "prompt", "chosen" and "rejected"'),
        ({"prompt": "a", "chosen": "b", "rejected": " "}, (), "the chosen or the rejected response is empty"),
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, ("batch_size=6", "grad_accum=2"), "must be even"),
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, ("sft=true",), "drop sft=true"),
    ],
)
def test_bad_preference_data_and_settings_are_refused(stories_model, tmp_path, record, extra, message):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join([json.dumps({"prompt": "x", "chosen": "y", "rejected": "z"})] * 8 + [json.dumps(record)]))
    with pytest.raises(ValueError, match=message):
        run(dpo_config(stories_model, tmp_path / "run", f"data={data}", *extra))
    assert not (tmp_path / "run").exists()


def test_held_out_evaluation_of_a_dpo_run_says_what_it_reports_instead(trained):
    from llama_jax.evaluate.held_out import held_out_loss

    run_dir, _ = trained
    with pytest.raises(ValueError, match="is a DPO run: its held-out evaluation is the DPO loss"):
        held_out_loss(run_dir)
