"""GRPO: the maths against hand-computed values, reward functions, and the trainer end to end."""
import copy
import functools
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from alignflow.models import LlamaForCausalLM, generate, generate_text, get_preset
from alignflow.trainers.grpo import loss as grpo_loss_module
from alignflow.trainers.grpo import (GRPOTrainer, collate_prompts, completion_logps, group_advantages, grpo_loss,
                                     kl_k3)
from alignflow.trainers.rewards import (Rewards, answers_match, contains, exact_match, final_answer, format_reward,
                                        get_reward, register_reward, reward_name)

PAD, EOS = 0, 1
VOCAB = 32
WORKER = Path(__file__).parent / "scripts" / "grpo_worker.py"


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- shared builders (the DDP worker imports them too) ----

class LetterTokenizer:
    """Token i >= 2 decodes to a letter ("A" is 2); PAD and EOS are special and vanish."""
    pad_token_id, eos_token_id = PAD, EOS

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("A") + i - 2) if i > EOS else ("" if skip_special_tokens else "_") for i in ids)


def tiny_policy(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(get_preset("tiny", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64))


def prompt_items(n: int, seed: int = 0, target: str = "H") -> list[dict]:
    """Random prompts of 3 to 6 tokens; `target` is the letter the `contains` reward looks for."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(3, 7, (), generator=g))
        items.append({"prompt_input_ids": torch.randint(2, VOCAB, (length,), generator=g).tolist(), "target": target})
    return items


def prompt_loader(items, batch_size: int, sampler=None) -> DataLoader:
    return DataLoader(items, batch_size=batch_size, sampler=sampler,
                      collate_fn=functools.partial(collate_prompts, pad_id=PAD))


def row_seeded_generate(model, input_ids, attention_mask=None, max_new_tokens=8, eos_token_id=None,
                        pad_token_id=None, generator=None, *, group_size, **kwargs):
    """`models.generate` one row at a time, each with its own generator seeded by its prompt and
    its index in its group: a row's completion no longer depends on which batch or rank it is in,
    so runs that split the same prompts differently can be compared. Each row also ends with EOS
    at a seeded length, so completions differ in length (a random model rarely emits EOS)."""
    rows = []
    for i, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
        prompt = ids[mask.bool()]
        seed = hash((tuple(prompt.tolist()), i % group_size)) % 2**31
        length = 1 + seed % max_new_tokens
        out = generate(model, prompt[None], max_new_tokens=length - 1, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id, generator=torch.Generator().manual_seed(seed), **kwargs)
        completion = torch.full((max_new_tokens,), pad_token_id, dtype=torch.long)
        sampled = out[0, len(prompt):]  # shorter when the model itself sampled a stop token
        completion[:len(sampled)] = sampled
        if len(sampled) == length - 1:
            completion[length - 1] = eos_token_id[0]  # generate_text passes the stop tokens as a list
        rows.append(torch.cat([ids, completion]))
    return torch.stack(rows)


def row_seeded(group_size: int):
    """`generate_text` sampling with `row_seeded_generate`."""
    return functools.partial(generate_text, sample=functools.partial(row_seeded_generate, group_size=group_size))


def make_trainer(items, batch_size=2, beta=0.04, generate_fn=generate_text, reward_funcs=None, lr=3e-3,
                 optimizer="adam", **kwargs) -> GRPOTrainer:
    policy = tiny_policy()
    ref = copy.deepcopy(policy) if beta else None
    opt = (torch.optim.Adam(policy.parameters(), lr=lr) if optimizer == "adam"
           else torch.optim.SGD(policy.parameters(), lr=lr))
    kwargs = {"num_generations": 4, "max_completion_length": 6, "max_steps": 2, "seed": 0, **kwargs}
    # distinct_letters differs between almost any two samples: no step has all-zero advantages.
    reward_funcs = [distinct_letters] if reward_funcs is None else list(reward_funcs)
    return GRPOTrainer(policy, ref, opt, prompt_loader(items, batch_size), reward_funcs, generate_fn=generate_fn,
                       tokenizer=LetterTokenizer(), beta=beta,
                       device="cpu", progress_bar=False, **kwargs)


# ---- advantages ----

def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0, 0, 1, 2, 2, 2, 2])
    # Group 1: mean 0.5, unbiased var 4·0.25/3 = 1/3. Group 2: no spread, so 0 whatever the scale.
    group = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 4, "group"),
                               torch.tensor([group, -group, -group, group, 0, 0, 0, 0]))
    # Batch: mean 10/8 = 1.25, deviations ±0.25, −1.25 twice, 0.75 four times:
    # unbiased var (2·0.0625 + 2·1.5625 + 4·0.5625)/7 = 5.5/7, std ≈ 0.8864.
    batch = 0.5 / (math.sqrt(5.5 / 7) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 4, "batch"),
                               torch.tensor([batch, -batch, -batch, batch, 0, 0, 0, 0]))
    torch.testing.assert_close(group_advantages(rewards, 4, "none"),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    assert torch.equal(group_advantages(torch.full((4,), 3.0), 4), torch.zeros(4))
    with pytest.raises(ValueError):
        group_advantages(rewards, 3)


# ---- the loss ----

def loss_example():
    """Two sequences, ε = 0.2 (ρ kept in [0.8, 1.2]), old log-probs 0 so logps = log ρ.

    seq 0, A = +1, 3 tokens, ρ = [1.0, 1.5, 0.5]:
        −min(ρA, clip(ρ)A) = [−1, −1.2 (clipped high), −0.5 (ρ < 0.8 but A > 0: not clipped)]
    seq 1, A = −2, 2 active tokens, ρ = [0.5, 1.1 | masked 0.5]:
        [−min(−1, −1.6) = 1.6 (clipped low), −min(−2.2, −2.2) = 2.2]
    Token sums: −2.7 over 3 tokens, 3.8 over 2 tokens; 5 active tokens, 1 clipped each side.
    """
    ratios = torch.tensor([[1.0, 1.5, 0.5], [0.5, 1.1, 0.5]])
    logps = ratios.log().requires_grad_()
    return dict(logps=logps, old_logps=torch.zeros(2, 3), ref_logps=None, advantages=torch.tensor([1.0, -2.0]),
                completion_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]), epsilon_low=0.2, epsilon_high=0.2)


@pytest.mark.parametrize("loss_type, kwargs, expected", [
    ("dapo", {}, 1.1 / 5),                                     # token sum / active tokens
    ("dapo", {"num_items": 10}, 1.1 / 10),                     # ... of the whole generation batch
    ("bnpo", {}, 1.1 / 5),                                     # this batch's token mean
    ("grpo", {}, (-2.7 / 3 + 3.8 / 2) / 2),                    # mean of sequence means = 0.5
    ("dr_grpo", {"max_completion_length": 4}, 1.1 / (2 * 4)),  # sum / (sequences · max length)
])
def test_grpo_loss_types_by_hand(loss_type, kwargs, expected):
    loss, metrics = grpo_loss(**loss_example(), loss_type=loss_type, **kwargs)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["clip_ratio/low"].item() == pytest.approx(1 / 5)
    assert metrics["clip_ratio/high"].item() == pytest.approx(1 / 5)
    assert metrics["clip_ratio/region"].item() == pytest.approx(2 / 5)
    assert "kl" not in metrics


def test_grpo_loss_clipped_and_masked_tokens_get_no_gradient():
    example = loss_example()
    loss, _ = grpo_loss(**example)
    loss.backward()
    grad = example["logps"].grad
    # Unclipped tokens: d(−ρA)/d logp = −ρA, over 5 tokens. Clipped (0,1), (1,0) and masked (1,2): 0.
    # (0,0) sits at ρ = 1 exactly, inside the clip range.
    expected = torch.tensor([[-1.0, 0.0, -0.5], [0.0, 2.2, 0.0]]) / 5
    torch.testing.assert_close(grad, expected)


def test_grpo_loss_dr_grpo_needs_max_completion_length():
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(**loss_example(), loss_type="dr_grpo")


def test_k3_kl_by_hand():
    # logp 0, ref log 2: e^{log 2} − log 2 − 1 = 1 − log 2; logp log 2, ref 0: 1/2 + log 2 − 1.
    logps = torch.tensor([[0.0, math.log(2)]])
    ref = torch.tensor([[math.log(2), 0.0]])
    torch.testing.assert_close(kl_k3(logps, ref), torch.tensor([[1 - math.log(2), math.log(2) - 0.5]]))
    # ρ = 1 and A = 0 leave only β·KL; the two tokens' KL sum to exactly 1/2.
    loss, metrics = grpo_loss(logps, logps, ref, torch.zeros(1), torch.ones(1, 2), beta=0.04)
    assert loss.item() == pytest.approx(0.04 * 0.25)
    assert metrics["kl"].item() == pytest.approx(0.25)


def test_collate_prompts_left_pads_and_keeps_columns():
    batch = collate_prompts([{"prompt_input_ids": [5, 6, 7], "answer": "4"},
                             {"prompt_input_ids": [8], "answer": None}], pad_id=PAD)
    assert batch["prompt_input_ids"].tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert batch["prompt_attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["answer"] == ["4", None]


# ---- rewards ----

def test_exact_match():
    completions = ["3 apples and 4 pears make 7", "Answer: 1,000.0", " paris\n", "Paris it is",
                   "I think\nAnswer: Paris", "no idea", "12"]
    answers = [7, "1000", "Paris", "Paris", "Paris", "5", None]
    # Text answers compare with the whole completion, or its Answer: line, case-folded.
    assert exact_match([""] * 7, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, None]
    assert exact_match([""], ["7"]) == [None]  # no answer column at all
    assert final_answer("First 3, then 5.\nAnswer: 8 apples") == "8 apples"
    assert answers_match("8 apples", 8) and not answers_match("18", 8)


def test_contains_and_format():
    assert contains(["", ""], ["the cat", "a dog"], target=["cat", None]) == [1.0, None]
    completions = ["2 + 2 = 4\nAnswer: 4", "Answer: 4\n", "Answer: four", "Answer: 4\nmore text", "4"]
    assert format_reward([""] * 5, completions) == [1.0, 1.0, 0.0, 0.0, 0.0]
    tagged = functools.partial(format_reward, pattern=r"<answer>.+</answer>$")
    assert tagged(["", ""], ["<answer>4</answer>", "4"]) == [1.0, 0.0]
    assert reward_name(tagged) == "format_reward"


def test_reward_registry():
    @register_reward("test_shout")
    def shout(prompts, completions, **columns):
        return [float(c.isupper()) for c in completions]

    assert get_reward("test_shout") is shout
    assert get_reward("format") is format_reward
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward("nope")


def test_none_rewards_are_left_out_of_the_weighted_sum():
    def first(prompts, completions, **columns):
        return [1.0, None, 0.5]

    def second(prompts, completions, **columns):
        return [None, None, 1.0]

    rewards = Rewards([first, second], [1.0, 2.0])
    per_function = rewards.score(["p"] * 3, ["a", "b", "c"], {})
    assert per_function.isnan().tolist() == [[False, True], [True, True], [False, False]]
    assert rewards.total(per_function).tolist() == [1.0, 0.0, 2.5]
    assert rewards.names == ["first", "second"]


# ---- the trainer ----

def always_one(prompts, completions, **columns):
    return [1.0] * len(completions)


def distinct_letters(prompts, completions, **columns):
    """Varies between almost any two samples, so no group has zero advantages."""
    return [float(len(set(c))) for c in completions]


def every_other(prompts, completions, **columns):
    """0.5 on even rows, not applicable (None) on odd ones."""
    return [0.5 if i % 2 == 0 else None for i in range(len(completions))]


def test_step_metrics_weigh_rewards_and_skip_none():
    trainer = make_trainer(prompt_items(4), reward_funcs=(always_one, every_other), reward_weights=[1.0, 2.0],
                           val_loader=prompt_loader(prompt_items(4, seed=1), 2))
    metrics = trainer.training_step([next(iter(trainer.train_loader))])
    # Rows alternate 1 + 2·0.5 = 2 and 1 (None leaves the sum): every group is [2, 1, 2, 1].
    assert metrics["reward"] == pytest.approx(1.5)
    assert metrics["reward_std"] == pytest.approx(math.sqrt(0.25 * 8 / 7))
    assert metrics["rewards/always_one"] == 1.0 and metrics["rewards/every_other"] == 0.5
    assert metrics["frac_reward_zero_std"] == 0.0
    for key in ("kl", "entropy", "clip_ratio/region", "completion_length/mean", "completion_length/truncated",
                "generation/tokens_per_s", "time/generation_share", "time/optimization_share"):
        assert math.isfinite(metrics[key]), key
    assert 1 <= metrics["completion_length/min"] <= metrics["completion_length/mean"] <= metrics[
        "completion_length/max"] <= 6
    shares = metrics["time/generation_share"] + metrics["time/scoring_share"] + metrics["time/optimization_share"]
    assert shares == pytest.approx(1.0)
    assert trainer.evaluate() == {"val_reward": 1.5, "val_rewards/always_one": 1.0, "val_rewards/every_other": 0.5}


def test_completion_logps_of_a_padded_batch_equal_each_sequence_alone():
    """Left-padded prompts and post-EOS padding must not shift which logit scores which token."""
    trainer = make_trainer(prompt_items(4, seed=7), batch_size=4, beta=0.0, temperature=0.8, max_completion_length=8)
    batch = next(iter(trainer.train_loader))
    rollout, _, _ = trainer._rollout(batch, torch.Generator().manual_seed(0))
    lengths = rollout["completion_mask"].sum(-1).tolist()
    # The case under test: prompts and completions of different lengths in one batch.
    assert len(set(batch["prompt_attention_mask"].sum(-1).tolist())) > 1 and len(set(lengths)) > 1
    model = trainer.model
    with torch.no_grad():
        logps, _ = completion_logps(model, rollout, 0.8)
        for row, n in enumerate(lengths):
            ids = rollout["input_ids"][row][rollout["attention_mask"][row].bool()][None]  # no padding at all
            alone = torch.log_softmax(model(ids)[0, -n - 1:-1].float() / 0.8, dim=-1)
            expected = alone.gather(-1, ids[0, -n:, None])[:, 0]
            torch.testing.assert_close(logps[row, :n], expected, atol=1e-5, rtol=0)
            assert not logps[row, n:].any()  # masked after EOS


def test_policy_equal_to_reference_and_old_policy_gives_zero_kl_and_unit_ratio(monkeypatch):
    seen = []
    original = grpo_loss_module.grpo_token_losses

    def recording(logps, old_logps, ref_logps, *args):
        seen.append((logps.detach(), old_logps, ref_logps))
        return original(logps, old_logps, ref_logps, *args)

    monkeypatch.setattr(grpo_loss_module, "grpo_token_losses", recording)
    trainer = make_trainer(prompt_items(2), num_iterations=2)
    metrics = trainer.training_step([next(iter(trainer.train_loader))])
    logps, old, ref = seen[0]  # the first update: nothing has moved yet
    assert torch.equal(logps, old) and torch.equal(logps, ref)
    assert torch.equal(kl_k3(logps, ref), torch.zeros_like(logps))
    # The second update reuses the rollouts after one step: ρ ≠ 1 and KL > 0 there.
    assert not torch.equal(seen[1][0], seen[1][1])
    assert metrics["kl"] > 0


def test_reference_stays_frozen_and_beta_zero_needs_none():
    items = prompt_items(4)
    trainer = make_trainer(items)
    ref = trainer.ref_model
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    policy_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in ref.parameters()}
    for name, value in ref.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert any(not torch.equal(v, policy_before[k]) for k, v in trainer.model.state_dict().items())

    no_ref = make_trainer(items, beta=0.0)
    assert no_ref.ref_model is None
    assert "kl" not in no_ref.training_step([next(iter(no_ref.train_loader))])
    with pytest.raises(ValueError, match="ref_model"):
        GRPOTrainer(tiny_policy(), None, torch.optim.SGD(tiny_policy().parameters(), lr=0.1), [], ["contains"],
                    generate_fn=generate_text, tokenizer=LetterTokenizer(), beta=0.04)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_accumulation_equals_one_big_generation_batch(loss_type):
    """dapo normalises by the tokens, grpo by the sequences, of the whole step: two micro-batches
    of one prompt update the weights like one batch of two (plain SGD: the change is the gradient).
    The two prompts' completions hold 12 and 14 tokens: averaging per micro-batch would differ."""
    items = prompt_items(2, seed=1)
    runs = []
    for batch_size, accum in ((2, 1), (1, 2)):
        trainer = make_trainer(items, batch_size=batch_size, grad_accum_steps=accum, max_steps=1, loss_type=loss_type,
                               optimizer="sgd", lr=1.0, max_grad_norm=None,
                               generate_fn=row_seeded(4))
        start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        metrics = trainer.training_step(list(trainer.train_loader))
        runs.append(({k: v - start[k] for k, v in trainer.model.state_dict().items()}, metrics))
    (big, m_big), (small, m_small) = runs
    assert max(v.abs().max() for v in big.values()) > 1e-4  # the step did move the weights
    for name in big:
        torch.testing.assert_close(small[name], big[name], atol=1e-6, rtol=0, msg=name)
    for key in ("loss", "reward", "kl", "entropy", "completion_length/mean"):
        assert m_small[key] == pytest.approx(m_big[key], abs=1e-6), key


def test_resume_samples_the_same_completions(tmp_path):
    items = prompt_items(8)
    straight = make_trainer(items, max_steps=4)
    straight.train()
    first = make_trainer(items, max_steps=2, save_dir=tmp_path / "run")
    first.train()
    resumed = make_trainer(items, max_steps=4, save_dir=tmp_path / "run")
    resumed.train(resume_from="latest")
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_grpo_learns_to_emit_the_rewarded_token():
    """Reward 1 when the completion contains token "H" (~0.2 by chance for 8 tokens of 32).
    Measured: the first 3 steps average 0.17 and the last 5 of 20 steps 0.94 here; over six
    model/prompt seeds 0.17-0.29 and 0.94-1.0."""
    trainer = make_trainer(prompt_items(80), batch_size=4, beta=0.0, num_generations=8, max_completion_length=8,
                           max_steps=20, lr=3e-3, reward_funcs=["contains"])
    rewards = [trainer.training_step([batch])["reward"] for batch in trainer.train_loader]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    assert first < 0.45 and last > 0.8, rewards


# ---- DDP ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_ddp_two_ranks_equal_single_process(tmp_path):
    """Each rank generates for its half of the prompts; with per-row seeded sampling the
    completions match the single process's, so weights and logged metrics must match too
    (dapo normalises by the tokens of both ranks; rollout metrics are reduced over ranks)."""
    run([sys.executable, str(WORKER), "--out", str(tmp_path / "single")])
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), "--out", str(tmp_path / "ddp")])
    single, ddp = load_file(tmp_path / "single.safetensors"), load_file(tmp_path / "ddp.safetensors")
    assert single.keys() == ddp.keys()
    start = tiny_policy(seed=0).state_dict()
    assert max((single[k] - start[k]).abs().max() for k in single) > 1e-3  # the run did train
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], atol=1e-5, rtol=0, msg=name)
    m_single = json.loads((tmp_path / "single.json").read_text())
    m_ddp = json.loads((tmp_path / "ddp.json").read_text())
    for key in ("loss", "reward", "reward_std", "kl", "entropy", "completion_length/mean",
                "completion_length/min", "completion_length/max", "frac_reward_zero_std"):
        assert m_ddp[key] == pytest.approx(m_single[key], abs=1e-5), key


