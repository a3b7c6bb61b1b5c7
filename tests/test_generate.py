import math
import re

import pytest
import torch

from alignflow.models import LlamaForCausalLM, ModelConfig, generate
from alignflow.models.generate import completion_mask, top_k_filter, top_p_filter

VOCAB = 97


def make_model() -> LlamaForCausalLM:
    # A wide init spreads the logits so greedy choices are never near-ties, which would
    # make cached-vs-uncached comparisons flip on 1e-7 rounding differences.
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_key_value_heads=2,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(cfg)


def left_padded_prompts(lengths, pad_id=0):
    g = torch.Generator().manual_seed(1)
    P = max(lengths)
    ids = torch.full((len(lengths), P), pad_id)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, P - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, P - n :] = 1
    return ids, mask


def test_cached_equals_uncached_greedy():
    model = make_model()
    ids, mask = left_padded_prompts([5, 9, 2, 7])
    cached = generate(model, ids, mask, max_new_tokens=24, temperature=0)
    uncached = generate(model, ids, mask, max_new_tokens=24, temperature=0, use_cache=False)
    assert cached.shape == (4, 9 + 24)
    assert torch.equal(cached[:, :9], ids)

    # Premise check: every greedy choice wins by a clear margin, so equality is meaningful.
    full_mask = torch.cat([mask, torch.ones(4, 24, dtype=torch.long)], 1)
    with torch.no_grad():
        logits = model(uncached, attention_mask=full_mask)[:, 8:-1]
    top2 = logits.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-3
    assert torch.equal(cached, uncached)


def test_the_head_runs_at_the_last_position_only_and_the_tokens_equal_full_forwards():
    """Prefill and decode ask for the last position's logits only (logits_to_keep=1): the head
    sees one row per prompt a call, and greedy tokens equal those of full forwards over the
    whole sequence each step."""
    config = make_model().config.model_copy(update={"tie_word_embeddings": False})
    torch.manual_seed(0)
    untied = LlamaForCausalLM(config)
    ids, mask = left_padded_prompts([5, 9, 2, 7])
    rows = []
    handle = untied.lm_head.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[:2]))
    try:
        out = generate(untied, ids, mask, max_new_tokens=6, temperature=0)
    finally:
        handle.remove()
    assert rows == [(4, 1)] * 6

    tokens, full_mask = ids, mask
    with torch.no_grad():
        for _ in range(6):
            nxt = untied(tokens, attention_mask=full_mask)[:, -1].argmax(-1, keepdim=True)
            tokens, full_mask = torch.cat([tokens, nxt], 1), torch.cat([full_mask, torch.ones_like(nxt)], 1)
    assert torch.equal(out, tokens)


def expected_with_eos(free_new: torch.Tensor, eos: int, fill: int) -> list[list[int]]:
    """Greedy rows are independent, so each row is its free run up to EOS, then fill."""
    rows = []
    for row in free_new.tolist():
        if eos in row:
            cut = row.index(eos) + 1
            row = row[:cut] + [fill] * (len(row) - cut)
        rows.append(row)
    return rows


@pytest.mark.parametrize("pad_id", [0, None])
def test_eos_stops_rows_and_pads(pad_id):
    model = make_model()
    ids, mask = left_padded_prompts([4, 6, 3])
    free = generate(model, ids, mask, max_new_tokens=12, temperature=0)[:, 6:]
    eos = free[0, 2].item()  # row 0 stops at its 3rd token (or earlier if it repeats)
    out = generate(model, ids, mask, max_new_tokens=12, temperature=0, eos_token_id=eos, pad_token_id=pad_id)
    expected = expected_with_eos(free, eos, eos if pad_id is None else pad_id)
    if all(eos in row for row in free.tolist()):  # everyone finished: output is cut short
        longest = max(row.tolist().index(eos) + 1 for row in free)
        expected = [row[:longest] for row in expected]
    assert out[:, 6:].tolist() == expected


def test_stops_early_when_all_rows_finish():
    model = make_model()
    ids, mask = left_padded_prompts([3, 5])
    free = generate(model, ids, mask, max_new_tokens=16, temperature=0)[:, 5:].tolist()
    # Pick as EOS the token with which every row finishes soonest.
    last_step = {v: max(row.index(v) for row in free) for v in set(free[0]) if all(v in row for row in free)}
    assert last_step, "premise: the rows share a generated token"
    eos = min(last_step, key=last_step.get)
    out = generate(model, ids, mask, max_new_tokens=16, temperature=0, eos_token_id=eos, pad_token_id=0)
    assert out.shape[1] == 5 + last_step[eos] + 1 < 5 + 16
    expected = expected_with_eos(torch.tensor(free), eos, 0)
    assert out[:, 5:].tolist() == [row[: last_step[eos] + 1] for row in expected]


def test_top_k_one_equals_greedy():
    model = make_model()
    ids, mask = left_padded_prompts([4, 8])
    greedy = generate(model, ids, mask, max_new_tokens=10, temperature=0)
    g = torch.Generator().manual_seed(123)
    topk1 = generate(model, ids, mask, max_new_tokens=10, temperature=1.0, top_k=1, generator=g)
    assert torch.equal(greedy, topk1)


