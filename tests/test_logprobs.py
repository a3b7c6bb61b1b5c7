"""Label log-probs chunk by chunk (selective log-softmax) against the full fp32 log-softmax:
the same values and gradients, without a full-vocabulary fp32 copy kept for backward."""
import pytest
import torch
import torch.nn.functional as F

from alignflow.trainers import logprobs
from alignflow.trainers.logprobs import IGNORE_INDEX, token_logps, token_logps_and_entropy


def full_logps(logits, labels, temperature=1.0):
    """What the trainers computed before: cross entropy over an fp32 copy of every logit."""
    nll = F.cross_entropy((logits.float() / temperature).flatten(0, 1), labels.flatten(),
                          ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(labels.shape)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 501 * 5)  # 5 rows at a time: many chunks


def case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 17, 501, generator=g) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, 501, (3, 17), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, -3:] = IGNORE_INDEX  # padding
    return logits, labels


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_equal_the_full_log_softmax(small_chunks, temperature):
    logits, labels = case(torch.float32)
    chunked, full = token_logps(logits, labels, temperature), full_logps(logits, labels, temperature)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    assert (chunked[labels == IGNORE_INDEX] == 0).all()
    weights = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    (g_chunked,) = torch.autograd.grad((chunked * weights).sum(), logits)
    (g_full,) = torch.autograd.grad((full * weights).sum(), logits)
    torch.testing.assert_close(g_chunked, g_full, atol=1e-6, rtol=0)


def test_bf16_logits_get_bf16_gradients_equal_to_the_fp32_path(small_chunks):
    logits, labels = case(torch.bfloat16)
    chunked, full = token_logps(logits, labels), full_logps(logits, labels)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), logits)
    (g_full,) = torch.autograd.grad(full.sum(), logits)
    assert g_chunked.dtype == torch.bfloat16
    torch.testing.assert_close(g_chunked, g_full, atol=0, rtol=0)


def saved_bytes(fn, logits, labels) -> int:
    """Bytes autograd keeps for backward while fn runs."""
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(logits, labels).sum()
    return sum(kept)


def test_backward_keeps_the_logits_and_two_floats_a_row_not_an_fp32_copy():
    logits = torch.randn(4, 64, 4096, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 4096, (4, 64))
    rows, logits_bytes = 4 * 64, logits.numel() * 2
    chunked = saved_bytes(token_logps, logits, labels)
    full = saved_bytes(full_logps, logits, labels)
    assert chunked <= logits_bytes + 32 * rows  # labels, mask, max and log-sum-exp per row
    assert full >= logits_bytes * 2  # an fp32 copy's log-softmax: twice the bf16 logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_from_the_same_pass_equals_the_full_formula(small_chunks, dtype):
    logits, labels = case(dtype)
    logps, entropy = token_logps_and_entropy(logits, labels, 0.7)
    logp = torch.log_softmax(logits.detach().float() / 0.7, dim=-1)
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=0)
    assert not entropy.requires_grad
    torch.testing.assert_close(logps, token_logps(logits, labels, 0.7), atol=0, rtol=0)


def test_sft_loss_is_the_cross_entropy_sum():
    from conftest import SequenceDataset, collate, small_model
    from alignflow.trainers.sft import SFTTrainer, next_token_labels

    model = small_model()
    batch = collate([SequenceDataset(4, seed=2)[i] for i in range(4)])
    loss, _ = SFTTrainer.compute_loss(None, model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = F.cross_entropy(logits.flatten(0, 1), next_token_labels(batch).flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    (g,) = torch.autograd.grad(loss, model.model.embed_tokens.weight)
    (g_ref,) = torch.autograd.grad(expected, model.model.embed_tokens.weight)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=0)
