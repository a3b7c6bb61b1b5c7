"""SFT packing (trainers/packing.py): several examples per row, none attending to another, so
every example's log-probs and the step's gradient are those of the padded batch."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import VOCAB, small_model
from alignflow.trainers import SFTTrainer, configure_optimizer
from alignflow.trainers.logprobs import IGNORE_INDEX, token_logps
from alignflow.trainers.packing import pack_examples
from alignflow.trainers.sft import collate_causal_lm, next_token_labels


def examples(n: int, vocab: int, seed: int = 0, lo: int = 3, hi: int = 24) -> list[dict]:
    g = random.Random(seed)
    out = []
    for _ in range(n):
        length = g.randint(lo, hi)
        prompt = g.randint(1, min(3, length - 1))
        ids = [g.randrange(3, vocab) for _ in range(length)]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def test_best_fit_decreasing_fills_rows_and_keeps_every_example_once():
    data = examples(200, 100, lo=2, hi=60)
    rows = pack_examples(data, 64)
    assert rows == pack_examples(data, 64)  # deterministic
    total = sum(len(e["input_ids"]) for e in data)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    assert total / (len(rows) * 64) > 0.9  # nearly full rows (padding each example to 64: 0.5)
    found = []
    for r in rows:
        assert len(r["labels"]) == len(r["position_ids"]) == len(r["input_ids"])
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        for a, b in zip(starts, starts[1:] + [len(r["input_ids"])]):
            assert r["position_ids"][a:b] == list(range(b - a))
            assert r["labels"][a] == IGNORE_INDEX  # nothing predicts an example's first token
            found.append(tuple(r["input_ids"][a:b]))
    assert sorted(found) == sorted(tuple(e["input_ids"]) for e in data)
    with pytest.raises(ValueError, match="example 1 has 70 tokens, more than a packed row's 64"):
        pack_examples([data[0], {"input_ids": [5] * 70, "labels": [5] * 70}], 64)


def model_of(kind, hf_model_dir):
    if kind == "builtin":
        return small_model(seed=0, max_position_embeddings=128).eval(), VOCAB
    model = AutoModelForCausalLM.from_pretrained(hf_model_dir(kind), dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    model.config.use_cache = False
    return model, model.config.vocab_size


def logps_of(model, batch) -> torch.Tensor:
    if "position_ids" in batch:
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return token_logps(logits, next_token_labels(batch))


@pytest.mark.parametrize("kind", ["builtin", "llama3", "chatml", "neox"])
def test_each_example_in_a_packed_row_scores_as_it_does_alone(kind, hf_model_dir):
    model, vocab = model_of(kind, hf_model_dir)
    data = examples(12, min(vocab, 200), seed=1)
    rows = pack_examples(data, 64)
    assert len(rows) < len(data)  # really packed
    with torch.no_grad():
        packed = logps_of(model, collate_causal_lm(rows, pad_id=0))
        for r, row in enumerate(rows):
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
            for a, b in zip(starts, starts[1:]):
                ids = row["input_ids"][a:b]
                example = next(e for e in data if e["input_ids"] == ids)
                alone = logps_of(model, collate_causal_lm([example], pad_id=0))[0, : b - a - 1]
                # Row position t predicts t+1: the example's b-a-1 targets sit at a..b-2.
                inside = packed[r, a: b - 1]
                assert torch.allclose(inside, alone, atol=1e-5, rtol=0), (inside - alone).abs().max()


@pytest.mark.parametrize("kind", ["builtin", "llama3"])
def test_the_first_step_gradient_of_packed_rows_equals_the_padded_batch(kind, hf_model_dir):
    data = examples(16, min(VOCAB, 200), seed=2)

    def gradient(collate, items):
        model, _ = model_of(kind, hf_model_dir)
        model.train()
        loader = torch.utils.data.DataLoader(items, batch_size=len(items), collate_fn=lambda b: collate(b, 0))
        trainer = SFTTrainer(model=model, optimizer=configure_optimizer(model, "sgd", lr=1.0), train_loader=loader,
                             device="cpu", max_steps=1, max_grad_norm=None, progress_bar=False)
        trainer.training_step([next(iter(loader))])  # one SGD step, the same rule for both: any gap is the gradient's
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    padded = gradient(collate_causal_lm, data)
    packed = gradient(collate_causal_lm, pack_examples(data, 64))
    for name, value in padded.items():
        assert torch.allclose(packed[name], value, atol=1e-5, rtol=0), (name, (packed[name] - value).abs().max())


def test_an_sft_stage_packs_its_data_and_says_so(hf_model_dir, tmp_path, small_config, monkeypatch):
    from alignflow.stages import handoff
    from alignflow.stages.run import train_stage
    from alignflow.trainers import SFTTrainer
    from test_hf_pipeline import FAST, losses

    told, compute_loss = [], SFTTrainer.compute_loss

    def telling(self, model, batch):
        told.append("position_ids" in batch)
        return compute_loss(self, model, batch)

    monkeypatch.setattr(SFTTrainer, "compute_loss", telling)
    config = small_config(**{**FAST, "sft.data.packing": True, "sft.data.max_length": 256, "sft.train.batch_size": 2},
                          model=str(hf_model_dir("llama3")), start="sft", runs_dir=str(tmp_path))
    train_stage("sft", config, hf_model_dir("llama3"), tmp_path / "sft")
    notes = handoff.verify(tmp_path / "sft")["data"]["train"]
    assert notes["rows"] > 2 * notes["packed_rows"] > 0  # examples, and the fewer rows they fill
    assert told and all(told)  # every batch, evaluation's too, tells the model where its examples start
    curve = losses(tmp_path / "sft")
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.3, curve


def test_packing_is_an_sft_setting():
    from alignflow.stages.config import load_config

    with pytest.raises(ValueError, match="dpo.data.packing"):
        load_config("tiny", overrides={"dpo.data.packing": True})


def test_a_model_that_lets_packed_examples_see_each_other_is_refused(hf_model_dir):
    """transformers reads packed sequences from position ids only without a cache: with
    use_cache on (its own default) the examples silently attend to each other."""
    from alignflow.trainers.packing import check_isolation

    model, vocab = model_of("llama3", hf_model_dir)
    check_isolation(model, vocab)
    model.config.use_cache = True
    with pytest.raises(ValueError, match="LlamaForCausalLM lets packed examples attend to each other"):
        check_isolation(model, vocab)
    check_isolation(small_model(seed=0), VOCAB)
