"""What alignflow trains on with templates that behave as real checkpoints' do
(tests/template_fixtures.py): each reply as the model generates it, one example per reply where
a conversation cannot hold them all, nothing after the end-of-turn token, merged first tokens,
refusals that name the turn and the way forward, and every stop token honoured."""
import json

import pytest
import torch
from transformers import AutoTokenizer

import template_fixtures as T
from hf_fixtures import build_tokenizer
from alignflow.models import ChatTemplateError, generate_text, load_tokenizer, prompt_ids, render_examples, stop_ids
from alignflow.models.chat import rendering
from alignflow.stages import data as data_mod
from alignflow.stages.formats import CONVERSATIONS, PAIRS
from alignflow.stages.settings import DataConfig, DemoConfig

THOUGHT_1, THOUGHT_2 = "<think>\nadd them\n</think>\n\n7.", "<think>\ntwo twos\n</think>\n\n4."
TURNS = [{"role": "user", "content": "3+4?"}, {"role": "assistant", "content": THOUGHT_1},
         {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": THOUGHT_2}]
SYSTEM = [{"role": "system", "content": "Be brief."}]


def tokenizer(family: str, template: str, extra: tuple[str, ...] = (), stops: tuple[str, ...] = ()):
    tok = build_tokenizer(family)
    tok.add_tokens(list(extra), special_tokens=True)
    tok.chat_template = template
    tok.generation_eos_token_ids = tok.convert_tokens_to_ids(list(stops))  # as generation_config.json gives them
    return tok


def gpt_oss():
    return tokenizer("chatml", T.GPT_OSS_LIKE, tuple(T.GPT_OSS_TOKENS), ("<|return|>", "<|call|>"))


def decoded(tok, examples) -> list[tuple[str, str]]:
    """Each example as (the text it is not trained on, the text it is), both whole: training
    spans are contiguous and come last in an example of their own."""
    out = []
    for ids, mask in examples:
        out.append((tok.decode([i for i, m in zip(ids, mask) if not m]), tok.decode([i for i, m in zip(ids, mask) if m])))
    return out


CTX_1 = "<|im_start|>user\n3+4?<|im_end|>\n<|im_start|>assistant\n"
# Written out by hand: per case the examples as (context, trained text).
CASES = {
    # Qwen3: the earlier reply loses its <think> block once a later turn follows.
    "qwen3": (lambda: tokenizer("chatml", T.QWEN3_LIKE), TURNS, [
        (CTX_1, THOUGHT_1 + "<|im_end|>"),
        (CTX_1 + "7.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", THOUGHT_2 + "<|im_end|>")]),
    # gpt-oss: the earlier reply ends <|end|>, the last <|return|>.
    "gpt-oss": (gpt_oss, TURNS, [
        ("<|start|>user<|message|>3+4?<|end|><|start|>assistant",
         "<|channel|>final<|message|>" + THOUGHT_1 + "<|return|>"),
        ("<|start|>user<|message|>3+4?<|end|><|start|>assistant<|channel|>final<|message|>" + THOUGHT_1 +
         "<|end|><|start|>user<|message|>2+2?<|end|><|start|>assistant",
         "<|channel|>final<|message|>" + THOUGHT_2 + "<|return|>")]),
    # Phi-3.5: <|endoftext|> after the last message only; never trained on.
    "phi-3.5": (lambda: tokenizer("neox", T.PHI35_LIKE, stops=("<|end|>", "<|endoftext|>")), TURNS, [
        ("<|user|>\n3+4?<|end|>\n<|assistant|>\n", THOUGHT_1 + "<|end|>"),
        ("<|user|>\n3+4?<|end|>\n<|assistant|>\n" + THOUGHT_1 + "<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n",
         THOUGHT_2 + "<|end|>")]),
    "phi-3.5 one turn": (lambda: tokenizer("neox", T.PHI35_LIKE, stops=("<|end|>", "<|endoftext|>")), TURNS[:2], [
        ("<|user|>\n3+4?<|end|>\n<|assistant|>\n\n<|endoftext|>", THOUGHT_1 + "<|end|>")]),
    # Mistral: the system prompt goes into the last user turn, so it moves as turns are added.
    "mistral": (lambda: tokenizer("chatml", T.MISTRAL_LIKE), SYSTEM + TURNS, [
        ("<|endoftext|>[INST] Be brief.\n\n3+4? [/INST]", THOUGHT_1 + "<|im_end|>"),
        ("<|endoftext|>[INST] 3+4? [/INST]" + THOUGHT_1 + "<|im_end|>[INST] Be brief.\n\n2+2? [/INST]",
         THOUGHT_2 + "<|im_end|>")]),
    # A training template for an R1-like checkpoint keeps the reasoning: one example, both replies.
    "r1 training template": (lambda: tokenizer("chatml", T.R1_TRAINING), TURNS, [
        (CTX_1 + "\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n\n",
         THOUGHT_1 + "<|im_end|>" + THOUGHT_2 + "<|im_end|>")]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_reply_trains_in_the_context_the_model_sees_at_inference(case):
    make, messages, expected = CASES[case]
    tok = make()
    with rendering() as how:
        examples = render_examples(tok, messages)
    assert decoded(tok, examples) == expected
    assert bool(how.expanded) == (len(expected) > 1)
    for (ids, mask), i in zip(examples, [i for i, m in enumerate(messages) if m["role"] == "assistant"]):
        # The context is exactly the prompt generation continues (apply_chat_template's ids).
        context = prompt_ids(tok, messages[:i])
        assert ids[:len(context)] == context and not any(mask[:len(context)])


def test_a_reply_starting_with_a_newline_trains_as_prompt_tokens_and_its_own_tokens():
    tok = build_tokenizer("chatml")  # ChatML: the header's "\n" and the reply's merge into one "\n\n" token
    messages = [TURNS[0], {"role": "assistant", "content": "\n7."}]
    whole = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    with rendering() as how:
        [(ids, mask)] = render_examples(tok, messages)
    context = prompt_ids(tok, messages[:1])
    assert whole[:len(context)] != context  # why it is a case at all
    reply = tok("\n7.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids == context + reply and mask == [0] * len(context) + [1] * len(reply)
    assert how.merged == 1 and not how.expanded


def test_the_manifest_counts_merged_replies(tmp_path):
    from alignflow.stages.loaders import StageData

    tok = build_tokenizer("chatml")
    newline = [TURNS[0], {"role": "assistant", "content": "\n7."}]
    path = write_rows(tmp_path / "chat.jsonl", [{"messages": newline}] * 2 + [{"messages": TURNS[:2]}])
    loaded = prepared("sft", CONVERSATIONS, path, tok)
    notes = StageData(CONVERSATIONS, loaded, loaded).notes()["train"]
    assert notes["replies_merged"] == 2 and "conversations_expanded" not in notes


@pytest.mark.parametrize("mode, replies", [("last", [THOUGHT_2]), ("expand", [THOUGHT_1, THOUGHT_2])])
def test_multi_turn_last_and_expand(mode, replies):
    for tok in (build_tokenizer("llama3"), tokenizer("chatml", T.QWEN3_LIKE)):  # prefix-stable, and not
        with rendering(mode):
            examples = render_examples(tok, TURNS)
        learned = [text for _, text in decoded(tok, examples)]
        assert [text.split("<|")[0].strip() for text in learned] == [r.strip() for r in replies]


def test_multi_turn_refuse_names_the_turn_and_the_settings():
    with rendering("refuse"), pytest.raises(ChatTemplateError, match=r"message 1 \(assistant\): the template renders "
                                                                      r"an earlier reply differently.*data.multi_turn"):
        render_examples(tokenizer("chatml", T.QWEN3_LIKE), TURNS)
    with rendering("refuse"):  # a prefix-stable template is one example under any setting
        assert len(render_examples(build_tokenizer("llama3"), TURNS)) == 1


@pytest.mark.parametrize("template, messages, error", [
    (T.R1_LIKE, TURNS[:2], r"message 1 \(assistant\): the chat template's generation prompt ends with '<think>\\n', "
                           r"which its rendering of the reply does not write.*hf.chat_template.*chat-templates.md"),
    (T.R1_FIRST_LIKE, TURNS[:2], r"message 1 \(assistant\): the chat template drops part of the reply.*"
                                 r"hf.chat_template.*chat-templates.md"),
    (T.GEMMA_LIKE, SYSTEM + TURNS[:2], r"refuses message 0 \(system\): System role not supported; fold the system "
                                       r"message into the first user message"),
    (T.GEMMA_LIKE, [TURNS[0], TURNS[2], TURNS[3]], r"refuses message 1 \(user after user\).*merge consecutive"),
    (T.GEMMA_LIKE, TURNS[:2] + [TURNS[3]], r"refuses message 2 \(assistant after assistant\).*merge consecutive"),
    (T.GEMMA_LIKE.replace("System role not supported", "no"), TURNS[:2] + SYSTEM,
     r"refuses message 2 \(system\): no; set hf.chat_template to a training template"),
])
def test_refusals_name_the_turn_the_cause_and_the_way_forward(template, messages, error):
    with pytest.raises(ChatTemplateError, match=error):
        render_examples(tokenizer("chatml", template), messages)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepared(stage, kind, path, tok, **cfg):
    return data_mod.prepare(stage, kind, DataConfig(source=str(path), val_fraction=0.0, **cfg), DemoConfig(), tok,
                            "train")


def test_refused_rows_are_named_or_skipped_and_counted(tmp_path):
    tok = tokenizer("chatml", T.R1_FIRST_LIKE)
    rows = [{"messages": TURNS[:2]}, {"messages": [TURNS[0], {"role": "assistant", "content": "7."}]}] * 3
    path = write_rows(tmp_path / "r1.jsonl", rows)
    with pytest.raises(data_mod.DataError, match=r"r1.jsonl: row 0 \(line 1\): message 1 \(assistant\): the chat "
                                                 r"template drops part of the reply"):
        prepared("sft", CONVERSATIONS, path, tok)
    loaded = prepared("sft", CONVERSATIONS, path, tok, on_bad_rows="skip")
    assert (len(loaded.dataset), loaded.skipped, loaded.rendered.refused) == (3, 3, 3)
    assert all(tok.decode([t for t in r if t != -100]) == "7.<|im_end|>" for r in loaded.dataset["labels"])


def test_expanded_examples_keep_their_file_row_for_errors_and_are_counted(tmp_path, caplog):
    tok = tokenizer("chatml", T.QWEN3_LIKE)
    long_reply = {"role": "assistant", "content": "8 " * 100}
    rows = [{"messages": TURNS}, {"messages": TURNS[:2]}, {"messages": TURNS[:3] + [long_reply]}]
    path = write_rows(tmp_path / "chat.jsonl", rows)
    with pytest.raises(data_mod.DataError, match=r"chat.jsonl: row 2 \(line 3\) is \d+ tokens, over data.max_length"):
        prepared("sft", CONVERSATIONS, path, tok, too_long="error")
    with caplog.at_level("INFO", logger="alignflow"):
        loaded = prepared("sft", CONVERSATIONS, path, tok)
    assert len(loaded.dataset) == 4 and loaded.dropped_too_long == 1  # 2 + 1 + (1 kept, 1 too long)
    why = "the template renders an earlier reply differently once later turns follow"
    assert loaded.rendered.expanded == {why: 2}
    assert f"chat.jsonl: 2 conversations trained as one example per reply: {why} (data.multi_turn)" in caplog.text


def test_a_pair_identical_once_templated_is_refused(tmp_path):
    tok = build_tokenizer("llama3")  # its template trims each message
    rows = [{"prompt": [TURNS[0]], "chosen": [{"role": "assistant", "content": "7."}],
             "rejected": [{"role": "assistant", "content": " 7.\n"}]},
            {"prompt": [TURNS[0]], "chosen": [{"role": "assistant", "content": "7."}],
             "rejected": [{"role": "assistant", "content": "8."}]}]
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(data_mod.DataError, match=r"pairs.jsonl: row 0 \(line 1\): column 'rejected' is identical to "
                                                 r"chosen once rendered and tokenised"):
        prepared("dpo", PAIRS, path, tok)
    loaded = prepared("dpo", PAIRS, path, tok, on_bad_rows="skip")
    assert (len(loaded.dataset), loaded.skipped) == (1, 1)


@pytest.mark.parametrize("make, stops", [
    (lambda: tokenizer("neox", T.PHI35_LIKE, stops=("<|end|>", "<|endoftext|>")), ["<|endoftext|>", "<|end|>"]),
    (gpt_oss, ["<|im_end|>", "<|return|>", "<|call|>"]),
    (lambda: tokenizer("llama3", build_tokenizer("llama3").chat_template, stops=("<|eot_id|>", "<|end_of_text|>")),
     ["<|eot_id|>", "<|end_of_text|>"]),
])
def test_generation_stops_at_every_stop_token(make, stops):
    tok = make()
    assert tok.convert_ids_to_tokens(stop_ids(tok)) == stops
    word = tok("7", add_special_tokens=False)["input_ids"]
    for stop in stop_ids(tok):
        def sample(model, ids, max_new_tokens, **kwargs):  # a model that says "7", then the stop, then more
            assert set(kwargs["eos_token_id"]) == set(stop_ids(tok))
            more = word + [stop] + word * 3
            return torch.cat([ids, torch.tensor([more] * len(ids))], dim=1)

        model = torch.nn.Linear(1, 1)
        out = generate_text(model, tok, [prompt_ids(tok, TURNS[:1])], max_new_tokens=8, sample=sample)
        assert out.ended.all() and out.completion_mask.sum().item() == len(word) + 1 and out.texts == ["7"]


@pytest.mark.parametrize("family, template, system", [("chatml", T.QWEN3_LIKE, []), ("neox", T.PHI35_LIKE, []),
                                                     ("chatml", T.MISTRAL_LIKE, SYSTEM)])
def test_a_stage_saves_a_tokenizer_that_renders_the_last_turns_context(family, template, system, hf_model_dir,
                                                                        tmp_path, small_config):
    """SFT of a model through a template of another behaviour (hf.chat_template): multi-turn rows
    are expanded, recorded in the manifest, and the saved tokenizer renders the last turn's
    context exactly as trained."""
    from alignflow.stages import handoff
    from alignflow.stages.run import train_stage
    from test_hf_pipeline import FAST

    path = tmp_path / "template.jinja"
    path.write_text(template)
    turns = system + TURNS
    rows = write_rows(tmp_path / "chat.jsonl", [{"messages": turns}] * 6 + [{"messages": system + TURNS[:2]}] * 2)
    base = hf_model_dir(family)
    config = small_config(**{**FAST, "sft.data.source": str(rows), "sft.data.val_fraction": 0.0,
                             "sft.train.max_steps": 2, "sft.train.batch_size": 2, "hf.chat_template": str(path),
                             "sft.data.max_length": 200},
                          model=str(base), start="sft", runs_dir=str(tmp_path))
    train_stage("sft", config, base, tmp_path / "sft")
    notes = handoff.verify(tmp_path / "sft")["data"]["train"]
    why = "the template renders an earlier reply differently once later turns follow"
    assert notes["conversations_expanded"] == {why: 6} and notes["rows"] == 14, notes
    saved = AutoTokenizer.from_pretrained(tmp_path / "sft")
    trained_with = load_tokenizer(str(base), chat_template=template)
    (ids, mask) = render_examples(trained_with, turns)[-1]
    assert saved.apply_chat_template(turns[:-1], add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"] == ids[:mask.index(1)]
