"""GRPO's RL variants against hand-computed values: RLOO's leave-one-out advantage
(`grpo.advantage: rloo`), GSPO's sequence-level importance ratio
(`grpo.importance_sampling_level: sequence`) and CISPO's truncated, detached importance weight
(`grpo.loss_type: cispo`); then each through the trainer and through the pipeline's grpo stage."""
import json
import math
from pathlib import Path

import pytest
import torch
from test_grpo import make_trainer, prompt_items, row_seeded

from alignflow.trainers.grpo import GRPOArgs, group_advantages, grpo_loss, importance_ratio, loss_items
from alignflow.trainers.rewards import register_reward


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- RLOO: the leave-one-out baseline ----

def test_rloo_advantages_by_hand():
    rewards = torch.tensor([3.0, 1, 0, 0, 2, 2, 2, 2])
    # Group 1 sums to 4: the other three rewards average (4 − r_i)/3 = 1/3, 1, 4/3, 4/3, so
    # A = 3 − 1/3, 1 − 1, 0 − 4/3, 0 − 4/3. Group 2 has no spread: 0.
    loo = torch.tensor([8 / 3, 0, -4 / 3, -4 / 3, 0, 0, 0, 0])
    torch.testing.assert_close(group_advantages(rewards, 4, "none", "rloo"), loo)
    # "group": group 1's deviations from its mean 1 are 2, 0, −1, −1: unbiased var 6/3 = 2.
    torch.testing.assert_close(group_advantages(rewards, 4, "group", "rloo"), loo / (math.sqrt(2) + 1e-4))
    # "batch": all 8 rewards, mean 1.5, deviations 1.5, −0.5, −1.5, −1.5 and 0.5 four times:
    # unbiased var (2.25 + 0.25 + 2.25 + 2.25 + 4·0.25)/7 = 8/7.
    torch.testing.assert_close(group_advantages(rewards, 4, "batch", "rloo"), loo / (math.sqrt(8 / 7) + 1e-4))
    # Two completions: each one's baseline is the other's reward; GRPO's is half of that.
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 0.0]), 2, "none", "rloo"),
                               torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 0.0]), 2, "none", "group"),
                               torch.tensor([0.5, -0.5]))
    with pytest.raises(ValueError, match="advantage"):
        group_advantages(rewards, 4, "none", "loo")
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(rewards, 1, "none", "rloo")


# ---- GSPO: one length-normalised ratio per sequence ----

def gspo_example():
    """Old log-probs 0, so logps are the log-ratios. ε = 0.2.

    seq 0, A = +1, log-ratios [0.3, −0.1, −0.05]: mean 0.05, s₀ = e^0.05 ≈ 1.0513, inside
        [0.8, 1.2]: each token's loss −s₀.
    seq 1, A = −2, log-ratios [−0.4, −0.2 | masked 0.7]: mean −0.3 (the masked token left out),
        s₁ = e^−0.3 ≈ 0.7408 < 0.8 with A < 0: clipped, each token's loss −(0.8·−2) = 1.6.
    (Per token, seq 1's second token, ρ = e^−0.2 ≈ 0.819, would not be clipped.)"""
    logps = torch.tensor([[0.3, -0.1, -0.05], [-0.4, -0.2, 0.7]]).requires_grad_()
    return dict(logps=logps, old_logps=torch.zeros(2, 3), ref_logps=None, advantages=torch.tensor([1.0, -2.0]),
                completion_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]), epsilon_low=0.2, epsilon_high=0.2,
                importance_sampling_level="sequence")


def test_gspo_sequence_ratio_by_hand():
    ex = gspo_example()
    ratio = importance_ratio(ex["logps"], ex["old_logps"], ex["completion_mask"], "sequence")
    s0, s1 = math.exp(0.05), math.exp(-0.3)
    torch.testing.assert_close(ratio, torch.tensor([[s0, s0, s0], [s1, s1, s1]]))
    with pytest.raises(ValueError, match="mask"):
        importance_ratio(ex["logps"], ex["old_logps"], None, "sequence")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        importance_ratio(ex["logps"], ex["old_logps"], ex["completion_mask"], "sentence")


