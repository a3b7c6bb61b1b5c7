"""SimPO, CPO and ORPO (trainers/simpo.py, trainers/orpo.py): their losses by hand and at the
limits their papers state, one model in memory where DPO holds two, and the loop's strategies
(two ranks under ddp or fsdp with accumulation equal one process). As stages:
test_reference_free_stages.py."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignflow.trainers.dpo import dpo_loss
from alignflow.trainers.orpo import ORPOArgs, log1mexp, orpo_loss
from alignflow.trainers.simpo import SimPOArgs, simpo_loss

BENCH = Path(__file__).parents[1] / "bench" / "reference_free_memory.py"


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# Two pairs: summed log-probs chosen [−2, −6], rejected [−3, −4]; lengths chosen [2, 3], rejected [1, 4]
# -> per token chosen [−1, −2], rejected [−3, −1].
CHOSEN, REJECTED = t(-2.0, -6.0), t(-3.0, -4.0)
CHOSEN_LENGTHS, REJECTED_LENGTHS = t(2, 3), t(1, 4)


def simpo(**settings):
    return simpo_loss(CHOSEN, REJECTED, CHOSEN_LENGTHS, REJECTED_LENGTHS, SimPOArgs(**settings))


# ---- the losses ----

def test_simpo_by_hand():
    # β = 2, γ = 0.5: z = 2·(per-token chosen − rejected) − 0.5 = 2·[2, −1] − 0.5 = [3.5, −2.5]
    #   −log σ(3.5) = log(1 + e^−3.5) = 0.029750;  −log σ(−2.5) = log(1 + e^2.5) = 2.578890
    losses, chosen_rewards, rejected_rewards = simpo()
    torch.testing.assert_close(losses, t(math.log1p(math.exp(-3.5)), math.log1p(math.exp(2.5))), rtol=0, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, t(-2.0, -4.0))    # β × per-token log-prob
    torch.testing.assert_close(rejected_rewards, t(-6.0, -2.0))


def test_simpo_without_margin_is_length_normalised_dpo_without_a_reference():
    # γ = 0: −log σ(β·(logp(y_w)/|y_w| − logp(y_l)/|y_l|)) = DPO's sigmoid_norm with the reference at 0.
    zeros = torch.zeros(2, dtype=torch.float64)
    dpo, _, _ = dpo_loss(CHOSEN, REJECTED, zeros, zeros, beta=2.0, loss_type="sigmoid_norm",
                         chosen_lengths=CHOSEN_LENGTHS, rejected_lengths=REJECTED_LENGTHS)
    torch.testing.assert_close(simpo(gamma=0.0)[0], dpo, rtol=0, atol=1e-14)


def test_cpo_by_hand_and_without_its_nll_it_is_dpo_on_a_zero_reference():
    # β = 0.1 on summed log-probs: z = 0.1·[1, −2] = [0.1, −0.2]; NLL per token [1, 2] (cpo_alpha 1).
    losses, _, _ = simpo(loss_type="cpo")
    torch.testing.assert_close(losses, t(math.log1p(math.exp(-0.1)) + 1.0, math.log1p(math.exp(0.2)) + 2.0),
                               rtol=0, atol=1e-12)
    zeros = torch.zeros(2, dtype=torch.float64)
    torch.testing.assert_close(simpo(loss_type="cpo", cpo_alpha=0.0)[0],
                               dpo_loss(CHOSEN, REJECTED, zeros, zeros, beta=0.1)[0], rtol=0, atol=1e-14)


def test_each_variant_takes_its_own_defaults_and_keeps_what_is_set():
    assert SimPOArgs().model_dump() == {"loss_type": "simpo", "beta": 2.0, "gamma": 0.5, "cpo_alpha": 0.0,
                                        "label_smoothing": 0.0}
    cpo = SimPOArgs(loss_type="cpo")
    assert (cpo.beta, cpo.gamma, cpo.cpo_alpha) == (0.1, 0.0, 1.0)
    assert SimPOArgs(loss_type="cpo", beta=0.3).beta == 0.3


def test_orpo_odds_ratio_against_a_direct_computation():
    # P = exp(per-token log-prob), odds = P/(1 − P); loss = per-token NLL − λ·log σ(log(odds_w/odds_l)).
    losses, chosen_rewards, _, log_odds_ratio = orpo_loss(CHOSEN, REJECTED, CHOSEN_LENGTHS, REJECTED_LENGTHS, 0.1)
    p_w, p_l = [math.exp(-1), math.exp(-2)], [math.exp(-3), math.exp(-1)]
    ratio = [math.log((pw / (1 - pw)) / (pl / (1 - pl))) for pw, pl in zip(p_w, p_l)]
    torch.testing.assert_close(log_odds_ratio, t(*ratio), rtol=0, atol=1e-12)
    # pair 0: odds_w = 0.367879/0.632121 = 0.581977, odds_l = 0.049787/0.950213 = 0.052396,
    #   log(11.1073) = 2.407606; loss = 1 + 0.1·log(1 + e^−2.407606) = 1 + 0.1·0.086206 = 1.0086206
    # pair 1: odds_w = 0.135335/0.864665 = 0.156518, odds_l = 0.581977; log ratio = −1.313262,
    #   loss = 2 + 0.1·log(1 + e^1.313262) = 2 + 0.1·1.551445 = 2.1551445
    assert ratio == pytest.approx([2.407606, -1.313262], abs=1e-6)
    torch.testing.assert_close(losses, t(1.0086206, 2.1551445), rtol=0, atol=1e-7)
    torch.testing.assert_close(chosen_rewards, t(-0.1, -0.2))  # λ × per-token log-prob
    # Equal answers: log odds ratio 0, and the loss is the NLL plus λ·log 2.
    same, _, _, zero = orpo_loss(CHOSEN, CHOSEN, CHOSEN_LENGTHS, CHOSEN_LENGTHS, 0.1)
    torch.testing.assert_close(zero, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(same, t(1.0, 2.0) + 0.1 * math.log(2))


def test_log1mexp_is_accurate_near_zero_and_far_from_it():
    x = t(-1e-10, -0.5, -1.0, -50.0)
    expected = t(math.log(1e-10), math.log(1 - math.exp(-0.5)), math.log(1 - math.exp(-1)), -math.exp(-50))
    torch.testing.assert_close(log1mexp(x), expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("settings", [dict(), dict(loss_type="cpo"), dict(label_smoothing=0.1), "orpo"])
def test_gradcheck(settings):
    inputs = [t(-2.0, -6.0, -1.5), t(-3.0, -4.0, -2.5)]
    inputs = [x.requires_grad_() for x in inputs]
    lengths = (t(2, 3, 1), t(1, 4, 2))

    def total(chosen, rejected):
        if settings == "orpo":
            return orpo_loss(chosen, rejected, *lengths, 0.1)[0].sum()
        return simpo_loss(chosen, rejected, *lengths, SimPOArgs(**settings))[0].sum()

    assert torch.autograd.gradcheck(total, inputs)


def test_orpo_settings():
    assert ORPOArgs().beta == 0.1
    with pytest.raises(ValueError):
        ORPOArgs(beta=0)


# ---- one model in memory ----

def test_a_step_holds_one_model_and_needs_less_than_dpo_with_a_live_reference():
    """bench/reference_free_memory.py on a small model: the same count as its printed ratio."""
    proc = subprocess.run([sys.executable, str(BENCH), "--hidden", "64", "--layers", "2", "--vocab", "300",
                           "--seq", "32", "--json"], capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    live = r["dpo-live"]
    assert live["models"] == 2
    for config in ("simpo", "cpo", "orpo"):
        assert r[config]["models"] == 1, (config, r[config])
        assert 2 * r[config]["weights"] == live["weights"]
        assert r[config]["gradients"] == live["gradients"] and r[config]["optimizer"] == live["optimizer"]
        assert r[config]["counted"] < live["counted"] - 0.9 * r[config]["weights"], (config, r[config], live)


# ---- the loop's strategies: one process, accumulation, two ranks ----

WORKER = Path(__file__).parent / "scripts" / "dpo_worker.py"


@pytest.mark.parametrize("method, strategy", [("simpo", "ddp"), ("cpo", "fsdp"), ("orpo", "ddp"), ("orpo", "fsdp")])
def test_two_ranks_with_accumulation_equal_one_process_with_one_batch(tmp_path, method, strategy):
    from conftest import small_model
    from scripts.dpo_worker import PAIR_VOCAB
    from test_ddp import free_port, run

    common = ["--method", method, "--global-batch", "8", "--num-pairs", "32", "--max-steps", "3"]
    run([sys.executable, str(WORKER), "--out", str(tmp_path / "single.safetensors"), *common])
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER),
         "--out", str(tmp_path / "two.safetensors"), "--accum", "2", "--strategy", strategy, *common])
    single, two = load_file(tmp_path / "single.safetensors"), load_file(tmp_path / "two.safetensors")
    start = small_model(seed=0, vocab_size=PAIR_VOCAB).state_dict()
    assert single.keys() == two.keys()
    assert max(float((single[n] - start[n]).abs().max()) for n in single) > 1e-3  # it trained
    for name in single:
        torch.testing.assert_close(two[name], single[name], atol=1e-5, rtol=0, msg=name)
