"""DPO: the losses against hand-computed values, gradients, the batch layout, the reference
(frozen, precomputed and cached), learning a rule, DDP and bf16."""
import copy
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
from test_ddp import free_port, run
from alignflow.trainers import configure_optimizer
from alignflow.trainers.dpo import (DPOTrainer, collate_pairs, concatenated_inputs, concatenated_logps, dpo_loss,
                          pair_keys)

WORKER = Path(__file__).parent / "scripts" / "dpo_worker.py"

# ---- batches ----

def test_collate_pairs_layout():
    items = [
        {"chosen_input_ids": [5, 6, 7], "chosen_labels": [-100, 6, 7],
         "rejected_input_ids": [5, 6, 8, 9, 10], "rejected_labels": [-100, 6, 8, 9, 10]},
        {"chosen_input_ids": torch.tensor([4, 9]), "chosen_labels": torch.tensor([-100, 9]),
         "rejected_input_ids": torch.tensor([4, 3]), "rejected_labels": torch.tensor([-100, 3])},
    ]
    batch = collate_pairs(items, pad_id=1)
    assert batch["chosen_input_ids"].tolist() == [[5, 6, 7, 1, 1], [4, 9, 1, 1, 1]]
    assert batch["chosen_attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert batch["chosen_labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, 9, -100, -100, -100]]
    assert batch["rejected_input_ids"].tolist() == [[5, 6, 8, 9, 10], [4, 3, 1, 1, 1]]
    cat = concatenated_inputs(batch)
    assert cat["input_ids"].shape == (4, 5)
    assert cat["labels"][2:].tolist() == batch["rejected_labels"].tolist()

    with pytest.raises(ValueError, match="has no label token"):
        collate_pairs([{**items[0], "rejected_labels": [-100] * 5}])