# ---- an inference engine behind generate_fn ----

class FakeEngine:
    """An engine's contract without a server: `sync` copies the policy's weights (what a server
    would load), and each call generates with `generate_text` from those copies, failing if the
    policy has moved on since (a stale rollout). Its log-probs are the trainer's own plus
    `offset` per token, as if the engine's numerics differed from the trainer's."""

    def __init__(self, offset: float = 0.0):
        self.offset, self.served, self.syncs, self.calls = offset, None, [], 0

    def sync(self, model, version):
        if self.served is not None and version == self.syncs[-1]:
            return
        self.served = [p.detach().clone() for p in model.parameters()]
        self.syncs.append(version)

    def __call__(self, model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                 generator=None):
        assert self.served is not None, "generated before the first sync"
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), self.served)), "a stale rollout"
        self.calls += 1
        g = generate_text(model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p, generator)
        batch = {"input_ids": g.sequences, "attention_mask": torch.cat([g.prompt_mask, g.completion_mask], 1),
                 "completion_mask": g.completion_mask}
        with torch.no_grad():
            trainer, _ = completion_logps(model, batch, temperature if temperature > 0 else 1.0)
        g.logps = (trainer + self.offset) * g.completion_mask
        return g


def test_an_engine_is_synced_before_every_rollout_and_never_serves_stale_weights():
    """Each step's rollouts and each evaluation come from the weights of that moment: the trainer
    syncs version 0 (the starting weights) before the first rollout, version 2 (two updates a
    step) before the second, and version 4 before the evaluation that ends training."""
    engine = FakeEngine()
    items = prompt_items(4)
    trainer = make_trainer(items, generate_fn=engine, max_steps=2, num_iterations=2, beta=0.0)
    trainer.val_loader = prompt_loader(prompt_items(2, seed=1), 2)
    trainer.train()
    assert engine.syncs == [0, 2, 4]
    assert engine.calls == 2 + 1  # one prompt batch a step, and the evaluation


