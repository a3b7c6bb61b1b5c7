import os

import pytest

from models import ASSISTANT, BOS, EOS, PAD, SYSTEM, USER, Tokenizer, render_chat, train_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A tokenizer turns text into integers and back again.",
    "Hello world! Hello tokenizer! Hello again, world.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 3.14159 appear in text too.",
] * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CORPUS, vocab_size=400)


def test_special_token_ids(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert [tok.token_id(t) for t in (SYSTEM, USER, ASSISTANT)] == [3, 4, 5]
    assert 300 < tok.vocab_size <= 400
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.token_id("<|nope|>")


def test_learned_merges_compress(tok):
    text = "Hello world! The quick brown fox."
    assert len(tok.encode(text)) < len(text.encode()) / 2


@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        " leading space",
        "naïve café, 日本語のテキスト, emoji 🦙🚀",
        "tabs\tand\nnewlines\r\n",
        "",
    ],
)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_no_special_tokens_added_or_injected(tok):
    ids = tok.encode("hi <|eos|> there")
    assert ids[0] != tok.bos_id and tok.eos_id not in ids  # literal text stays text
    assert tok.decode(ids) == "hi <|eos|> there"
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id]) == "hi"
    assert tok.decode([tok.bos_id, *tok.encode("hi")], skip_special_tokens=False) == BOS + "hi"


def test_encode_batch(tok):
    texts = ["one text", "another, longer text 🦙"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_save_load(tok, tmp_path):
    path = tok.save(str(tmp_path / "tokenizer.json"))
    assert os.path.basename(path) == "tokenizer.json" and os.listdir(tmp_path) == ["tokenizer.json"]
    loaded = Tokenizer.load(path)
    assert Tokenizer.load(str(tmp_path)).encode("dir works") == tok.encode("dir works")
    for text in CORPUS[:5] + ["unseen ✓ text <|eos|>"]:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.vocab_size == tok.vocab_size


def test_load_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="nope.json"):
        Tokenizer.load(missing)
    corrupt = tmp_path / "tokenizer.json"
    corrupt.write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=str(corrupt)):
        Tokenizer.load(str(corrupt))


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="256 byte symbols"):
        train_tokenizer(CORPUS, vocab_size=100)


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "It is 6."},
]


def test_render_chat_layout_and_mask(tok):
    ids, mask = render_chat(tok, MESSAGES)
    assert len(ids) == len(mask)
    assert ids[0] == tok.bos_id and mask[0] == 0
    expected = BOS + "".join(f"<|{m['role']}|>{m['content']}{EOS}" for m in MESSAGES)
    assert tok.decode(ids, skip_special_tokens=False) == expected
    # Masked tokens are exactly the assistant contents, each followed by its EOS.
    masked = [i for i, m in zip(ids, mask) if m]
    assert masked == tok.encode("4") + [tok.eos_id] + tok.encode("It is 6.") + [tok.eos_id]
    assert tok.decode(masked, skip_special_tokens=False) == f"4{EOS}It is 6.{EOS}"
    # Role markers are never learned.
    assert all(m == 0 for i, m in zip(ids, mask) if i == tok.token_id(ASSISTANT))
    assert mask[-1] == 1 and ids[-1] == tok.eos_id


def test_render_chat_generation_prompt(tok):
    ids, mask = render_chat(tok, MESSAGES[:2])
    gen_ids, gen_mask = render_chat(tok, MESSAGES[:2], add_generation_prompt=True)
    assert gen_ids == ids + [tok.token_id(ASSISTANT)]
    assert gen_mask == mask + [0]
    assert sum(gen_mask) == 0
    assert tok.decode(gen_ids, skip_special_tokens=False).endswith(f"What is 2+2?{EOS}{ASSISTANT}")


@pytest.mark.parametrize(
    "messages, error",
    [
        (
            [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}],
            r"messages\[1\]\['role'\] is 'bot'",
        ),
        ([{"role": "user"}], r"messages\[0\] is missing 'content'"),
        ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\] is missing 'role'"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\['content'\] must be a str"),
        (["hello"], r"messages\[0\] must be a dict"),
        ("hello", "must be a list"),
    ],
)
def test_render_chat_validation(tok, messages, error):
    with pytest.raises(ValueError, match=error):
        render_chat(tok, messages)


def test_special_token_constants():
    assert (PAD, BOS, EOS) == ("<|pad|>", "<|bos|>", "<|eos|>")
    assert (SYSTEM, USER, ASSISTANT) == ("<|system|>", "<|user|>", "<|assistant|>")
