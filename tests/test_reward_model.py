"""The reward model (trainers/reward.py): the Bradley-Terry loss with margin and centring by
hand, pooling at each row's last real token, accumulation equal to one batch, learning a
preference on held-out pairs, and margin collation errors that name the row."""
import copy

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForSequenceClassification

from alignflow.trainers import (RewardArgs, RewardTrainer, collate_ranked_pairs, configure_optimizer, reward_loss,
                                sequence_rewards)

VOCAB, PAD = 32, 0


def reward_model(seed: int = 0, pad_token_id: int | None = PAD) -> LlamaForSequenceClassification:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_labels=1,
                         pad_token_id=pad_token_id)
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).eval()


# ---- the loss ----

def test_reward_loss_by_hand():
    rc, rr = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    # −log σ(1), −log σ(−2)
    torch.testing.assert_close(reward_loss(rc, rr), torch.tensor([0.31326169, 2.12692801]), atol=1e-6, rtol=0)
    # margin [0.5, −1]: −log σ(0.5), −log σ(−1)
    margin = torch.tensor([0.5, -1.0])
    torch.testing.assert_close(reward_loss(rc, rr, margin), torch.tensor([0.47407698, 1.31326169]),
                               atol=1e-6, rtol=0)
    # centring 0.01: + 0.01·(1 + 0)², + 0.01·(0 + 2)²
    torch.testing.assert_close(reward_loss(rc, rr, center_rewards_coefficient=0.01),
                               torch.tensor([0.32326169, 2.16692801]), atol=1e-6, rtol=0)
    torch.testing.assert_close(reward_loss(rc, rr, margin, 0.01), torch.tensor([0.48407698, 1.35326169]),
                               atol=1e-6, rtol=0)
    # The step's loss (sum / pairs) is TRL's: mean of the Bradley-Terry terms + coef · mean((rc + rr)²).
    assert reward_loss(rc, rr, margin, 0.01).sum().item() / 2 == pytest.approx(
        (0.47407698 + 1.31326169) / 2 + 0.01 * (1 + 4) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="one value per pair"):
        reward_loss(rc, rr, torch.tensor([0.5]))


def test_reward_args_validate_and_reach_the_trainer():
    assert RewardArgs().center_rewards_coefficient is None
    with pytest.raises(ValueError):
        RewardArgs(center_rewards_coefficient=-0.1)
    with pytest.raises(ValueError):
        RewardArgs(centre=0.1)
    model = reward_model()
    trainer = RewardTrainer(model=model, optimizer=configure_optimizer(model), train_loader=[], device="cpu",
                            max_steps=1, center_rewards_coefficient=0.01, progress_bar=False)
    assert trainer.reward.center_rewards_coefficient == 0.01
    trainer = RewardTrainer(model=model, optimizer=configure_optimizer(model), train_loader=[], device="cpu",
                            max_steps=1, reward=RewardArgs(center_rewards_coefficient=0.02), progress_bar=False)
    assert trainer.reward.center_rewards_coefficient == 0.02


# ---- batches and pooling ----

def pair(chosen: list[int], rejected: list[int], prompt_len: int = 2, **extra) -> dict:
    def labels(ids):
        return [-100] * prompt_len + ids[prompt_len:]
    return {"chosen_input_ids": chosen, "chosen_labels": labels(chosen),
            "rejected_input_ids": rejected, "rejected_labels": labels(rejected), **extra}


def test_margin_collation_all_or_none_and_errors_name_the_row():
    items = [pair([3, 4, 5], [3, 4, 7, 8]), pair([9, 10, 5, 6, 11], [9, 10, 7])]
    batch = collate_ranked_pairs(items, pad_id=PAD)
    assert "margin" not in batch
    assert batch["chosen_input_ids"].tolist() == [[3, 4, 5, 0, 0], [9, 10, 5, 6, 11]]
    assert batch["rejected_attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]

    with_margins = [{**items[0], "margin": 1}, {**items[1], "margin": torch.tensor(0.25)}]
    batch = collate_ranked_pairs(with_margins, pad_id=PAD)
    assert batch["margin"].dtype == torch.float32 and batch["margin"].tolist() == [1.0, 0.25]

    with pytest.raises(ValueError, match=r"pair 1: no margin, while pair 0 has one"):
        collate_ranked_pairs([with_margins[0], items[1]])
    with pytest.raises(ValueError, match=r"pair 0: no margin, while pair 1 has one"):
        collate_ranked_pairs([items[0], with_margins[1]])
    with pytest.raises(ValueError, match=r"pair 1: margin must be a number"):
        collate_ranked_pairs([with_margins[0], {**items[1], "margin": "high"}])
    with pytest.raises(ValueError, match=r"pair 1: margin must be finite"):
        collate_ranked_pairs([with_margins[0], {**items[1], "margin": float("nan")}])


@torch.no_grad()
def test_rewards_pool_at_each_row_s_last_real_token_whatever_the_padding():
    model = reward_model(seed=1)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, VOCAB, (n,), generator=g) for n in (3, 7, 5)]
    alone = torch.cat([sequence_rewards(model, r[None], torch.ones(1, len(r), dtype=torch.long)) for r in rows])
    assert alone.dtype == torch.float32 and alone.shape == (3,)
    assert (alone[1:] - alone[0]).abs().min() > 1e-3  # the rows' scores differ: pooling the wrong row shows

    width = max(len(r) for r in rows)
    # Right padding, with a pad id that is not the model's (9): padded positions are masked, whatever they hold.
    right = torch.full((3, width), 9)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, r in enumerate(rows):
        right[i, :len(r)], mask[i, :len(r)] = r, 1
    torch.testing.assert_close(sequence_rewards(model, right, mask), alone, atol=1e-5, rtol=0)

    # Left padding: the head takes the rightmost non-pad token, which is the last position here.
    left = torch.full((3, width), PAD)
    left_mask = torch.zeros(3, width, dtype=torch.long)
    for i, r in enumerate(rows):
        left[i, width - len(r):], left_mask[i, width - len(r):] = r, 1
    torch.testing.assert_close(sequence_rewards(model, left, left_mask), alone, atol=1e-5, rtol=0)


