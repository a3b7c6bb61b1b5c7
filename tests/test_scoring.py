"""The LM head run only at labelled positions (trainers/scoring.py) gives the full logits' log-probs,
entropies and gradients, on every kind of model the trainers see, and the head really sees
only those rows."""
import pytest
import torch

from alignflow.models import lora
from alignflow.trainers.logprobs import IGNORE_INDEX, token_logps, token_logps_and_entropy
from alignflow.trainers.modules import logits_of
from alignflow.trainers.reference import AdapterDisabled
from alignflow.trainers.scoring import head_rows, label_logps

pytestmark = pytest.mark.usefixtures("one_thread")


def builtin(tied: bool):
    from conftest import small_model

    return small_model(seed=3, tie_word_embeddings=tied)


def hf(family: str):
    from hf_fixtures import _model, build_tokenizer

    torch.manual_seed(4)
    return _model(family, build_tokenizer(family)).float()


def hf_lora():
    """LoRA on every projection and a trained copy of the head (peft's modules_to_save)."""
    return lora.add_adapter(hf("llama3"), r=4, alpha=8, modules_to_save=["lm_head"], seed=1)


def padded_batch(vocab: int):
    """Three right-padded rows with prompts of different lengths: labels −100 on prompt and padding."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, min(vocab, 200), (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:], mask[2, 6:] = 0, 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[0, :3], labels[1, :5], labels[2, :2] = IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t scores token t+1
    return {"input_ids": ids, "attention_mask": mask}, targets


MODELS = {"builtin-tied": lambda: builtin(True), "builtin-untied": lambda: builtin(False),
          "hf-llama3": lambda: hf("llama3"), "hf-chatml-tied": lambda: hf("chatml"), "hf-neox": lambda: hf("neox"),
          "hf-lora": hf_lora}


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_labelled_rows_equal_the_full_logits(kind, temperature):
    model = MODELS[kind]()
    inputs, targets = padded_batch(model.config.vocab_size)
    weights = torch.randn(targets.shape, generator=torch.Generator().manual_seed(6))
    params = [p for p in model.parameters() if p.requires_grad]

    logps, entropy = label_logps(model, targets, temperature, with_entropy=True, **inputs)
    grads = torch.autograd.grad((logps * weights).sum(), params)

    full_logps, full_entropy = token_logps_and_entropy(logits_of(model(**inputs)), targets, temperature)
    full_grads = torch.autograd.grad((full_logps * weights).sum(), params)

    labelled = targets != IGNORE_INDEX
    torch.testing.assert_close(logps, full_logps, atol=2e-6, rtol=0)
    assert (logps[~labelled] == 0).all()
    torch.testing.assert_close(entropy[labelled], full_entropy[labelled], atol=2e-6, rtol=0)
    assert entropy[labelled].min() > 1.0  # a random model's next-token distributions are wide
    for g, full in zip(grads, full_grads):
        torch.testing.assert_close(g, full, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["builtin-tied", "hf-llama3", "hf-lora"])
def test_the_head_sees_only_the_labelled_rows_and_the_hook_goes_away(kind):
    model = MODELS[kind]()
    inputs, targets = padded_batch(model.config.vocab_size)
    index = (targets.flatten() != IGNORE_INDEX).nonzero().squeeze(1)
    assert 0 < len(index) < targets.numel() / 2  # the saving under test: most positions carry no label
    with head_rows(model, index) as fired:
        logits = logits_of(model(**inputs))
    assert fired == [True] and logits.shape == (1, len(index), model.config.vocab_size)
    owner = model.get_output_embeddings() if kind != "builtin-tied" else model.model.norm
    assert not owner._forward_pre_hooks and not owner._forward_hooks
    assert logits_of(model(**inputs)).shape == (*targets.shape, model.config.vocab_size)  # unchanged after


def test_a_lora_reference_view_scores_the_base_model():
    policy = hf_lora()
    with torch.no_grad():  # move the adapter off zero, so the policy and its base differ
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    inputs, targets = padded_batch(policy.config.vocab_size)
    ref, _ = label_logps(AdapterDisabled(policy), targets, **inputs)
    with policy.disable_adapter():
        base = token_logps(logits_of(policy(**inputs)), targets)
    torch.testing.assert_close(ref, base, atol=2e-6, rtol=0)
    assert not torch.allclose(ref, label_logps(policy, targets, **inputs)[0], atol=1e-3)


def test_a_compiled_model_takes_the_full_logits_path_with_the_same_numbers():
    model = builtin(False)
    inputs, targets = padded_batch(model.config.vocab_size)
    compiled = torch.compile(model, backend="eager")  # no hook may change a compiled graph per call
    index = (targets.flatten() != IGNORE_INDEX).nonzero().squeeze(1)
    with head_rows(compiled, index) as fired:
        compiled(**inputs)
    assert fired == [False]
    torch.testing.assert_close(label_logps(compiled, targets, **inputs)[0], label_logps(model, targets, **inputs)[0],
                               atol=2e-6, rtol=0)