def test_engine_rollouts_with_the_trainer_s_own_log_probs_train_exactly_as_hf():
    """With the engine's log-probs equal to the trainer's, every TIS weight is exp(0) = 1: the
    weights after two steps equal those of the same run with the policy generating itself,
    bit for bit. The gap and the weight are logged."""
    items = prompt_items(4)
    hf = make_trainer(items, beta=0.0)
    engine = make_trainer(items, beta=0.0, generate_fn=FakeEngine(), rollout={"engine": "vllm"})
    for trainer in (hf, engine):
        torch.manual_seed(0)  # each draws its rollouts' seeds from the torch RNG
        for batch in trainer.train_loader:
            metrics = trainer.training_step([batch])
    for p, q in zip(hf.model.parameters(), engine.model.parameters()):
        assert torch.equal(p, q)
    assert metrics["engine/logp_gap"] < 1e-6 and metrics["engine/tis_weight"] == pytest.approx(1.0)


def test_an_engine_s_log_prob_gap_is_corrected_up_to_the_cap():
    """Engine log-probs 0.5 below the trainer's on every token: ρ = e^0.5 ≈ 1.65 per token, under a
    cap of 3 it is the weight (and the logged gap 0.5); under a cap of 1.2 every token is capped.
    With tis_cap off the run is the plain one."""
    items = prompt_items(4)
    runs = {}
    batch = next(iter(prompt_loader(items, 2)))
    for cap in (3.0, 1.2, "off"):
        trainer = make_trainer(items, beta=0.0, generate_fn=FakeEngine(offset=-0.5),
                               rollout={"engine": "vllm", "tis_cap": cap})
        torch.manual_seed(0)
        runs[cap] = (trainer.training_step([batch]), [p.detach().clone() for p in trainer.model.parameters()])
    assert runs[3.0][0]["engine/logp_gap"] == pytest.approx(0.5, abs=1e-5)
    assert runs[3.0][0]["engine/tis_weight"] == pytest.approx(math.exp(0.5), rel=1e-5)
    assert runs[3.0][0]["engine/tis_capped"] == 0.0
    assert runs[1.2][0]["engine/tis_weight"] == pytest.approx(1.2, rel=1e-6)
    assert runs[1.2][0]["engine/tis_capped"] == 1.0
    assert "engine/tis_weight" not in runs["off"][0]
    plain = make_trainer(items, beta=0.0)
    torch.manual_seed(0)
    plain.training_step([batch])
    assert all(torch.equal(p, q) for p, q in zip(plain.model.parameters(), runs["off"][1]))
    assert not all(torch.equal(p, q) for p, q in zip(plain.model.parameters(), runs[3.0][1]))
