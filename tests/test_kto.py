"""KTO (trainers/kto.py): the loss by hand and its limits, the reference point z₀, feedback data
(unpaired rows, a pair file unpaired, mismatched KL partners, bad rows named), and the trainer:
precomputed reference equal to a live one, two ranks equal to one process, learning the
preference."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from conftest import small_model
from scripts.dpo_worker import PAIR_VOCAB, preference_pairs
from alignflow.stages.data_files import DataError
from alignflow.trainers import configure_optimizer
from alignflow.trainers.kto import KTOArgs, KTOTrainer, collate_feedback, kl_reference_point, kto_loss

WORKER = Path(__file__).parent / "scripts" / "dpo_worker.py"


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


# Three completions with β = 0.5: log-ratios (policy − ref) [1, −1, 0]; the first two desirable.
POLICY, REF = t(-2.0, -5.0, -4.0), t(-3.0, -4.0, -4.0)
DESIRABLE = torch.tensor([True, True, False])


# ---- the loss ----

def test_kto_loss_by_hand():
    # z₀ = 0.4: desirable 1 − σ(0.5·(Δ − 0.4)), undesirable 1 − σ(0.5·(0.4 − Δ)):
    #   Δ = 1:  1 − σ(0.3)  = 0.425557;  Δ = −1: 1 − σ(−0.7) = 0.668188;  Δ = 0: 1 − σ(0.2) = 0.450166
    losses, rewards = kto_loss(POLICY, REF, DESIRABLE, torch.tensor(0.4, dtype=torch.float64), beta=0.5)
    torch.testing.assert_close(losses, t(1 - sigmoid(0.3), 1 - sigmoid(-0.7), 1 - sigmoid(0.2)), rtol=0, atol=1e-12)
    torch.testing.assert_close(losses, t(0.42555748318834097, 0.6681877721681662, 0.45016600268752205))
    torch.testing.assert_close(rewards, t(0.5, -0.5, 0.0))  # β·Δ
    # The weights scale each side's loss: w_d = 2, w_u = 0.5.
    weighted, _ = kto_loss(POLICY, REF, DESIRABLE, torch.tensor(0.4, dtype=torch.float64), 0.5, 2.0, 0.5)
    torch.testing.assert_close(weighted, t(0.8511149663766819, 1.3363755443363323, 0.22508300134376102))


def test_at_the_reference_z0_is_zero_and_every_loss_is_half_its_weight():
    # The policy is the reference: the mismatched pairs' log-ratios are 0, so z₀ = 0, Δ = 0, and
    # each loss is w·(1 − σ(0)) = w/2.
    kl = kl_reference_point(t(-3.0, -7.5), t(-3.0, -7.5))
    assert kl.item() == 0.0
    losses, _ = kto_loss(REF, REF, DESIRABLE, kl, 0.5, 2.0, 0.5)
    torch.testing.assert_close(losses, t(1.0, 1.0, 0.25))


def test_the_reference_point_is_the_mean_mismatched_log_ratio_never_below_zero_and_detached():
    policy_kl = t(-2.0, -6.0).requires_grad_()
    kl = kl_reference_point(policy_kl, t(-3.0, -4.0))   # gaps [1, −2]: mean −0.5 -> 0
    assert kl.item() == 0.0 and not kl.requires_grad
    assert kl_reference_point(t(-2.0, -3.5), t(-3.0, -4.0)).item() == pytest.approx(0.75)  # gaps [1, 0.5]


def test_gradcheck():
    inputs = t(-2.0, -5.0, -4.0, -1.5).requires_grad_()
    desirable = torch.tensor([True, False, True, False])

    def total(policy):
        return kto_loss(policy, t(-3.0, -4.0, -4.5, -1.0), desirable, torch.tensor(0.3, dtype=torch.float64),
                        0.5, 1.5, 0.7)[0].sum()

    assert torch.autograd.gradcheck(total, (inputs,))


# ---- the data ----

def feedback_kind():
    from alignflow.stages.formats import FEEDBACK
    return FEEDBACK


def read_file_rows(tmp_path, rows, **cfg):
    from alignflow.stages import data
    from alignflow.stages.settings import DataConfig, DemoConfig

    path = tmp_path / "feedback.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data.read("kto", feedback_kind(), DataConfig(source=str(path), val_fraction=0.0, **cfg), DemoConfig(),
                     "train")


def test_a_pair_file_is_unpaired_and_every_row_gets_another_prompt_s_completion(tmp_path):
    pairs = [{"prompt": f"q{i}", "chosen": f"good{i}", "rejected": f"bad{i}"} for i in range(3)]
    raw = read_file_rows(tmp_path, pairs)
    rows = raw.dataset.to_list()
    assert [(r["prompt"], r["completion"], r["label"]) for r in rows] == [
        ("q0", "good0", True), ("q0", "bad0", False), ("q1", "good1", True), ("q1", "bad1", False),
        ("q2", "good2", True), ("q2", "bad2", False)]
    # The partner is the row half the split (3) away: always another prompt's answer.
    assert [r["kl_completion"] for r in rows] == ["bad1", "good2", "bad2", "good0", "bad0", "good1"]
    assert [raw.place.row(i) for i in range(6)] == [0, 0, 1, 1, 2, 2]  # both name their pair's row


def test_a_bad_label_names_its_row_and_skip_counts_it(tmp_path):
    rows = [{"prompt": "q0", "completion": "a", "label": True}, {"prompt": "q1", "completion": "b", "label": "yes"}]
    with pytest.raises(DataError, match=r"row 1 \(line 2\): column 'label' must be true \(desirable\) or false"):
        read_file_rows(tmp_path, rows)
    raw = read_file_rows(tmp_path, rows, on_bad_rows="skip")
    assert raw.skipped == 1 and len(raw.dataset) == 1


def test_the_demo_rows_are_unpaired_right_and_wrong_answers():
    from alignflow.stages import demo
    from alignflow.stages.settings import DemoConfig

    rows = demo.demo_rows("kto", demo.feedback, "train", DemoConfig(preference_pairs=200))
    assert len(rows) == 200 and 70 < sum(r["label"] for r in rows) < 130
    for r in rows:
        lines = r["completion"][0]["content"].split("\n")
        worked, answer = lines[0], lines[1].removeprefix("Answer: ")
        a, op, b = worked.split(" ")[:3]
        right = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert (int(answer) == right) == r["label"], r


# ---- the trainer ----

def feedback_items(n_pairs: int, seed: int) -> list[dict]:
    """The DPO tests' successor-token pairs as feedback: the successor desirable, any other token
    not; each item's KL sequence is another item's prompt with this item's completion... the
    mismatch the data kind builds, here the next pair's rejected sequence."""
    pairs = preference_pairs(n_pairs, seed=seed)
    items = []
    for i, pair in enumerate(pairs):
        other = pairs[(i + 1) % len(pairs)]
        for side, label in (("chosen", True), ("rejected", False)):
            items.append({"completion_input_ids": pair[f"{side}_input_ids"], "completion_labels": pair[f"{side}_labels"],
                          "kl_input_ids": other["rejected_input_ids"], "kl_labels": other["rejected_labels"],
                          "label": label})
    return items