def test_concatenation_pads_sides_of_different_widths():
    batch = {"chosen_input_ids": torch.tensor([[5, 6]]), "chosen_attention_mask": torch.tensor([[1, 1]]),
             "chosen_labels": torch.tensor([[-100, 6]]),
             "rejected_input_ids": torch.tensor([[5, 7, 8]]), "rejected_attention_mask": torch.tensor([[1, 1, 1]]),
             "rejected_labels": torch.tensor([[-100, 7, 8]])}
    cat = concatenated_inputs(batch)
    assert cat["input_ids"].tolist() == [[5, 6, 0], [5, 7, 8]]
    assert cat["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert cat["labels"].tolist() == [[-100, 6, -100], [-100, 7, 8]]


def test_pair_keys_ignore_padding_and_batch_position():
    pairs = preference_pairs(3, seed=0)
    long_pair = {**pairs[2], "chosen_input_ids": torch.arange(3, 13), "chosen_labels": torch.arange(3, 13)}
    alone = pair_keys(collate_pairs(pairs[:1]))
    padded = pair_keys(collate_pairs([long_pair, pairs[1], pairs[0]], pad_id=2))
    assert alone[0] == padded[2]
    assert len(set(padded)) == 3
    # The labels decide what is scored, so they are part of the key.
    relabelled = {**pairs[0], "chosen_labels": pairs[0]["chosen_input_ids"].clone()}
    assert pair_keys(collate_pairs([relabelled]))[0] != alone[0]


def varied_length_pairs(n: int, seed: int) -> list[dict]:
    """Prompts and completions of several lengths, so padding and per-token normalisation matter."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        prompt = torch.randint(3, PAIR_VOCAB, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
        pair = {}
        for side in ("chosen", "rejected"):
            completion = torch.randint(3, PAIR_VOCAB, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
            ids = torch.cat([prompt, completion])
            labels = ids.clone()
            labels[: len(prompt)] = -100
            pair[f"{side}_input_ids"], pair[f"{side}_labels"] = ids, labels
        pairs.append(pair)
    return pairs


def unpadded_logp(model, ids, labels):
    """logp of one completion from its own forward pass, no padding, no batching."""
    logits = model(ids[None]).float().log_softmax(-1)[0]
    targets = labels[1:]
    keep = targets != -100
    return logits[:-1][keep].gather(-1, targets[keep][:, None]).sum()


def test_concatenated_forward_matches_separate_unpadded_forwards():
    model, ref = small_model(seed=0, vocab_size=PAIR_VOCAB), small_model(seed=1, vocab_size=PAIR_VOCAB)
    pairs = varied_length_pairs(6, seed=3)
    batch = collate_pairs(pairs)
    trainer = DPOTrainer(model=model, ref_model=ref, optimizer=configure_optimizer(model), train_loader=[batch],
                         loss_type="ipo", beta=0.5, precompute_ref_log_probs=False, device="cpu", max_steps=1,
                         progress_bar=False)
    loss_sum, metrics = trainer.compute_loss(model, batch)

    with torch.no_grad():
        logps = {(who, side): torch.stack([unpadded_logp(m, p[f"{side}_input_ids"], p[f"{side}_labels"])
                                           for p in pairs])
                 for who, m in (("policy", model), ("ref", ref)) for side in ("chosen", "rejected")}
        # The completion is everything after the prompt, so its length is the label count.
        lengths = {side: torch.tensor([int((p[f"{side}_labels"] != -100).sum()) for p in pairs])
                   for side in ("chosen", "rejected")}
    expected, chosen_rewards, _ = dpo_loss(
        logps["policy", "chosen"], logps["policy", "rejected"], logps["ref", "chosen"], logps["ref", "rejected"],
        beta=0.5, loss_type="ipo", chosen_lengths=lengths["chosen"], rejected_lengths=lengths["rejected"])
    torch.testing.assert_close(loss_sum.detach(), expected.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["logps/chosen"], logps["policy", "chosen"].sum(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        chosen, rejected, chosen_len, rejected_len = concatenated_logps(model, batch)
    torch.testing.assert_close(chosen, logps["policy", "chosen"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rejected, logps["policy", "rejected"], rtol=1e-5, atol=1e-5)
    assert chosen_len.tolist() == lengths["chosen"].tolist() and rejected_len.tolist() == lengths["rejected"].tolist()


# ---- the trainer ----

class CountingReference:
    """Counts forward calls of a reference model."""

    def __init__(self, model):
        self.calls = 0
        model.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def pair_loader(pairs, batch_size, shuffle=False):
    return DataLoader(pairs, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_pairs)


def dpo_run(save_dir, precompute, ref_model=None, ref_cache_dir=None, steps=8, resume_from=None, **kw):
    """A short seeded DPO run on shuffled data; returns (trainer, the records of metrics.jsonl)."""
    model = small_model(seed=0, vocab_size=PAIR_VOCAB)
    ref_model = ref_model if ref_model is not None else small_model(seed=0, vocab_size=PAIR_VOCAB)
    train = pair_loader(varied_length_pairs(48, seed=1), 8, shuffle=True)
    val = pair_loader(varied_length_pairs(16, seed=2), 8)
    trainer = DPOTrainer(model=model, ref_model=ref_model, optimizer=configure_optimizer(model, lr=1e-2),
                         train_loader=train, val_loader=val, precompute_ref_log_probs=precompute,
                         ref_cache_dir=ref_cache_dir, device="cpu", max_epochs=None, max_steps=steps,
                         eval_interval=4, log_interval=1, save_dir=save_dir, seed=7, progress_bar=False, **kw)
    trainer.train(resume_from=resume_from)
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    return trainer, records


def test_precomputed_reference_matches_live_and_the_cache_is_reused(tmp_path):
    ref = small_model(seed=0, vocab_size=PAIR_VOCAB)
    counter = CountingReference(ref)
    _, live = dpo_run(tmp_path / "live", precompute=False, ref_model=ref)
    assert counter.calls == 8 + 2 * 2  # a pass per step, and 2 validation batches at steps 4 and 8

    counter.calls = 0
    _, pre = dpo_run(tmp_path / "pre", precompute=True, ref_model=ref)
    assert counter.calls == 6 + 2  # one pass over the 6 training and 2 validation batches
    assert [r["step"] for r in pre] == [r["step"] for r in live]
    for a, b in zip(live, pre):
        for key in ("loss", "rewards/margins", "logps/rejected", "val_loss", "val_rewards/accuracies"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    cache_files = list((tmp_path / "pre" / "ref_logps").glob("*.safetensors"))
    assert len(cache_files) == 1 and len(load_file(cache_files[0])["keys"]) == 48 + 16

    # Same reference weights and data: the cache file is read and the reference never runs.
    counter.calls = 0
    _, again = dpo_run(tmp_path / "again", precompute=True, ref_model=ref, ref_cache_dir=tmp_path / "pre" / "ref_logps")
    assert counter.calls == 0
    assert [r.get("loss") for r in again] == [r.get("loss") for r in pre]

    # Other reference weights: another file, scored afresh.
    with torch.no_grad():
        ref.model.norm.weight.add_(0.1)
    dpo_run(tmp_path / "changed", precompute=True, ref_model=ref, ref_cache_dir=tmp_path / "pre" / "ref_logps", steps=1)
    assert counter.calls == 8
    assert len(list((tmp_path / "pre" / "ref_logps").glob("*.safetensors"))) == 2


def test_a_long_reference_pass_says_how_far_it_is(tmp_path, monkeypatch, caplog):
    """Scoring every pair with the reference is one silent pass before the first step; on a big
    file it lasts minutes, so past 10 s it says how far it is (trainers.progress)."""
    import logging

    from alignflow.trainers import progress

    ticks = iter(range(0, 10_000, 4))  # each look at the clock 4 s after the one before
    monkeypatch.setattr(progress, "clock", lambda: float(next(ticks)))
    with caplog.at_level(logging.INFO, logger="alignflow.progress"):
        dpo_run(tmp_path, precompute=True, steps=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "alignflow.progress"]
    assert lines[:2] == ["reference log-probs: 3 of 8 batches · 12.0 s · eta 20.0 s",
                         "reference log-probs: 6 of 8 batches · 24.0 s · eta 8.0 s"]


def test_resume_reads_the_cache_and_continues_the_same_run(tmp_path):
    ref = small_model(seed=0, vocab_size=PAIR_VOCAB)
    full, full_records = dpo_run(tmp_path / "full", precompute=True, ref_model=ref, steps=6)
    dpo_run(tmp_path / "split", precompute=True, ref_model=ref, steps=3)
    counter = CountingReference(ref)
    resumed, resumed_records = dpo_run(tmp_path / "split", precompute=True, ref_model=ref, steps=6,
                                       resume_from="latest")
    assert counter.calls == 0  # the scores come from split/ref_logps, written before the interruption
    losses = [[r["loss"] for r in records if "loss" in r] for records in (full_records, resumed_records)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    for name, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


@pytest.mark.parametrize("precompute", [True, False])
def test_reference_stays_frozen(tmp_path, precompute):
    ref = small_model(seed=0, vocab_size=PAIR_VOCAB)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    trainer, _ = dpo_run(tmp_path, precompute=precompute, ref_model=ref, steps=5)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, before[k]), k
    # A precomputed reference is let go after scoring; a live one stays with the trainer.
    assert trainer.ref_model is (None if precompute else ref) and not ref.training
    assert not any(p.requires_grad for p in ref.parameters())
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in ref.parameters()}
    # and the policy did move
    assert not torch.equal(trainer.model.model.norm.weight, ref.model.norm.weight)


def test_reference_sharing_policy_parameters_is_rejected():
    model = small_model(seed=0, vocab_size=PAIR_VOCAB)
    with pytest.raises(ValueError, match="shares parameters"):
        DPOTrainer(model=model, ref_model=model, optimizer=configure_optimizer(model), train_loader=[],
                   device="cpu", max_steps=1, progress_bar=False)


def test_learns_a_rule_that_holds_on_new_prompts():
    model = small_model(seed=0, vocab_size=PAIR_VOCAB)
    ref = copy.deepcopy(model)
    train = pair_loader(preference_pairs(768, seed=1), 16, shuffle=True)
    held_out = pair_loader(preference_pairs(128, seed=2), 64)  # other prompts than the training ones
    trainer = DPOTrainer(model=model, ref_model=ref, optimizer=configure_optimizer(model, lr=1e-2),
                         train_loader=train, val_loader=held_out, device="cpu", max_epochs=2, seed=0,
                         progress_bar=False)
    before = trainer.evaluate()
    after = trainer.train()
    print(f"\nheld-out before: {before}\nheld-out after: {after}")
    assert before["val_rewards/accuracies"] == 0.0 and before["val_loss"] == pytest.approx(math.log(2))
    assert after["val_rewards/accuracies"] > 0.9
    assert after["val_rewards/margins"] > 0.5 and after["val_loss"] < 0.5


def test_bf16_autocast_trains(tmp_path):
    model = small_model(seed=0, vocab_size=PAIR_VOCAB)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), optimizer=configure_optimizer(model, lr=1e-2),
                         train_loader=pair_loader(preference_pairs(512, seed=1), 16, shuffle=True),
                         val_loader=pair_loader(preference_pairs(64, seed=2), 64), use_amp=True,
                         amp_dtype="bfloat16", device="cpu", max_epochs=2, seed=0, progress_bar=False)
    before = trainer.evaluate()["val_loss"]
    after = trainer.train()
    print(f"\nbf16 val_loss {before:.4f} -> {after['val_loss']:.4f}, "
          f"accuracy {after['val_rewards/accuracies']:.3f}")
    assert math.isfinite(after["loss"])
    assert after["val_loss"] < 0.8 * before


@pytest.mark.parametrize("reference", ["precomputed", "live"])
def test_ddp_two_ranks_equal_single_process(tmp_path, reference):
    common = ["--global-batch", "8", "--accum", "2", "--num-pairs", "32", "--max-steps", "3"]
    if reference == "live":
        common.append("--live-reference")
    run([sys.executable, str(WORKER), "--out", str(tmp_path / "single.safetensors"),
         "--cache-dir", str(tmp_path / "single-cache"), *common])
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER),
         "--out", str(tmp_path / "ddp.safetensors"), "--cache-dir", str(tmp_path / "ddp-cache"), *common])
    single = load_file(tmp_path / "single.safetensors")
    ddp = load_file(tmp_path / "ddp.safetensors")
    assert single.keys() == ddp.keys()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], atol=1e-5, rtol=0, msg=name)
    if reference == "precomputed":
        # Each rank scored its shard; the ranks' rows together cover every pair.
        (cache,) = (tmp_path / "ddp-cache").glob("*.safetensors")
        (single_cache,) = (tmp_path / "single-cache").glob("*.safetensors")
        assert cache.name == single_cache.name
        ddp_table, single_table = load_file(cache), load_file(single_cache)
        assert torch.equal(ddp_table["keys"], single_table["keys"]) and len(ddp_table["keys"]) == 32
        torch.testing.assert_close(ddp_table["logps"], single_table["logps"], atol=1e-5, rtol=0)


def test_a_precomputed_reference_is_let_go_and_a_cached_one_never_loaded(tmp_path):
    import gc
    import weakref

    ref = small_model(seed=0, vocab_size=PAIR_VOCAB)
    alive = weakref.ref(ref)
    loads = []

    def load():
        loads.append(1)
        return small_model(seed=0, vocab_size=PAIR_VOCAB)

    trainer, first = dpo_run(tmp_path / "a", precompute=True, ref_model=ref, steps=2)
    del ref
    gc.collect()
    assert alive() is None  # scored, then freed: the trainer kept no pointer to it
    # A loader and a name for its weights: loaded once to fill the cache, then never again.
    _, second = dpo_run(tmp_path / "b", precompute=True, ref_model=load, ref_weights_id="parent-hash", steps=2)
    _, third = dpo_run(tmp_path / "c", precompute=True, ref_model=load, ref_weights_id="parent-hash", steps=2,
                       ref_cache_dir=tmp_path / "b" / "ref_logps")
    assert len(loads) == 1
    losses = [[r["loss"] for r in records if "loss" in r] for records in (first, second, third)]
    assert losses[0] == losses[1] == losses[2]
