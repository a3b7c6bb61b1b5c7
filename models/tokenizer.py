"""Tokenizers: one type for every model, a Hugging Face fast tokenizer (`PreTrainedTokenizerFast`).

A Hugging Face model brings its own (`load_tokenizer`); the built-in model's is a byte-level
BPE trained here on the pretraining corpus (`train_tokenizer`) and given a chat template of its
own, so `AutoTokenizer.from_pretrained(stage_dir).apply_chat_template(messages)` gives exactly
the ids alignflow trained on."""

import json
import os
from collections.abc import Iterable

import tokenizers
from tokenizers import decoders, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .hf_io import needs_remote_code

PAD = "<|pad|>"
BOS = "<|bos|>"
EOS = "<|eos|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
# Order fixes the ids: pad=0, bos=1, eos=2, then the role markers.
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT]

# <|bos|>, then per message <|role|> content <|eos|>; a prompt ends with <|assistant|>. The
# assistant's content and its <|eos|> are what SFT learns (so the model learns to stop); the
# generation tags mark them for Hugging Face tools too (`return_assistant_tokens_mask`).
BUILTIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

Tokenizer = PreTrainedTokenizerFast
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # a directory with neither has no tokenizer


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
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT], chat_template=BUILTIN_CHAT_TEMPLATE,
        # Decoding must give the text back as it was, not "3 ." tidied into "3.".
        clean_up_tokenization_spaces=False)


def require_tokenizer_files(directory: str) -> None:
    """Refuse a model directory without tokenizer files, saying so: transformers, finding none,
    asks for sentencepiece or tiktoken, which would not help."""
    if not any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES):
        raise ValueError(f"{directory} has no tokenizer (no {' or '.join(TOKENIZER_FILES)}): copy the tokenizer "
                         "files of the model it came from into it")


def load_tokenizer(directory: str, chat_template: str | None = None, trust_remote_code: bool = False) -> Tokenizer:
    """The fast tokenizer saved in `directory`; `chat_template` (Jinja text) replaces its own.
    The stop tokens of the directory's generation_config.json ride along as
    `generation_eos_token_ids` (`models.chat.stop_ids`)."""
    directory = os.path.abspath(directory)
    require_tokenizer_files(directory)
    if needs_remote_code(directory, "tokenizer_config.json") and not trust_remote_code:
        raise ValueError(f"the tokenizer in {directory} needs code from its repository (auto_map in "
                         "tokenizer_config.json); set hf.trust_remote_code: true if you trust it")
    try:
        tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types; the user needs the directory
        if not os.path.isfile(os.path.join(directory, "tokenizer.json")) and "sentencepiece" in str(e):
            # It asks for a converter package; what is really missing is the fast tokenizer's file.
            raise ValueError(f"{directory} has no tokenizer.json, and transformers cannot build the fast tokenizer "
                             "alignflow needs from its other tokenizer files: copy tokenizer.json of the model it "
                             "came from into it") from e
        raise ValueError(f"cannot load a tokenizer from {directory}: {e}") from e
    # How this process happened to load it (offline or not) is no property of the tokenizer, and
    # would make the tokenizer_config.json a stage writes, and so its content hash, vary.
    for how in ("local_files_only", "is_local"):
        tok.init_kwargs.pop(how, None)
    if not tok.is_fast:
        raise ValueError(f"{directory}: the tokenizer is a slow (Python) one; alignflow needs a fast tokenizer "
                         "(a tokenizer.json)")
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.generation_eos_token_ids = generation_eos_token_ids(directory)
    return tok


def generation_eos_token_ids(directory: str) -> list[int]:
    """generation_config.json's `eos_token_id` (an int or a list: instruct checkpoints stop on
    several tokens, e.g. Phi-3.5's <|end|> and <|endoftext|>); [] without the file."""
    try:
        with open(os.path.join(directory, "generation_config.json")) as f:
            eos = json.load(f).get("eos_token_id")
    except FileNotFoundError:
        return []
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{directory}/generation_config.json: cannot read its eos_token_id: {e}") from e
    ids = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
    return [i for i in ids if isinstance(i, int)]


def ensure_pad_token(tok: Tokenizer) -> bool:
    """Give `tok` a padding token that is not its EOS (a new special token when it has none):
    padding must never be confused with the end of a sequence. True when a token was added,
    so the model may need a bigger embedding (`models.fit_vocabulary`)."""
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        return False
    for candidate in ("<|finetune_right_pad_id|>", "<pad>", PAD):  # Llama-3 reserves the first
        if candidate in tok.get_vocab():
            tok.pad_token = candidate
            return False
    tok.add_special_tokens({"pad_token": PAD})
    return True