def make_trainer(items, precompute: bool, **kw):
    model = small_model(seed=0, vocab_size=PAIR_VOCAB)
    loader = DataLoader(items, batch_size=8, collate_fn=collate_feedback)
    return KTOTrainer(model, small_model(seed=0, vocab_size=PAIR_VOCAB), configure_optimizer(model, lr=1e-2),
                      loader, val_loader=loader, device="cpu", max_steps=kw.pop("max_steps", 4), progress_bar=False,
                      precompute_ref_log_probs=precompute, **kw)


def test_a_precomputed_reference_gives_the_live_one_s_training(tmp_path):
    items = feedback_items(12, seed=3)
    live = make_trainer(items, precompute=False)
    live.train()
    pre = make_trainer(items, precompute=True, ref_cache_dir=tmp_path / "cache")
    pre.train()
    assert pre.ref_model is None  # let go once its scores were taken
    for (name, a), b in zip(live.model.state_dict().items(), pre.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_learns_to_prefer_the_desirable_completions_on_new_prompts():
    model = small_model(seed=0, vocab_size=PAIR_VOCAB)
    train = DataLoader(feedback_items(384, seed=1), batch_size=16, shuffle=True, collate_fn=collate_feedback)
    held_out = DataLoader(feedback_items(64, seed=2), batch_size=64, collate_fn=collate_feedback)  # other prompts
    trainer = KTOTrainer(model, small_model(seed=0, vocab_size=PAIR_VOCAB), configure_optimizer(model, lr=1e-2),
                         train, val_loader=held_out, device="cpu", max_epochs=2, seed=0, progress_bar=False, beta=0.5)
    before = trainer.evaluate()
    after = trainer.train()
    print(f"\nheld-out before: {before}\nheld-out after: {after}")
    assert before["val_rewards/chosen"] == 0.0 and before["val_rewards/rejected"] == 0.0
    assert before["val_loss"] == pytest.approx(0.5)  # 1 − σ(0) for every item
    # The desirable completions gained likelihood against the reference and the undesirable ones
    # lost it, on prompts it never saw.
    assert after["val_rewards/chosen"] > 0.3 and after["val_rewards/rejected"] < -1.0, after
    assert after["val_loss"] < 0.35


def test_settings_refuse_nonsense():
    with pytest.raises(ValueError):
        KTOArgs(desirable_weight=0)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(tmp_path, strategy):
    """z₀ is averaged over both ranks' micro-batches, so 2 ranks × 4 items equal 1 × 8."""
    from test_ddp import free_port, run

    common = ["--method", "kto", "--global-batch", "8", "--num-pairs", "16", "--max-steps", "3"]
    run([sys.executable, str(WORKER), "--out", str(tmp_path / "single.safetensors"), *common])
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER),
         "--out", str(tmp_path / "two.safetensors"), "--strategy", strategy, *common])
    single, two = load_file(tmp_path / "single.safetensors"), load_file(tmp_path / "two.safetensors")
    start = small_model(seed=0, vocab_size=PAIR_VOCAB).state_dict()
    assert max(float((single[n] - start[n]).abs().max()) for n in single) > 1e-3  # it trained
    for name in single:
        torch.testing.assert_close(two[name], single[name], atol=1e-5, rtol=0, msg=name)
