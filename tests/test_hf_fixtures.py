"""The tiny Hugging Face model dirs of tests/hf_fixtures.py load and follow their family's conventions."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from hf_fixtures import FAMILIES, SPECS, build_model_dir, build_tokenizer

MESSAGES = [{"role": "user", "content": "What is 3 plus 4?"},
            {"role": "assistant", "content": "3 + 4 = 7.\nAnswer: 7"}]

EXPECTED = {
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 3 plus 4?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n3 + 4 = 7.\nAnswer: 7<|eot_id|>",
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n"
              "<|im_start|>assistant\n3 + 4 = 7.\nAnswer: 7<|im_end|>\n",
    "neox": "<|user|>\nWhat is 3 plus 4?<|end|>\n<|assistant|>\n3 + 4 = 7.\nAnswer: 7<|end|>\n",
}
WITH_SYSTEM = {  # an explicit system message (ChatML then drops its default one)
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "neox": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n",
}
MODEL_TYPES = {"llama3": "LlamaForCausalLM", "chatml": "Qwen2ForCausalLM", "neox": "GPTNeoXForCausalLM"}

pytestmark = pytest.mark.parametrize("family", FAMILIES)


def load(hf_model_dir, family):
    return AutoTokenizer.from_pretrained(hf_model_dir(family)), AutoModelForCausalLM.from_pretrained(hf_model_dir(family))


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_loads_with_family_conventions(hf_model_dir, family):
    tok, model = load(hf_model_dir, family)
    spec = SPECS[family]
    assert type(model).__name__ == MODEL_TYPES[family]
    assert model.dtype == torch.float32
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (spec["bos"], spec["eos"], spec["pad"])
    assert (model.config.bos_token_id, model.config.pad_token_id) == (tok.bos_token_id, tok.pad_token_id)
    assert model.config.eos_token_id == tok.eos_token_id
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == (family == "chatml")
    if family == "chatml":  # spare embedding rows past the tokenizer
        assert model.config.vocab_size % 64 == 0 and model.config.vocab_size > len(tok)
    else:
        assert model.config.vocab_size == len(tok)
    stops = GenerationConfig.from_pretrained(hf_model_dir(family)).eos_token_id
    stops = stops if isinstance(stops, list) else [stops]
    assert tok.convert_tokens_to_ids(spec["end_of_turn"]) in stops and tok.eos_token_id in stops
    if family == "neox":
        assert spec["end_of_turn"] != tok.eos_token and tok.pad_token_id == tok.eos_token_id == 0


def test_chat_template(hf_model_dir, family):
    tok = AutoTokenizer.from_pretrained(hf_model_dir(family))
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == EXPECTED[family]
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(system, tokenize=False, add_generation_prompt=True) == WITH_SYSTEM[family]


def test_round_trip_and_generation_prompt_prefix(hf_model_dir, family):
    tok = AutoTokenizer.from_pretrained(hf_model_dir(family))
    full = tok.apply_chat_template(MESSAGES, tokenize=False)
    prompt = tok.apply_chat_template(MESSAGES[:-1], tokenize=False, add_generation_prompt=True)
    for text in (full, "Café naïve 🙂  two  spaces\n\n\ttab"):
        assert tok.decode(ids(tok, text)) == text
    assert full.startswith(prompt)
    prompt_ids, full_ids = ids(tok, prompt), ids(tok, full)
    assert full_ids[: len(prompt_ids)] == prompt_ids  # the reply's tokens can be masked by position


def test_special_tokens(hf_model_dir, family):
    tok = AutoTokenizer.from_pretrained(hf_model_dir(family))
    for token in SPECS[family]["special"]:
        assert len(ids(tok, token)) == 1 and token in tok.all_special_tokens
    text = tok.decode(ids(tok, EXPECTED[family]), skip_special_tokens=True)
    assert "<|" not in text and "Answer: 7" in text
    # Llama 3's tokenizer prepends BOS by itself (so its template's BOS doubles up if added again)
    plain = tok("Hi")["input_ids"]
    assert (plain[0] == tok.bos_token_id) == (family == "llama3") and plain[-1] != tok.eos_token_id


def test_left_padded_forward(hf_model_dir, family):
    tok, model = load(hf_model_dir, family)
    rows = [ids(tok, tok.apply_chat_template(MESSAGES, tokenize=False)), ids(tok, "What is 3 plus 4?")]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id  # llama3 has no pad token
    width = max(map(len, rows))
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits
        alone = model(input_ids=torch.tensor([rows[1]])).logits
    assert logits.shape == (2, width, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[1, width - len(rows[1]):], alone[0], atol=1e-5, rtol=1e-4)


def test_seeded_and_deterministic(tmp_path, family):
    assert build_tokenizer(family).get_vocab() == build_tokenizer(family).get_vocab()
    a, b, c = (load_file(build_model_dir(family, tmp_path / name, seed=seed) / "model.safetensors")
               for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
