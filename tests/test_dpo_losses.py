"""The DPO family's losses (trainers/dpo/loss.py) against values worked out by hand, their
gradients, the limiting cases their papers state, and combinations (loss_weights, rpo_alpha)."""
import math

import pytest
import torch

from alignflow.trainers.dpo import LOSS_TYPES, DPOArgs, dpo_loss

# log σ by hand: −log σ(z) = log(1 + e^−z).
NEG_LOG_SIGMOID_1 = math.log(1 + math.exp(-1))       # 0.31326168751822286
NEG_LOG_SIGMOID_M1 = math.log(1 + math.exp(1))       # 1.31326168751822280
NEG_LOG_SIGMOID_HALF = math.log(1 + math.exp(-0.5))  # 0.47407698418010663
NEG_LOG_SIGMOID_MHALF = math.log(1 + math.exp(0.5))  # 0.97407698418010663
SIGMOID_HALF = 1 / (1 + math.exp(-0.5))              # 0.62245933120185459
SIGMOID_1 = 1 / (1 + math.exp(-1))                   # 0.73105857863000490


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# Two pairs with β = 0.5. Chosen log-ratios (policy − ref) are [+1, −1], rejected [−1, +1],
# so Δ = [2, −2] and βΔ = [1, −1]: the first pair is ranked right, the second wrong.
# Completion lengths, where a loss needs them: chosen [2, 4], rejected [1, 2].
POLICY_CHOSEN, POLICY_REJECTED = t(-2.0, -5.0), t(-4.0, -3.0)
REF_CHOSEN, REF_REJECTED = t(-3.0, -4.0), t(-3.0, -4.0)
LENGTHS = dict(chosen_lengths=torch.tensor([2, 4]), rejected_lengths=torch.tensor([1, 2]))


def loss_of(loss_type, beta=0.5, **kw):
    return dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=beta, loss_type=loss_type, **kw)[0]


def assert_values(actual, *expected):
    torch.testing.assert_close(actual, t(*expected), rtol=0, atol=1e-12)


# ---- the four from before ----

def test_sigmoid_loss_by_hand():
    assert math.isclose(NEG_LOG_SIGMOID_1, 0.31326168751822286, rel_tol=1e-15)
    assert_values(loss_of("sigmoid"), 0.31326168751822286, 1.3132616875182228)


def test_sigmoid_label_smoothing_by_hand():
    # ε = 0.1: 0.9·(−log σ(z)) + 0.1·(−log σ(−z)).
    #   z = +1: 0.9·0.313261687518 + 0.1·1.313261687518 = 0.413261687518
    #   z = −1: 0.9·1.313261687518 + 0.1·0.313261687518 = 1.213261687518
    losses = loss_of("sigmoid", label_smoothing=0.1)
    assert_values(losses, 0.41326168751822286, 1.2132616875182228)
    assert losses[0] == pytest.approx(0.9 * NEG_LOG_SIGMOID_1 + 0.1 * NEG_LOG_SIGMOID_M1, abs=1e-12)


def test_robust_loss_by_hand():
    # ε = 0.1: [0.9·(−log σ(z)) − 0.1·(−log σ(−z))] / 0.8.
    #   z = +1: (0.281935518766 − 0.131326168752) / 0.8 = 0.150609350015 / 0.8 = 0.188261687518
    #   z = −1: (1.181935518766 − 0.031326168752) / 0.8 = 1.150609350015 / 0.8 = 1.438261687518
    assert_values(loss_of("robust", label_smoothing=0.1), 0.18826168751822286, 1.4382616875182228)
    # With ε = 0 it is plain DPO.
    torch.testing.assert_close(loss_of("robust"), loss_of("sigmoid"), rtol=0, atol=1e-15)


def test_ipo_loss_by_hand_with_and_without_lengths():
    # β = 0.5, so the target 1/(2β) is 1.
    # Unnormalised: Δ = [2, −2] -> (2 − 1)² = 1, (−2 − 1)² = 9.
    assert_values(loss_of("ipo"), 1.0, 9.0)
    # Per token, chosen lengths [2, 4], rejected [1, 2]:
    #   pair 0: +1/2 − (−1)/1 = 1.5   -> (1.5 − 1)² = 0.25
    #   pair 1: −1/4 − (+1)/2 = −0.75 -> (−0.75 − 1)² = 3.0625
    assert_values(loss_of("ipo", **LENGTHS), 0.25, 3.0625)


