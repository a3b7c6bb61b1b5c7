"""Tiny random-weight Hugging Face causal LMs, built offline, for "bring your own HF model" tests.

Three families whose conventions differ the way real checkpoints do, so code that handles one
by accident does not pass for all:

- "llama3": LlamaForCausalLM, untied, GQA. BOS `<|begin_of_text|>` (in the template, and added
  by the tokenizer's post-processor, as Llama 3's is), eos = end of turn `<|eot_id|>`, NO pad token.
- "chatml": Qwen2ForCausalLM, tied, q/k/v bias. No BOS, eos `<|im_end|>`, pad `<|endoftext|>`,
  a default system message, and more embedding rows than tokens (vocab rounded up to 64).
- "neox": GPTNeoXForCausalLM, untied, partial rotary. No BOS, Phi-3-like template whose end of
  turn `<|end|>` is not eos `<|endoftext|>` (id 0, as in GPT-NeoX), pad == eos, and a
  generation_config listing both as stop tokens.

`build_model_dir(family, path)` writes model + tokenizer + generation_config with
`save_pretrained`; load them back with the Auto classes.
"""
from __future__ import annotations

import functools
import pathlib

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (GenerationConfig, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

FAMILIES = ("llama3", "chatml", "neox")
BPE_VOCAB = 512  # byte alphabet (256) + merges; special tokens come on top

# The real pre-tokenizer patterns. Both keep "\n\n" one piece (`\s*[\r\n]+`), so a prompt ending
# in "\n\n" (or "\n") tokenises to a prefix of prompt + reply.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Chat templates as the real models ship them (trimmed to what these tests need).
LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (  # Qwen2.5's, without tool calls
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NEOX_TEMPLATE = (  # Phi-3 / Zephyr style: role tags, and an end-of-turn token that is not eos
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Per family: special tokens (id order), the named ones, end of turn, template.
SPECS = {
    "llama3": dict(
        special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, end_of_turn="<|eot_id|>", template=LLAMA3_TEMPLATE),
    "chatml": dict(
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", end_of_turn="<|im_end|>", template=CHATML_TEMPLATE),
    "neox": dict(
        special=["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        bos=None, eos="<|endoftext|>", pad="<|endoftext|>", end_of_turn="<|end|>", template=NEOX_TEMPLATE),
}


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """The project's own demo texts (seeded, so every build trains the same BPE) plus role words."""
    from alignflow.stages import demo
    from alignflow.stages.settings import DemoConfig

    def contents(value) -> list[str]:  # SFT fields are plain strings or conversational message lists
        return [value] if isinstance(value, str) else [message["content"] for message in value]

    texts = [row["text"] for row in demo.demo_rows("pretrain", demo.documents, "train", DemoConfig())]
    for row in demo.demo_rows("sft", demo.solutions, "train", DemoConfig()):
        texts += contents(row["prompt"]) + contents(row["completion"])
    # Paragraph breaks, so BPE learns "\n\n" (one token after the chat headers of Llama 3)
    texts += ["\n\n".join(texts[i:i + 4]) for i in range(0, 400, 4)]
    # Roles appear right after a special token (no leading space) and inside text (with one).
    roles = ["system", "user", "assistant", "model"]
    texts += roles + [" ".join(roles), "You are a helpful assistant."]
    return tuple(texts)


def _pre_tokenizer(family: str):
    if family == "neox":  # GPT-2 / GPT-NeoX: the byte-level pre-tokenizer's own regex
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pattern = LLAMA3_SPLIT if family == "llama3" else QWEN2_SPLIT
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def build_tokenizer(family: str) -> PreTrainedTokenizerFast:
    spec = SPECS[family]
    tok = Tokenizer(models.BPE())
    if family == "chatml":  # as Qwen2's tokenizer.json (and transformers' Qwen2Tokenizer rebuilds it so on load)
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(family)
    tok.decoder = decoders.ByteLevel()  # bytes back to text: decode(encode(s)) == s
    # GPT-NeoX has <|endoftext|> at id 0; Llama 3 and Qwen2 put their special tokens after the BPE vocab.
    first = ["<|endoftext|>"] if family == "neox" else []
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB + len(first), special_tokens=first, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens([t for t in spec["special"] if t not in first])
    if spec["bos"]:  # Llama 3's tokenizer prepends BOS itself when add_special_tokens=True
        bos_id = tok.token_to_id(spec["bos"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec['bos']} $A", pair=f"{spec['bos']} $A {spec['bos']} $B", special_tokens=[(spec["bos"], bos_id)])
    named = {spec["bos"], spec["eos"], spec["pad"]}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"], pad_token=spec["pad"],
        extra_special_tokens=[t for t in spec["special"] if t not in named],  # transformers 5 name
        chat_template=spec["template"], clean_up_tokenization_spaces=False, model_max_length=256)


def _model(family: str, tok: PreTrainedTokenizerFast, hidden_size: int = 32):
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    size = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, dtype="float32", **ids)
    if family == "llama3":
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), num_key_value_heads=2, tie_word_embeddings=False,
                                            **size))
    if family == "chatml":  # Qwen pads the embedding past the tokenizer: spare rows the tokenizer never emits
        vocab = -(-len(tok) // 64) * 64
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, num_key_value_heads=2, tie_word_embeddings=True,
                                            **size))
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tok), rotary_pct=0.5, tie_word_embeddings=False, **size))


def build_model_dir(family: str, path, seed: int = 0, hidden_size: int = 32) -> pathlib.Path:
    """Write a tiny seeded model, its tokenizer and generation_config to `path` (created if needed).
    `hidden_size` 64 or more for 4-bit tests (bitsandbytes quantizes blocks of 64)."""
    path = pathlib.Path(path)
    tok = build_tokenizer(family)
    torch.manual_seed(seed)
    model = _model(family, tok, hidden_size).float().eval()
    # Instruct checkpoints stop on every end token: Llama 3 on <|eot_id|> and <|end_of_text|>,
    # Phi-3 on <|end|> and <|endoftext|>. ChatML's eos is already its end of turn.
    stops = {"llama3": ["<|eot_id|>", "<|end_of_text|>"], "chatml": ["<|im_end|>"],
             "neox": ["<|end|>", "<|endoftext|>"]}[family]
    stop_ids = tok.convert_tokens_to_ids(stops)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                                               eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0])
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
