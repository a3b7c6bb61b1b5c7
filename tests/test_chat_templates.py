"""Chat templates of three Hugging Face model families (tests/hf_fixtures.py): what SFT learns,
the DPO/GRPO prompt/completion split, the stop tokens, the padding token, and a template whose
reply does not continue its prompt failing with the row named. Templates that behave as other
real ones do: test_template_behaviours.py."""
import json

import pytest

from alignflow.models import ChatTemplateError, ensure_pad_token, load_tokenizer, prompt_ids, render_chat, stop_ids
from alignflow.stages import data as data_mod
from alignflow.stages.formats import CONVERSATIONS, PAIRS
from alignflow.stages.settings import DataConfig, DemoConfig

TURNS = [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "3 + 4 = 7."},
         {"role": "user", "content": "And 2 plus 2?"}, {"role": "assistant", "content": "2 + 2 = 4."}]

# Per family, written out by hand: the text SFT learns in TURNS (each reply through its end-of-turn
# token, never the newline a template writes after it), and the prompt GRPO continues.
EXPECTED = {
    "llama3": dict(
        learned=["3 + 4 = 7.<|eot_id|>", "2 + 2 = 4.<|eot_id|>"],
        prompt="<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 3 plus 4?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n",
        stops=["<|eot_id|>", "<|end_of_text|>"], end="<|eot_id|>"),  # generation_config.json stops on both
    "chatml": dict(
        learned=["3 + 4 = 7.<|im_end|>", "2 + 2 = 4.<|im_end|>"],
        prompt="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 3 plus 4?"
               "<|im_end|>\n<|im_start|>assistant\n",
        stops=["<|im_end|>"], end="<|im_end|>"),
    "neox": dict(
        learned=["3 + 4 = 7.<|end|>", "2 + 2 = 4.<|end|>"],
        prompt="<|user|>\nWhat is 3 plus 4?<|end|>\n<|assistant|>\n",
        stops=["<|endoftext|>", "<|end|>"], end="<|end|>"),  # its EOS is not its end-of-turn token
}


def prepared(stage: str, kind, path, tok):
    """A one-file training split of `kind`, read and tokenised as the stage would."""
    return data_mod.prepare(stage, kind, DataConfig(source=str(path), val_fraction=0.0), DemoConfig(), tok, "train")


def spans(tok, ids, mask) -> list[str]:
    """The decoded runs of masked tokens."""
    out, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            out.append(tok.decode(run)), run.clear()
    return out + ([tok.decode(run)] if run else [])


@pytest.fixture(params=sorted(EXPECTED))
def family_tok(request, hf_model_dir):
    return request.param, load_tokenizer(str(hf_model_dir(request.param)))


def test_sft_learns_each_reply_and_its_end_of_turn_token(family_tok):
    family, tok = family_tok
    ids, mask = render_chat(tok, TURNS)
    assert ids == tok.apply_chat_template(TURNS, tokenize=True, return_dict=True)["input_ids"]  # as HF renders it
    assert spans(tok, ids, mask) == EXPECTED[family]["learned"]


def test_prompt_completion_split_and_stop_tokens(family_tok, tmp_path):
    family, tok = family_tok
    assert tok.decode(prompt_ids(tok, TURNS[:1])) == EXPECTED[family]["prompt"]
    assert [tok.convert_ids_to_tokens(i) for i in stop_ids(tok)] == EXPECTED[family]["stops"]
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": TURNS[:1], "chosen": [TURNS[1]],
                                "rejected": [{"role": "assistant", "content": "3 + 4 = 8."}]}) + "\n")
    row = prepared("dpo", PAIRS, path, tok).dataset[0]
    for side, reply in (("chosen", "3 + 4 = 7."), ("rejected", "3 + 4 = 8.")):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        n = len(prompt_ids(tok, TURNS[:1]))
        assert ids[:n] == prompt_ids(tok, TURNS[:1]) and set(labels[:n]) == {-100}  # the prompt, unscored
        assert tok.decode([t for t in labels if t != -100]) == reply + EXPECTED[family]["end"]


def test_padding_is_never_eos(family_tok):
    family, tok = family_tok
    before = len(tok)
    added = ensure_pad_token(tok)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    # llama3 has no pad token and neox pads with EOS: each gets one of its own.
    assert added == (family in ("llama3", "neox")) and len(tok) == before + added


def test_a_template_whose_reply_does_not_continue_its_prompt_fails_naming_the_row(hf_model_dir, tmp_path):
    tok = load_tokenizer(str(hf_model_dir("chatml")))
    # The generation prompt announces the reply with a "\n" more than the reply is rendered with.
    tok.chat_template = tok.chat_template.replace("<|im_start|>assistant\n'", "<|im_start|>assistant\n\n'")
    with pytest.raises(ChatTemplateError, match=r"message 1 \(assistant\): the chat template's generation prompt ends "
                                                r"with '\\n', which its rendering of the reply does not write"):
        render_chat(tok, TURNS[:2])
    rows = [{"messages": TURNS[:2]}] * 3
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(data_mod.DataError, match=r"chat.jsonl: row 0 \(line 1\): message 1 \(assistant\): the chat "
                                                 r"template's generation prompt"):
        prepared("sft", CONVERSATIONS, path, tok)


def test_conversations_without_a_template_are_refused_plain_text_is_not(hf_model_dir, tmp_path):
    tok = load_tokenizer(str(hf_model_dir("neox")))
    tok.chat_template = None
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": TURNS[:2]}) + "\n")
    with pytest.raises(data_mod.DataError, match="row 0 .*no chat template.*hf.chat_template"):
        prepared("sft", CONVERSATIONS, path, tok)
    path.write_text(json.dumps({"prompt": "What is 3 plus 4?", "completion": " 7"}) + "\n")
    row = prepared("sft", CONVERSATIONS, path, tok).dataset[0]
    assert tok.decode(row["input_ids"]) == "What is 3 plus 4? 7<|endoftext|>"