def test_hinge_loss_on_both_sides_of_the_hinge():
    # β = 0.5 and Δ = [4, 1, −2]: relu(1 − βΔ) = relu([−1, 0.5, 2]) = [0, 0.5, 2].
    zeros = t(0.0, 0.0, 0.0)
    assert_values(dpo_loss(t(4.0, 1.0, -2.0), zeros, zeros, zeros, beta=0.5, loss_type="hinge")[0], 0.0, 0.5, 2.0)


# ---- the ones added for the preference family ----

def test_exo_pair_is_the_kl_from_the_policy_pair_distribution_to_the_labels():
    # q = [σ(βΔ), σ(−βΔ)], p = [1 − ε, ε], loss = Σ q·log(q/p). ε = 0.1, βΔ = [1, −1]:
    #   pair 0: 0.731059·log(0.731059/0.9) + 0.268941·log(0.268941/0.1) = 0.114082
    #   pair 1: 0.268941·log(0.268941/0.9) + 0.731059·log(0.731059/0.1) = 1.129457
    assert_values(loss_of("exo_pair", label_smoothing=0.1), 0.11408210766749785, 1.129457283207938)
    # With ε = 0 the paper's ε = 1e-3 is used (at 0 the KL is infinite).
    torch.testing.assert_close(loss_of("exo_pair"), loss_of("exo_pair", label_smoothing=1e-3), rtol=0, atol=0)
    assert torch.isfinite(loss_of("exo_pair")).all()


def test_nca_pair_by_hand():
    # r_w = β·Δ_w = [0.5, −0.5], r_l = [−0.5, 0.5]; −log σ(r_w) − ½·log σ(−r_w) − ½·log σ(−r_l):
    #   pair 0: 0.474077 + ½·0.974077 + ½·0.474077 = 1.198154
    #   pair 1: 0.974077 + ½·0.474077 + ½·0.974077 = 1.698154
    assert_values(loss_of("nca_pair"), NEG_LOG_SIGMOID_HALF + 0.5 * NEG_LOG_SIGMOID_MHALF + 0.5 * NEG_LOG_SIGMOID_HALF,
          1.6981539683602134)
    assert_values(loss_of("nca_pair"), 1.1981539683602134, 1.6981539683602134)


def test_bco_pair_by_hand():
    # −log σ(r_w) − log σ(−r_l): pair 0: 2·0.474077 = 0.948154; pair 1: 2·0.974077 = 1.948154
    assert_values(loss_of("bco_pair"), 2 * NEG_LOG_SIGMOID_HALF, 2 * NEG_LOG_SIGMOID_MHALF)


def test_sppo_hard_by_hand():
    # 1/(2β) = 1: (Δ_w − 1)² + (Δ_l + 1)²: pair 0: 0 + 0 = 0; pair 1: (−2)² + 2² = 8.
    assert_values(loss_of("sppo_hard"), 0.0, 8.0)


def test_apo_zero_and_apo_down_by_hand():
    # apo_zero: 1 − σ(βΔ_w) + σ(βΔ_l):  pair 0: 1 − 0.622459 + 0.377541 = 0.755081
    #                                   pair 1: 1 − 0.377541 + 0.622459 = 1.244919
    assert_values(loss_of("apo_zero"), 2 - 2 * SIGMOID_HALF, 2 * SIGMOID_HALF)
    # apo_down: σ(βΔ_w) + 1 − σ(βΔ):    pair 0: 0.622459 + 1 − 0.731059 = 0.891401
    #                                   pair 1: 0.377541 + 1 − 0.268941 = 1.108599
    assert_values(loss_of("apo_down"), SIGMOID_HALF + 1 - SIGMOID_1, (1 - SIGMOID_HALF) + SIGMOID_1)


def test_discopop_by_hand_and_its_limits():
    # τ = 1, z = βΔ = [1, −1]; (1 − σ(z))·(−log σ(z)) + σ(z)·e^−z:
    #   pair 0: 0.268941·0.313262 + 0.731059·0.367879 = 0.353190
    #   pair 1: 0.731059·1.313262 + 0.268941·2.718282 = 1.691130
    assert_values(loss_of("discopop", discopop_tau=1.0), 0.3531904648719093, 1.6911298012763183)
    # As τ → 0 the blend is a step: logistic where z < 0, exponential where z > 0.
    assert_values(loss_of("discopop", discopop_tau=1e-3), math.exp(-1), NEG_LOG_SIGMOID_M1)