@pytest.mark.parametrize("loss_type, expected_loss, expected_grad", [
    # token sum −3·s₀ + 2·1.6 over 5 tokens; seq 0's tokens each get d(−3·s₀)/d logp = −3·s₀/3, over 5
    ("dapo", (-3 * math.exp(0.05) + 3.2) / 5, -math.exp(0.05) / 5),
    # the GSPO paper's normalisation: sequence means −s₀ and 1.6, averaged; −s₀/3 per token, over 2 sequences
    ("grpo", (-math.exp(0.05) + 1.6) / 2, -math.exp(0.05) / 6),
])
def test_gspo_loss_and_gradient_by_hand(loss_type, expected_loss, expected_grad):
    ex = gspo_example()
    loss, metrics = grpo_loss(**ex, loss_type=loss_type)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    loss.backward()
    # The sequence ratio reaches each of seq 0's tokens equally; clipped seq 1 and the masked token get none.
    g = expected_grad
    torch.testing.assert_close(ex["logps"].grad, torch.tensor([[g, g, g], [0.0, 0.0, 0.0]]))
    # Clip statistics stay per-token means: seq 1's two tokens of five, clipped low.
    assert metrics["clip_ratio/low"].item() == pytest.approx(2 / 5)
    assert metrics["clip_ratio/high"].item() == 0.0
    assert metrics["clip_ratio/region"].item() == pytest.approx(2 / 5)


# ---- CISPO: the truncated, detached importance weight times A·logp ----

def cispo_example():
    """ε_high = 0.2: the weight is truncated at 1.2, with no lower bound.

    seq 0, A = +1, logp [−1, −2, −0.5], old [−1, −2.5, −0.2]: ρ = [1, e^0.5 ≈ 1.649 → 1.2, e^−0.3 ≈ 0.741]
        losses −w·A·logp = [1, 2.4, 0.5·e^−0.3 ≈ 0.370]
    seq 1, A = −2, logp [−0.5, −1 | masked −3], old [−1, −1 | 0]: ρ = [e^0.5 → 1.2, 1]
        losses [−(1.2·−2·−0.5), −(1·−2·−1)] = [−1.2, −2]
    Token sum 0.2 + 0.5·e^−0.3 over 5 active tokens."""
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.5, -1.0, -3.0]]).requires_grad_()
    old = torch.tensor([[-1.0, -2.5, -0.2], [-1.0, -1.0, 0.0]])
    return dict(logps=logps, old_logps=old, ref_logps=None, advantages=torch.tensor([1.0, -2.0]),
                completion_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]), epsilon_low=0.2, epsilon_high=0.2,
                loss_type="cispo")


def test_cispo_loss_by_hand_and_gradient_through_logp_only():
    ex = cispo_example()
    loss, metrics = grpo_loss(**ex)
    assert loss.item() == pytest.approx((0.2 + 0.5 * math.exp(-0.3)) / 5, abs=1e-6)
    loss.backward()
    # d/d logp = −w·A over 5 tokens, w detached: the truncated tokens (0,1) and (1,0) still get
    # 1.2·A (GRPO's clip would give them 0), ρ < 1 is not raised (0,2), the masked token gets 0.
    expected = torch.tensor([[-1.0, -1.2, -math.exp(-0.3)], [2.4, 2.0, 0.0]]) / 5
    torch.testing.assert_close(ex["logps"].grad, expected)
    # The weight was truncated on 2 of 5 tokens; there is no lower bound to hit.
    assert metrics["clip_ratio/high"].item() == pytest.approx(2 / 5)
    assert metrics["clip_ratio/low"].item() == 0.0
    assert metrics["clip_ratio/region"].item() == pytest.approx(2 / 5)
    # Normalised as dapo: the active tokens.
    assert loss_items(ex["completion_mask"], "cispo") == 5


def test_cispo_adds_the_kl_term_like_the_others():
    ex = cispo_example()
    # ref = logp + log 2 everywhere: k3 = 2 − log 2 − 1 per token, and d(β·k3)/d logp = β·(1 − 2).
    ex["ref_logps"] = ex["logps"].detach() + math.log(2)
    loss, metrics = grpo_loss(**ex, beta=0.1)
    assert loss.item() == pytest.approx((0.2 + 0.5 * math.exp(-0.3)) / 5 + 0.1 * (1 - math.log(2)), abs=1e-6)
    assert metrics["kl"].item() == pytest.approx(1 - math.log(2))
    loss.backward()
    expected = (torch.tensor([[-1.0, -1.2, -math.exp(-0.3)], [2.4, 2.0, 0.0]])
                + torch.tensor([[-0.1, -0.1, -0.1], [-0.1, -0.1, 0.0]])) / 5
    torch.testing.assert_close(ex["logps"].grad, expected)


# ---- the defaults ----