def test_a_reward_model_without_a_pad_id_is_refused():
    model = reward_model(pad_token_id=None)
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match="pad_token_id is None"):
        sequence_rewards(model, ids, torch.ones_like(ids))


# ---- training ----

def preference_pairs(n: int, seed: int, margins: bool = False) -> list[dict]:
    """A prompt of 2–4 random tokens, then a completion of 3–8: the chosen one holds token 5 at a
    random place, the rejected one token 7; the other tokens are random (neither 5 nor 7)."""
    g = torch.Generator().manual_seed(seed)
    others = torch.tensor([t for t in range(1, VOCAB) if t not in (5, 7)])

    def tokens(k):
        return others[torch.randint(len(others), (k,), generator=g)].tolist()

    items = []
    for _ in range(n):
        prompt_len = int(torch.randint(2, 5, (1,), generator=g))
        prompt = tokens(prompt_len)
        sides = []
        for special in (5, 7):
            completion = tokens(int(torch.randint(3, 9, (1,), generator=g)))
            completion[int(torch.randint(len(completion), (1,), generator=g))] = special
            sides.append(prompt + completion)
        extra = {"margin": float(torch.rand((), generator=g))} if margins else {}
        items.append(pair(*sides, prompt_len=prompt_len, **extra))
    return items


def pair_loader(items, batch_size, shuffle=False):
    return DataLoader(items, batch_size=batch_size, shuffle=shuffle,
                      collate_fn=lambda b: collate_ranked_pairs(b, pad_id=PAD))


def one_step(model, items, batch_size, accum):
    """One plain SGD step (lr 1, no clipping) over all `items`: the weight change is the
    gradient. Returns the model and the step's metrics (`training_step`'s, all of them)."""
    model = copy.deepcopy(model).train()
    trainer = RewardTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                            train_loader=pair_loader(items, batch_size), device="cpu", max_steps=1,
                            grad_accum_steps=accum, max_grad_norm=None, center_rewards_coefficient=0.01,
                            progress_bar=False)
    micro = trainer._micro_batches(iter(trainer.train_loader))
    assert len(micro) == accum
    return model, trainer.training_step(micro)


def test_two_micro_batches_of_two_pairs_equal_one_batch_of_four():
    base = reward_model(seed=2)
    items = preference_pairs(4, seed=3, margins=True)  # different lengths, margins and centring all in play
    big, m_big = one_step(base, items, batch_size=4, accum=1)
    small, m_small = one_step(base, items, batch_size=2, accum=2)
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert m_big["items"] == m_small["items"] == 4
    for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        assert m_big[key] == pytest.approx(m_small[key], abs=1e-6), key
    # The step really moved the weights, so the equality above is not trivially true.
    moved = max((a - b).abs().max().item() for a, b in zip(base.state_dict().values(), big.state_dict().values()))
    assert moved > 1e-3


def test_learns_to_prefer_the_chosen_sequences_on_held_out_pairs():
    model = reward_model(seed=0).train()
    train = pair_loader(preference_pairs(256, seed=1), 16, shuffle=True)
    held_out = pair_loader(preference_pairs(128, seed=2), 64)
    trainer = RewardTrainer(model=model, optimizer=configure_optimizer(model, lr=3e-3), train_loader=train,
                            val_loader=held_out, device="cpu", max_steps=32, eval_interval=32, seed=0,
                            progress_bar=False)
    before = trainer.evaluate()
    after = trainer.train()
    print(f"\nheld-out before: {before}\nheld-out after: {after}")
    assert before["val_items"] == after["val_items"] == 128
    assert 0.3 <= before["val_rewards/accuracies"] <= 0.7
    assert after["val_rewards/accuracies"] >= 0.9
    assert after["val_rewards/margins"] > 1.0 and after["val_loss"] < 0.3
    assert after["step"] == 32