def test_sigmoid_norm_and_sft_by_hand():
    # Per-token Δ = [1.5, −0.75] (as in IPO above), z = 0.5·Δ = [0.75, −0.375]:
    #   −log σ(0.75) = log(1 + e^−0.75) = 0.386871;  −log σ(−0.375) = log(1 + e^0.375) = 0.898123
    assert_values(loss_of("sigmoid_norm", **LENGTHS), math.log(1 + math.exp(-0.75)), math.log(1 + math.exp(0.375)))
    # sft: −logp(y_w)/|y_w| = [2/2, 5/4].
    assert_values(loss_of("sft", **LENGTHS), 1.0, 1.25)


# Three pairs where sorting matters. Policy margins logp(y_w) − logp(y_l) = [1, −1, 0], reference
# margins [−1, 0, 3]; chosen log-ratios [2, −2, 0], rejected [0, −1, 3].
AOT = dict(policy_chosen_logps=t(-1.0, -3.0, -2.0), policy_rejected_logps=t(-2.0, -2.0, -2.0),
           ref_chosen_logps=t(-3.0, -1.0, -2.0), ref_rejected_logps=t(-2.0, -1.0, -5.0), beta=0.5)


def test_aot_compares_sorted_margins_and_aot_pair_sorted_log_ratios():
    # aot: sorted policy margins [−1, 0, 1] − sorted reference margins [−1, 0, 3] = [0, 0, −2];
    #   β· = [0, 0, −1] -> [log 2, log 2, 1.313262]. (Unsorted, DPO's Δ would be [2, −1, −3].)
    assert_values(dpo_loss(**AOT, loss_type="aot")[0], math.log(2), math.log(2), NEG_LOG_SIGMOID_M1)
    # aot_pair: sorted chosen [−2, 0, 2] − sorted rejected [−1, 0, 3] = [−1, 0, −1];
    #   β· = [−0.5, 0, −0.5] -> [0.974077, log 2, 0.974077].
    assert_values(dpo_loss(**AOT, loss_type="aot_pair")[0], NEG_LOG_SIGMOID_MHALF, math.log(2), NEG_LOG_SIGMOID_MHALF)
    # TRL 1.16's name for the unpaired one is accepted.
    torch.testing.assert_close(dpo_loss(**AOT, loss_type="aot_unpaired")[0], dpo_loss(**AOT, loss_type="aot_pair")[0])


def test_the_limits_the_papers_state():
    # AOT on a single pair (nothing to sort) is DPO.
    one = dict(policy_chosen_logps=t(-2.0), policy_rejected_logps=t(-4.0), ref_chosen_logps=t(-3.0),
               ref_rejected_logps=t(-3.0), beta=0.5)
    torch.testing.assert_close(dpo_loss(**one, loss_type="aot")[0], dpo_loss(**one)[0])
    # sigmoid_norm with every completion one token long is DPO.
    ones = dict(chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(2))
    torch.testing.assert_close(loss_of("sigmoid_norm", **ones), loss_of("sigmoid"))
    # At the reference (every log-ratio 0): DPO's log 2, SPPO's 2·(1/(2β))², BCO's 2·log 2.
    at_ref = dict(policy_chosen_logps=t(-3.0), policy_rejected_logps=t(-4.0), ref_chosen_logps=t(-3.0),
                  ref_rejected_logps=t(-4.0), beta=0.5)
    assert_values(dpo_loss(**at_ref)[0], math.log(2))
    assert_values(dpo_loss(**at_ref, loss_type="sppo_hard")[0], 2.0)
    assert_values(dpo_loss(**at_ref, loss_type="bco_pair")[0], 2 * math.log(2))


# ---- combinations ----

def test_a_weighted_combination_is_the_weighted_sum_of_its_parts():
    # MPO's mix: sigmoid, bco_pair and sft.
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    combined = loss_of(types, loss_weights=weights, **LENGTHS)
    parts = sum(w * loss_of(name, **LENGTHS) for name, w in zip(types, weights))
    torch.testing.assert_close(combined, parts, rtol=0, atol=1e-14)
    # Without weights each counts once.
    torch.testing.assert_close(loss_of(["sigmoid", "hinge"]), loss_of("sigmoid") + loss_of("hinge"))


def test_rpo_alpha_adds_the_chosen_per_token_nll():
    # RPO: sigmoid + α·(−logp(y_w)/|y_w|) = [0.313262 + 0.5·1.0, 1.313262 + 0.5·1.25].
    assert_values(loss_of("sigmoid", rpo_alpha=0.5, **LENGTHS), NEG_LOG_SIGMOID_1 + 0.5, NEG_LOG_SIGMOID_M1 + 0.625)
    torch.testing.assert_close(loss_of("sigmoid", rpo_alpha=0.5, **LENGTHS),
                               loss_of(["sigmoid", "sft"], loss_weights=[1.0, 0.5], **LENGTHS))