def test_defaults_are_group_advantages_and_token_ratios():
    args = GRPOArgs()
    assert (args.advantage, args.importance_sampling_level, args.loss_type) == ("group", "token", "dapo")
    from alignflow.stages.config import load_config
    grpo = load_config("tiny").grpo
    assert (grpo.advantage, grpo.importance_sampling_level, grpo.loss_type) == ("group", "token", "dapo")
    # The functions' defaults are the same numbers, bit for bit, as naming them.
    rewards = torch.tensor([3.0, 1, 0, 0, 2, 2, 5, 2])
    assert torch.equal(group_advantages(rewards, 4), group_advantages(rewards, 4, "group", "group"))
    ex = gspo_example()
    del ex["importance_sampling_level"]
    plain, _ = grpo_loss(**ex)
    (plain_grad,) = torch.autograd.grad(plain, ex["logps"])
    named, _ = grpo_loss(**ex, importance_sampling_level="token")
    (named_grad,) = torch.autograd.grad(named, ex["logps"])
    assert torch.equal(plain, named) and torch.equal(plain_grad, named_grad)
    # ... and differ from the sequence level (seq 1's second token is clipped only there).
    assert not torch.equal(plain, grpo_loss(**gspo_example())[0])
    with pytest.raises(ValueError):
        GRPOArgs(advantage="loo")
    with pytest.raises(ValueError):
        GRPOArgs(importance_sampling_level="sentence")


# ---- through the trainer ----

def sgd_step(num_iterations: int = 1, **settings) -> tuple[dict, dict]:
    """One trainer step with plain SGD at lr 1 and no clipping (the weight change is minus the
    gradient): (the change of every weight, the step's metrics)."""
    trainer = make_trainer(prompt_items(2, seed=1), max_steps=1, optimizer="sgd", lr=1.0, max_grad_norm=None,
                           generate_fn=row_seeded(4), num_iterations=num_iterations, **settings)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.training_step(list(trainer.train_loader))
    return {k: v - start[k] for k, v in trainer.model.state_dict().items()}, metrics


def assert_same_step(a: dict, b: dict, factor: float = 1.0):
    for name in a:
        torch.testing.assert_close(a[name], factor * b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_each_variant_trains_through_the_trainer():
    """On-policy (one update per round, ρ ≡ 1 in value), GSPO's and CISPO's gradients equal
    GRPO's: the sequence ratio's gradient −A·s·(1/|y|) summed over |y| tokens is −A per token, and
    CISPO's −1·A·∇logp is the surrogate's. RLOO with unscaled rewards is G/(G−1) = 4/3 times the
    group advantage, so the SGD step is 4/3 times GRPO's. With a second update on the same rollouts
    (ρ ≠ 1) the variants part from GRPO."""
    grpo, _ = sgd_step(beta=0.0, scale_rewards="none")
    assert max(v.abs().max() for v in grpo.values()) > 1e-4  # the step did move the weights
    rloo, m = sgd_step(beta=0.0, scale_rewards="none", advantage="rloo")
    assert_same_step(rloo, grpo, 4 / 3)
    assert math.isfinite(m["loss"]) and math.isfinite(m["reward"])
    for variant in ({"importance_sampling_level": "sequence"}, {"loss_type": "cispo"}):
        step, m = sgd_step(beta=0.0, scale_rewards="none", **variant)
        assert_same_step(step, grpo)
        assert math.isfinite(m["loss"]), variant

    two_grpo, _ = sgd_step(num_iterations=2, epsilon=0.01, scale_rewards="none")
    for variant in ({"importance_sampling_level": "sequence"}, {"loss_type": "cispo"}):
        step, m = sgd_step(num_iterations=2, epsilon=0.01, scale_rewards="none", **variant)
        assert max((step[k] - two_grpo[k]).abs().max() for k in step) > 1e-4, variant
        for key in ("loss", "kl", "clip_ratio/region", "entropy"):
            assert math.isfinite(m[key]), (variant, key)
        # ε = 0.01 after an SGD step at lr 1: the second update's ratios leave [0.99, 1.01].
        assert m["clip_ratio/region"] > 0, variant


# ---- through the pipeline ----

@register_reward("test_distinct_characters")
def distinct_characters(prompts, completions, **columns):
    """Differs between almost any two samples: no group of the tiny SFT model's has zero advantages
    (the demo's exact_match and format give its sampled completions 0 throughout)."""
    return [float(len(set(c))) for c in completions]


VARIANTS = {"rloo": {"grpo.advantage": "rloo"},
            "gspo": {"grpo.importance_sampling_level": "sequence", "grpo.loss_type": "grpo"},
            "cispo": {"grpo.loss_type": "cispo", "grpo.epsilon_high": 4.0}}


def test_each_variant_runs_through_the_pipeline(prefect_harness, small_config, tmp_path):
    """pretrain -> sft once, then the grpo stage once per variant: a grpo-only setting retrains
    grpo alone. Two updates per round, so GSPO's and CISPO's ratios are not all 1."""
    from alignflow.flows.pipeline import alignment_pipeline

    seen = {}
    for name, variant in VARIANTS.items():
        config = small_config(runs_dir=str(tmp_path / "runs"), run_id="variants", **{
            "eval.stages": [], "demo.grpo_prompts": 16, "grpo.train.max_steps": 2, "grpo.train.batch_size": 2,
            "grpo.train.log_interval": 1, "grpo.train.warmup_steps": 0, "grpo.num_generations": 4,
            "grpo.max_completion_length": 8, "grpo.num_iterations": 2,
            "grpo.reward_funcs": ["test_distinct_characters"], **variant})
        out = alignment_pipeline(config=config, align="grpo")
        stages = out["stages"]
        assert not stages["grpo"].get("skipped"), name
        if seen:  # pretrain and sft are shared by every variant
            assert stages["sft"].get("skipped") and stages["sft"]["content_hash"] == seen["sft"], name
        seen["sft"] = stages["sft"]["content_hash"]
        stage_dir = Path(stages["grpo"]["path"])
        manifest = json.loads((stage_dir / "manifest.json").read_text())
        recorded = manifest["config"]["grpo"]
        for key, value in variant.items():
            assert recorded[key.removeprefix("grpo.")] == value, (name, key)
        records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if "reward" in r and "loss" in r]
        assert [r["step"] for r in train] == [1, 2], name
        for r in train:
            for key in ("loss", "reward", "kl", "clip_ratio/region"):
                assert math.isfinite(r[key]), (name, key, r)
            assert r["frac_reward_zero_std"] < 1, (name, r)  # some advantages are not 0: the variant's maths ran
        seen[name] = manifest["content_hash"]
    assert len({seen[name] for name in VARIANTS}) == len(VARIANTS)  # three different models