def test_sampling_reproducible_with_generator():
    model = make_model()
    ids, mask = left_padded_prompts([4, 8, 6])

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(model, ids, mask, max_new_tokens=16, temperature=1.0, top_p=0.9, generator=g)

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_inverse_cdf_draws_each_token_with_its_probability_and_never_a_zero_one():
    from alignflow.models.generate import inverse_cdf_sample

    p = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.25, 0.05, 0.0])
    rows = 200_000
    drawn = inverse_cdf_sample(p.expand(rows, -1), torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=p.numel()).double()
    assert counts[p == 0].sum() == 0
    sigma = (rows * p * (1 - p)).sqrt()
    assert ((counts - rows * p).abs() <= 5 * sigma + 1e-9).all(), (counts / rows, p)


def test_inverse_cdf_is_the_first_index_whose_cumulative_sum_passes_the_draw():
    from alignflow.models.generate import inverse_cdf_sample

    probs = torch.rand(16, 50, generator=torch.Generator().manual_seed(1)) ** 4  # unnormalised: scaled by the total
    probs[:, ::3] = 0
    g = torch.Generator().manual_seed(2)
    u = torch.rand(16, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))  # the same draws
    drawn = inverse_cdf_sample(probs, g)
    for row, index in enumerate(drawn.tolist()):
        cdf = probs[row].double().cumsum(0)
        threshold = u[row, 0] * cdf[-1]
        assert index == next(i for i, c in enumerate(cdf.tolist()) if c > threshold)
        assert probs[row, index] > 0


def test_restores_training_mode():
    model = make_model().train()
    ids, mask = left_padded_prompts([3])
    generate(model, ids, mask, max_new_tokens=2)
    assert model.training
    model.eval()
    generate(model, ids, mask, max_new_tokens=2)
    assert not model.training


def test_top_k_filter():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    out = top_k_filter(logits, 2)
    assert torch.equal(torch.isfinite(out), torch.tensor([[False, True, True, False]]))
    assert torch.equal(top_k_filter(logits, 10), logits)


@pytest.mark.parametrize(
    "p, kept",
    [
        (0.3, [1]),  # 0.4 alone already reaches 0.3
        (0.6, [1, 2]),  # 0.4 + 0.3 = 0.7 >= 0.6; 0.4 alone does not
        (0.75, [1, 2, 3]),  # 0.9 needed
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_filter_keeps_smallest_set(p, kept):
    probs = torch.tensor([[0.1, 0.4, 0.3, 0.2]])
    out = top_p_filter(probs.log(), p)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == kept
    # Survivors keep their logits, so renormalized probabilities keep their ratios.
    renorm = out.softmax(-1)[0, kept]
    assert renorm.sum().item() == pytest.approx(1.0)
    ratio = renorm[0].item() / probs[0, kept[0]].item()
    assert math.isclose(ratio, 1 / probs[0, kept].sum().item(), rel_tol=1e-5)


def test_completion_mask_covers_up_to_the_first_eos():
    EOS, PAD = 1, 0
    ids = torch.tensor([[5, 6, EOS, PAD, PAD], [5, EOS, EOS, 7, 8], [5, 6, 7, 8, 9], [EOS, PAD, PAD, PAD, PAD]])
    assert completion_mask(ids, EOS).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


class IdTokenizer:
    pad_token_id, eos_token_id = 0, 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_generate_text_refuses_prompts_past_the_context():
    from alignflow.models import generate_text

    model = make_model()  # 256 positions
    calls = []
    sample = lambda *a, **kw: calls.append(1)  # noqa: E731
    with pytest.raises(ValueError, match=r"^prompt 2 has 12,345 tokens; with max_new_tokens=48 that exceeds "
                                         r"the model's context of 256 positions$"):
        generate_text(model, IdTokenizer(), [[5] * 10, [5] * 12345], max_new_tokens=48, sample=sample)
    with pytest.raises(ValueError, match=r"^prompt 1 has 250 tokens; with max_new_tokens=7"):
        generate_text(model, IdTokenizer(), [[5] * 250], max_new_tokens=7, sample=sample)
    assert calls == []  # refused before anything was generated
    # Exactly filling the context is fine.
    out = generate_text(model, IdTokenizer(), [[5] * 240, [6] * 3], max_new_tokens=16)
    assert out.sequences.shape == (2, 256)


def test_generate_text_without_a_known_context_does_not_check():
    from alignflow.models import generate_text

    model = make_model()
    model.config = object()  # a model whose config gives no positions: nothing to check against
    seen = []

    def sample(model, ids, **kw):
        seen.append(ids.shape)
        return torch.cat([ids, torch.full((ids.shape[0], 1), 2)], dim=1)

    generate_text(model, IdTokenizer(), [[5] * 300], max_new_tokens=8, sample=sample)
    assert seen == [(1, 300)]


def test_cli_generate_names_a_prompt_past_the_context(tmp_path, capsys):
    from alignflow.flows.cli import main as cli
    from alignflow.models import get_preset, train_tokenizer
    from alignflow.stages import handoff

    tok = train_tokenizer(["The quick brown fox jumps over the lazy dog."] * 20, vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(get_preset("tiny", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=256))
    stage = tmp_path / "sft"
    handoff.save_stage(stage, model, tok)
    handoff.write_manifest(stage, {"stage": "sft", "metrics": {}, "timings": {}})
    capsys.readouterr()
    assert cli(["generate", str(stage), "--prompt", "hi", "--prompt", "x" * 50_000]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert re.fullmatch(r"alignflow generate: error: prompt 2 has [\d,]+ tokens; with max_new_tokens=48 that "
                        r"exceeds the model's context of 256 positions\n", err), err