def test_rewards_are_detached_beta_log_ratios_for_every_loss_type():
    for loss_type in LOSS_TYPES:
        policy_chosen = POLICY_CHOSEN.clone().requires_grad_()
        _, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED,
                                                       beta=0.5, loss_type=loss_type, **LENGTHS)
        torch.testing.assert_close(chosen_rewards, t(0.5, -0.5), rtol=0, atol=1e-15)    # 0.5 · [+1, −1]
        torch.testing.assert_close(rejected_rewards, t(-0.5, 0.5), rtol=0, atol=1e-15)  # 0.5 · [−1, +1]
        assert not chosen_rewards.requires_grad


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="kto"), "unknown DPO loss_type 'kto'"),
    (dict(loss_type=[]), "empty list"),
    (dict(loss_type=["sigmoid", "sigmoid"]), "names a loss twice"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "1 weights for 2 loss types"),
    (dict(beta=0.0), "beta must be > 0"),
    (dict(label_smoothing=0.6), r"\[0, 0.5\] for sigmoid"),
    (dict(loss_type="robust", label_smoothing=0.5), r"\[0, 0.5\) for 'robust'"),
    (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing applies to sigmoid, robust, exo_pair"),
    (dict(loss_type="ipo", chosen_lengths=torch.tensor([1, 1])), "both chosen_lengths and rejected_lengths"),
    (dict(loss_type="sft"), "sft need chosen_lengths"),
    (dict(rpo_alpha=0.5), "rpo_alpha need chosen_lengths"),
    (dict(rpo_alpha=-1.0), "rpo_alpha must be ≥ 0"),
    (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau must be > 0"),
])
def test_invalid_configuration_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, **kwargs)


def test_the_settings_refuse_what_the_loss_refuses_and_take_a_list():
    with pytest.raises(ValueError, match="label_smoothing applies"):
        DPOArgs(loss_type="hinge", label_smoothing=0.1)
    args = DPOArgs(loss_type=["sigmoid", "bco_pair", "aot_unpaired"], loss_weights=[1, 0.5, 0.5])
    assert args.loss_type == ["sigmoid", "bco_pair", "aot_pair"]
    assert DPOArgs(loss_type="aot_unpaired").loss_type == "aot_pair"


@pytest.mark.parametrize("loss_type, kw", [
    ("sigmoid", {}), ("sigmoid", dict(label_smoothing=0.2)), ("robust", dict(label_smoothing=0.2)),
    ("hinge", {}), ("ipo", {}), ("ipo", "lengths"), ("exo_pair", dict(label_smoothing=0.1)), ("nca_pair", {}),
    ("bco_pair", {}), ("sppo_hard", {}), ("aot", {}), ("aot_pair", dict(label_smoothing=0.1)), ("apo_zero", {}),
    ("apo_down", {}), ("discopop", dict(discopop_tau=0.5)), ("sigmoid_norm", "lengths"), ("sft", "lengths"),
    (["sigmoid", "bco_pair", "sft"], "lengths"), ("sigmoid", dict(rpo_alpha=0.3, lengths=True)),
])
def test_gradcheck(loss_type, kw):
    # β = 0.5 and these inputs keep every hinge pair away from its kink (1 − βΔ ≠ 0) and every
    # sorted list free of ties.
    inputs = [t(-2.0, -5.0, -1.0, -7.0), t(-4.0, -3.0, -6.0, -2.5), t(-3.0, -4.0, -2.5, -6.3),
              t(-3.5, -4.0, -1.0, -3.0)]
    inputs = [x.requires_grad_() for x in inputs]
    kw = {} if kw == "lengths" else dict(kw)
    lengths = dict(chosen_lengths=t(3, 1, 2, 5), rejected_lengths=t(2, 4, 1, 1))
    needs_lengths = kw.pop("lengths", False) or loss_type in ("sigmoid_norm", "sft") or "sft" in loss_type
    extra = lengths if needs_lengths or (loss_type == "ipo" and not kw) else {}

    def total(*args):
        return dpo_loss(*args, beta=0.5, loss_type=loss_type, **extra, **kw)[0].sum()

    assert torch.autograd.gradcheck(total, inputs)