# ---- truncated importance sampling (an inference engine's rollouts) ----

def test_truncated_importance_sampling_by_hand():
    """w = min(exp(old − engine), cap) multiplies each token's surrogate, not its KL term.

    old [−1, −2, −0.5], engine [−1.5, −2, 0]: ρ_engine = e^0.5, 1, e^−0.5; cap 1.5 truncates the
    first. With one update (logp = old, ρ = 1) and A = 2, the surrogate per token is −A·w; with
    ref = logp + log 2 each token's k3 is 1 − log 2, and d(β·k3)/d logp = β·(1 − 2)."""
    from alignflow.trainers.grpo import truncated_is_weights

    old = torch.tensor([[-1.0, -2.0, -0.5]])
    weights, capped = truncated_is_weights(old, torch.tensor([[-1.5, -2.0, 0.0]]), cap=1.5)
    w = [1.5, 1.0, math.exp(-0.5)]
    torch.testing.assert_close(weights, torch.tensor([w]))
    assert capped.tolist() == [[1.0, 0.0, 0.0]]

    logps = old.clone().requires_grad_()
    loss, metrics = grpo_loss(logps, old, logps.detach() + math.log(2), torch.tensor([2.0]),
                              torch.ones(1, 3), beta=0.1, loss_type="dapo", tis_weights=weights)
    assert loss.item() == pytest.approx((-2 * sum(w) + 3 * 0.1 * (1 - math.log(2))) / 3, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logps.grad, (-2 * torch.tensor([w]) - 0.1) / 3)
    assert metrics["kl"].item() == pytest.approx(1 - math.log(2))


@pytest.mark.parametrize("settings, says", [
    ({"engine": "hf", "tis_cap": 2.0}, "tis_cap corrects an inference engine's sampling"),
    ({"engine": "vllm", "tis_cap": 0.0}, "tis_cap must be > 0"),
])
def test_a_tis_cap_without_an_engine_or_below_zero_is_refused(settings, says):
    with pytest.raises(ValueError, match=says):
        GRPOArgs(rollout=settings)


def test_tis_is_on_by_default_with_an_engine_only():
    assert GRPOArgs().rollout.resolved_tis_cap is None
    assert GRPOArgs(rollout={"engine": "vllm"}).rollout.resolved_tis_cap == 3.0
    assert GRPOArgs(rollout={"engine": "vllm", "tis_cap": "off"}).rollout.resolved_tis_cap is None
    assert GRPOArgs(rollout={"engine": "vllm", "tis_cap": 1.5}).rollout.resolved_tis_cap == 1.5
