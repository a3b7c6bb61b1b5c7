"""Reward models scoring GRPO's completions (stages/reward_models.py): a reward model trained to
prefer one letter raises that letter's share of the policy's completions, and a reward function
and a reward model combined by weight give exactly the weighted sum."""
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForSequenceClassification

from test_grpo import EOS, PAD, VOCAB, LetterTokenizer, make_trainer, prompt_items
from alignflow.stages.reward_models import RewardModelScorer
from alignflow.trainers import RewardTrainer, collate_ranked_pairs, configure_optimizer, sequence_rewards
from alignflow.trainers.rewards import Rewards, contains

H = ord("H") - ord("A") + 2  # the letter the reward model learns to prefer


class TextLetterTokenizer(LetterTokenizer):
    """LetterTokenizer that also encodes, as a reward model's tokenizer must: "A" is 2, ..."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) - ord("A") + 2 for c in text]}


pytestmark = pytest.mark.usefixtures("one_thread")


def reward_model(seed: int = 0) -> LlamaForSequenceClassification:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_labels=1,
                         pad_token_id=PAD)
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)


def letter_pairs(n: int, seed: int) -> list[dict]:
    """A prompt of 3-6 letters, then a reply of 8 letters ending in EOS (as GRPO's completions
    are scored): the chosen reply holds an H somewhere, the rejected one none."""
    g = torch.Generator().manual_seed(seed)
    others = [t for t in range(2, VOCAB) if t != H]

    def letters(k):
        return [others[int(i)] for i in torch.randint(0, len(others), (k,), generator=g)]

    items = []
    for _ in range(n):
        prompt, reply = letters(int(torch.randint(3, 7, (), generator=g))), letters(8)
        chosen = list(reply)
        chosen[int(torch.randint(0, 8, (), generator=g))] = H
        sides = {"chosen": prompt + chosen + [EOS], "rejected": prompt + reply + [EOS]}
        items.append({f"{side}_{key}": ids if key == "input_ids" else [-100] * len(prompt) + ids[len(prompt):]
                      for side, ids in sides.items() for key in ("input_ids", "labels")})
    return items


def trained_reward_model() -> LlamaForSequenceClassification:
    model = reward_model()
    loader = DataLoader(letter_pairs(512, seed=1), batch_size=16, shuffle=True,
                        collate_fn=lambda b: collate_ranked_pairs(b, pad_id=PAD))
    held_out = DataLoader(letter_pairs(128, seed=2), batch_size=64,
                          collate_fn=lambda b: collate_ranked_pairs(b, pad_id=PAD))
    trainer = RewardTrainer(model=model, optimizer=configure_optimizer(model, lr=3e-3), train_loader=loader,
                            val_loader=held_out, device="cpu", max_steps=32, eval_interval=32, seed=0,
                            progress_bar=False)
    assert trainer.train()["val_rewards/accuracies"] >= 0.9
    return model.eval().requires_grad_(False)


def test_a_reward_model_that_prefers_a_letter_raises_its_share():
    """Only the reward model scores (`contains`, weight 0, just counts the completions holding an
    H): at first ~0.2 of 8-letter completions hold one by chance; after 20 steps most do."""
    scorer = RewardModelScorer("rm", trained_reward_model(), TextLetterTokenizer(), torch.device("cpu"))
    trainer = make_trainer(prompt_items(80), batch_size=4, beta=0.0, num_generations=8, max_completion_length=8,
                           max_steps=20, lr=3e-3, reward_funcs=["contains", scorer], reward_weights=[0.0, 1.0])
    steps = [trainer.training_step([batch]) for batch in trainer.train_loader]
    share = [m["rewards/contains"] for m in steps]
    first, last = sum(share[:3]) / 3, sum(share[-5:]) / 5
    print(f"\nshare of completions with an H, by step: {[round(x, 2) for x in share]}")
    assert first < 0.45 and last > 0.8, share
    # The reward it maximised is the model's: its mean rose with the share.
    assert sum(m["rewards/rm"] for m in steps[-5:]) / 5 > sum(m["rewards/rm"] for m in steps[:3]) / 3 + 1.0


def test_a_function_and_a_reward_model_combine_as_their_weighted_sum():
    model = reward_model(seed=3).eval()
    tok = TextLetterTokenizer()
    scorer = RewardModelScorer("rm", model, tok, torch.device("cpu"), batch=3)  # batches of 3: padding in play
    prompts, completions = ["ABC", "DEFG", "HI", "JKLMN"], ["H", "XY", "QRSTH", "Z"]
    columns = {"target": ["H"] * 4}
    rewards = Rewards(["contains", scorer], [0.5, 2.0])
    per_function = rewards.score(prompts, completions, columns)
    # The model's own score of each sequence alone: prompt, completion, EOS.
    alone = torch.stack([sequence_rewards(model, torch.tensor([tok(p)["input_ids"] + tok(c)["input_ids"] + [EOS]]),
                                          torch.ones(1, len(p) + len(c) + 1, dtype=torch.long))[0]
                         for p, c in zip(prompts, completions)])
    torch.testing.assert_close(per_function[:, 1], alone, atol=1e-5, rtol=0)
    expected = 0.5 * torch.tensor(contains(prompts, completions, **columns)) + 2.0 * alone
    torch.testing.assert_close(rewards.total(per_function), expected, atol=1e-5, rtol=0)
    assert rewards.names == ["contains", "rm"]
