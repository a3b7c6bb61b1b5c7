import pytest

from alignflow.models import ASSISTANT, BOS, EOS, PAD, SYSTEM, USER, load_tokenizer, prompt_ids, render_chat, train_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A tokenizer turns text into integers and back again.",
    "Hello world! Hello tokenizer! Hello again, world.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 3.14159 appear in text too.",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=400)


def test_special_token_ids(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids([SYSTEM, USER, ASSISTANT]) == [3, 4, 5]
    assert 300 < len(tok) <= 400


def test_learned_merges_compress(tok):
    text = "Hello world! The quick brown fox."
    assert len(tok.encode(text, add_special_tokens=False)) < len(text.encode()) / 2


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
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_no_special_tokens_added_and_decode_drops_them(tok):
    ids = tok("hi there")["input_ids"]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids  # the chat template adds them, not encode
    assert tok.decode([tok.bos_token_id, *ids, tok.eos_token_id], skip_special_tokens=True) == "hi there"
    assert tok.decode([tok.bos_token_id, *ids]) == BOS + "hi there"


def test_save_load_round_trip_with_its_chat_template(tok, tmp_path):
    tok.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    for text in CORPUS[:5] + ["unseen ✓ text"]:
        assert loaded.encode(text) == tok.encode(text)
    assert len(loaded) == len(tok) and loaded.chat_template == tok.chat_template
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == (PAD, BOS, EOS)
    # Saved again, it is the same bytes whether this process loaded it offline or not.
    loaded.save_pretrained(str(tmp_path / "again"))
    assert (tmp_path / "again" / "tokenizer_config.json").read_text() == (tmp_path / "tokenizer_config.json").read_text()


def test_load_errors_name_the_directory(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_tokenizer(str(tmp_path))


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
    assert ids[0] == tok.bos_token_id and mask[0] == 0
    expected = BOS + "".join(f"<|{m['role']}|>{m['content']}{EOS}" for m in MESSAGES)
    assert tok.decode(ids) == expected
    # What Hugging Face tools get from the template: the same ids, and the same assistant mask
    # from its {% generation %} tags as alignflow derives by rendering.
    hf = tok.apply_chat_template(MESSAGES, return_dict=True, return_assistant_tokens_mask=True)
    assert hf["input_ids"] == ids and hf["assistant_masks"] == mask
    # Masked tokens are exactly the assistant contents, each followed by its EOS.
    masked = [i for i, m in zip(ids, mask) if m]
    eos = tok.eos_token_id
    assert masked == tok.encode("4") + [eos] + tok.encode("It is 6.") + [eos]
    assert tok.decode(masked) == f"4{EOS}It is 6.{EOS}"
    # Role markers are never learned.
    assert all(m == 0 for i, m in zip(ids, mask) if i == tok.convert_tokens_to_ids(ASSISTANT))
    assert mask[-1] == 1 and ids[-1] == eos


def test_render_chat_learns_only_from_the_completion(tok):
    ids, mask = render_chat(tok, MESSAGES, learn_from=3)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == f"It is 6.{EOS}"


def test_prompt_ids_end_with_the_generation_prompt(tok):
    ids, mask = render_chat(tok, MESSAGES[:2])
    gen_ids = prompt_ids(tok, MESSAGES[:2])
    assert gen_ids == ids + [tok.convert_tokens_to_ids(ASSISTANT)]
    assert sum(mask) == 0
    assert tok.decode(gen_ids).endswith(f"What is 2+2?{EOS}{ASSISTANT}")


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
