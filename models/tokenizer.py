"""Byte-level BPE tokenizer and the single chat template shared by every stage."""

import os
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, pre_tokenizers

from .files import atomic_write

PAD = "<|pad|>"
BOS = "<|bos|>"
EOS = "<|eos|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
# Order fixes the ids: pad=0, bos=1, eos=2, then the role markers.
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT]
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

TOKENIZER_NAME = "tokenizer.json"


def _resolve(path: str) -> str:
    """A directory means the tokenizer.json inside it (checkpoints keep it next to the model)."""
    return os.path.join(path, TOKENIZER_NAME) if os.path.isdir(path) else path


class Tokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer):
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        # Text that merely spells "<|eos|>" (e.g. in user content) must encode as plain
        # text; only render_chat may insert real special tokens.
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        # int() so tensors and numpy arrays work too.
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    @property
    def pad_id(self) -> int:
        return self.token_id(PAD)

    @property
    def bos_id(self) -> int:
        return self.token_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.token_id(EOS)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def save(self, path: str) -> str:
        """Write tokenizer.json atomically to `path` (a file, or a directory to put it in)."""
        path = _resolve(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return atomic_write(path, self._tok.save)

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        path = os.path.abspath(_resolve(path))
        try:
            return cls(tokenizers.Tokenizer.from_file(path))
        except Exception as e:
            raise ValueError(f"cannot load tokenizer {path}: {e}") from e


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE: every byte is in the base alphabet, so any text round-trips."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size {vocab_size} is below the {len(alphabet)} byte symbols "
            f"+ {len(SPECIAL_TOKENS)} special tokens"
        )
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


def _check_messages(messages: Sequence[dict]) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        for field in ("role", "content"):
            if field not in m:
                raise ValueError(f"messages[{i}] is missing '{field}'")
        if m["role"] not in ROLE_TOKENS:
            raise ValueError(f"messages[{i}]['role'] is {m['role']!r}; expected one of {list(ROLE_TOKENS)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}]['content'] must be a str, got {type(m['content']).__name__}")


def render_chat(
    tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids and an equally long assistant mask (1 = written by the assistant).

    Format: <|bos|> then per message <|role|> content <|eos|>. The mask covers the
    assistant's content and its <|eos|> (so the model learns to stop), never the role
    marker. Each content is encoded on its own so mask boundaries are exact.
    """
    _check_messages(messages)
    ids, mask = [tokenizer.bos_id], [0]
    for m in messages:
        content = tokenizer.encode(m["content"])
        learn = int(m["role"] == "assistant")
        ids += [tokenizer.token_id(ROLE_TOKENS[m["role"]]), *content, tokenizer.eos_id]
        mask += [0] + [learn] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(tokenizer.token_id(ASSISTANT))
        mask.append(0)
    return ids, mask
