"""Conversations to token ids through the tokenizer's own chat template: each assistant reply
trained exactly as the model will generate it.

A reply is found by rendering: the conversation before it with the generation prompt is its
*context* (what the model sees at inference), and the text the template writes after that
context, in the conversation up to and including the reply, is the *reply*. Its tokens are
learned from the start through its end-of-turn token (the first stop token after the reply's own
text: `<|eot_id|>`, `<|im_end|>`, `<|end|>`, our `<|eos|>`); whatever a template appends after
it (Phi-3.5's `\\n<|endoftext|>`) is not. What real templates do, and what happens with each
(docs/chat-templates.md):

- Prefix-stable templates (most): every reply's context + reply is a prefix of the whole
  conversation, which is then one example with each reply masked in.
- Templates that render an earlier turn differently once later turns follow (Qwen3 drops its
  `<think>` block, gpt-oss changes its terminator, Mistral moves the system prompt to the last
  user turn): one conversation cannot hold every reply as it is seen at inference, so each reply
  becomes an example of its own, context + reply (`data.multi_turn`: auto, expand, last, refuse).
- A reply whose first token merges with the generation prompt (a ChatML reply starting with
  "\\n"): context tokens + the reply's own tokens, what generation produces; counted.
- A template that drops part of a reply (DeepSeek-R1's reasoning) or does not continue its own
  generation prompt with the reply (R1's `<think>\\n`): refused, naming the turn and the way
  forward, a training template in `hf.chat_template`.

What rendering chose for a row is noted on the active `rendering()` context, which the data
pipeline opens per row to count and log it."""
from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
MULTI_TURN = ("auto", "expand", "last", "refuse")
GUIDE = "docs/chat-templates.md"
TRAINING_TEMPLATE = f"set hf.chat_template to a training template that renders every reply in full ({GUIDE})"


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered, or not trained as the model would generate it."""


@dataclass
class Rendering:
    """How conversations are rendered (`multi_turn`, data.multi_turn), and what rendering one
    row chose, read back by the data pipeline."""
    multi_turn: str = "auto"
    expanded: str = ""  # why the conversation became one example per reply ("": it did not)
    merged: int = 0     # replies whose first token merged with the generation prompt


_RENDERING: ContextVar[Rendering | None] = ContextVar("alignflow_rendering", default=None)


@contextmanager
def rendering(multi_turn: str = "auto") -> Iterator[Rendering]:
    """Render the conversations of one row under `multi_turn`; yields what that rendering chose."""
    if multi_turn not in MULTI_TURN:
        raise ValueError(f"multi_turn is {multi_turn!r}; expected one of {list(MULTI_TURN)}")
    token = _RENDERING.set(Rendering(multi_turn))
    try:
        yield _RENDERING.get()
    finally:
        _RENDERING.reset(token)


def check_messages(messages: Sequence[dict]) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        for field in ("role", "content"):
            if field not in m:
                raise ChatTemplateError(f"messages[{i}] is missing '{field}'")
        if m["role"] not in ROLES:
            raise ChatTemplateError(f"messages[{i}]['role'] is {m['role']!r}; expected one of {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise ChatTemplateError(f"messages[{i}]['content'] must be a str, got {type(m['content']).__name__}")


def _cannot_render(tok: Tokenizer, messages: Sequence[dict], error: Exception) -> str:
    """A template's own exception, with the message it is about (the first whose conversation up
    to it does not render) and the way forward when the cause is a common one."""
    said = str(error).strip() or type(error).__name__
    turn = next((k for k in range(1, len(messages)) if not _renders(tok, messages[:k + 1])), len(messages) - 1)
    roles = [m["role"] for m in messages]
    if turn > 0 and roles[turn] == roles[turn - 1]:
        return (f"the chat template refuses message {turn} ({roles[turn]} after {roles[turn]}): {said}; merge "
                "consecutive messages of one role into one")
    if "system" in roles and "system" in said.lower():
        return (f"the chat template refuses message {roles.index('system')} (system): {said}; fold the system "
                f"message into the first user message, or {TRAINING_TEMPLATE}")
    return f"the chat template refuses message {turn} ({roles[turn]}): {said}; {TRAINING_TEMPLATE}"


def _renders(tok: Tokenizer, messages: Sequence[dict]) -> bool:
    try:
        tok.apply_chat_template(list(messages), tokenize=False)
        return True
    except Exception:  # a template raises what it likes
        return False


def render_text(tok: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    if not tok.chat_template:
        raise ChatTemplateError("the tokenizer has no chat template, and conversational data needs one; "
                                "set hf.chat_template to a Jinja template file")
    try:
        return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # a template raises what it likes (e.g. "roles must alternate")
        raise ChatTemplateError(_cannot_render(tok, messages, e)) from e


def _ids(tok: Tokenizer, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]  # the template writes any BOS itself


def render(tok: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
    """The ids of `messages` rendered by the tokenizer's template, as `apply_chat_template` gives them."""
    return _ids(tok, render_text(tok, messages, add_generation_prompt))


def prompt_ids(tok: Tokenizer, messages: Sequence[dict]) -> list[int]:
    """A prompt ready for the model to continue as the assistant."""
    check_messages(messages)
    return render(tok, messages, add_generation_prompt=True)


def _common_prefix(a: str, b: str) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _content_end(reply_text: str, content: str) -> int | None:
    """Where the reply's own text ends in its rendering, whitespace aside (templates trim it);
    None when the rendering does not contain it: the template dropped part of the reply."""
    kept = [(i, c) for i, c in enumerate(reply_text) if not c.isspace()]
    squashed, wanted = "".join(c for _, c in kept), "".join(content.split())
    if not wanted:
        return 0
    at = squashed.rfind(wanted)
    return None if at < 0 else kept[at + len(wanted) - 1][0] + 1


def _first_token_after(tok: Tokenizer, text: str, start: int, wanted: set[int]) -> tuple[list[int], int | None]:
    """The ids of `text`, and the index of its first token in `wanted` starting at character
    `start` or later (None: there is none)."""
    encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    at = next((k for k, (t, (begin, _)) in enumerate(zip(ids, encoded["offset_mapping"]))
               if t in wanted and begin >= start), None)
    return ids, at


@dataclass
class _Turn:
    index: int        # the assistant message
    context: list[int]  # the conversation before it with the generation prompt: what the model sees
    reply: list[int]    # the reply's own tokens, through its end-of-turn token
    upto_text: str      # the conversation rendered up to and including it
    merged: bool        # context + reply is not how the rendered text tokenises


def _turn(tok: Tokenizer, messages: Sequence[dict], i: int, stops: set[int]) -> _Turn:
    context_text = render_text(tok, messages[:i], add_generation_prompt=True)
    upto_text = render_text(tok, messages[: i + 1])
    if not upto_text.startswith(context_text):
        unwritten = context_text[_common_prefix(context_text, upto_text):]
        what = (f"the chat template's generation prompt ends with {unwritten!r}, which its rendering of the reply "
                "does not write" if len(unwritten) <= 40 else
                f"the chat template renders the conversation before the reply differently once the reply follows "
                f"(from {unwritten[:24]!r} on)")
        raise ChatTemplateError(f"message {i} (assistant): {what}, so the model would learn a reply it never "
                                f"generates after that prompt; {TRAINING_TEMPLATE}")
    reply_text = upto_text[len(context_text):]
    end_char = _content_end(reply_text, messages[i]["content"])
    if end_char is None:
        raise ChatTemplateError(
            f"message {i} (assistant): the chat template drops part of the reply from its rendering (e.g. the "
            f"reasoning before </think>), which would be lost from training without a word; {TRAINING_TEMPLATE}")
    reply, end = _first_token_after(tok, reply_text, end_char, stops)
    context = _ids(tok, context_text)
    merged = _ids(tok, upto_text)[: len(context)] != context
    return _Turn(i, context, reply if end is None else reply[: end + 1], upto_text, merged)


def render_examples(tok: Tokenizer, messages: Sequence[dict], learn_from: int = 0
                    ) -> list[tuple[list[int], list[int]]]:
    """Training examples (ids, mask) of a conversation: the mask is 1 on each assistant reply
    from message `learn_from` on (the completion, not a prompt's earlier turns) through its
    end-of-turn token. One example when every reply sits in the whole conversation as it does at
    inference; otherwise one per reply (the active `rendering()`'s multi_turn decides)."""
    check_messages(messages)
    how = _RENDERING.get() or Rendering()
    learned = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= learn_from]
    if how.multi_turn == "last":
        learned = learned[-1:]
    stops = set(stop_ids(tok))
    turns = [_turn(tok, messages, i, stops) for i in learned]
    how.merged += sum(t.merged for t in turns)
    text = render_text(tok, messages)
    ids = _ids(tok, text)

    def in_place(t: _Turn) -> bool:  # context + reply is where it stands in the whole conversation
        n = len(t.context)
        return text.startswith(t.upto_text) and ids[:n] == t.context and ids[n:n + len(t.reply)] == t.reply

    if how.multi_turn != "expand" and all(in_place(t) for t in turns):
        mask = [0] * len(ids)
        for t in turns:
            mask[len(t.context):len(t.context) + len(t.reply)] = [1] * len(t.reply)
        return [(ids, mask)]
    if len(turns) > 1:
        moved = next((t for t in turns if not text.startswith(t.upto_text)), None)
        why = ("data.multi_turn is expand" if how.multi_turn == "expand" else
               "the template renders an earlier reply differently once later turns follow" if moved else
               "a reply's first token merges with the generation prompt")
        if how.multi_turn == "refuse":
            raise ChatTemplateError(
                f"message {(moved or turns[0]).index} (assistant): {why}, so one example cannot train every reply "
                "as the model sees it at inference; set data.multi_turn: expand (one example per reply) or last")
        how.expanded = why
    return [(t.context + t.reply, [0] * len(t.context) + [1] * len(t.reply)) for t in turns]


def render_chat(tok: Tokenizer, messages: Sequence[dict], learn_from: int = 0) -> tuple[list[int], list[int]]:
    """The one training example (ids, mask) of a conversation (`render_examples`); a conversation
    that must become several (one per reply) is a ChatTemplateError."""
    examples = render_examples(tok, messages, learn_from)
    if len(examples) > 1:
        raise ChatTemplateError(f"the chat template cannot train these {len(examples)} replies as one sequence "
                                "(it renders earlier turns differently); make the completion one assistant message, "
                                "with the earlier turns in the prompt")
    return examples[0]


def _special_ids(tok: Tokenizer) -> set[int]:
    return set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}


@functools.lru_cache(maxsize=32)
def _end_of_turn(tok: Tokenizer, template: str) -> int | None:
    """The first special token the template writes after a reply's text, found by rendering one
    (the generation prompt need not be a prefix of it: R1's is not)."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "42"}]
    try:
        context, upto = render_text(tok, messages[:1], add_generation_prompt=True), render_text(tok, messages)
    except ChatTemplateError:
        return None
    reply_text = upto[_common_prefix(context, upto):]
    end_char = _content_end(reply_text, "42")
    if end_char is None:
        return None
    ids, at = _first_token_after(tok, reply_text, end_char, _special_ids(tok))
    return None if at is None else ids[at]


def stop_ids(tok) -> list[int]:
    """Tokens that end a reply: the tokenizer's EOS, the template's end-of-turn token (Llama-3's
    <|eot_id|>, ChatML's <|im_end|>, Phi-3's <|end|>) and generation_config.json's
    `eos_token_id` (Llama-3.1's <|eom_id|>, gpt-oss's <|call|>: `load_tokenizer` keeps them as
    `generation_eos_token_ids`), in that order."""
    stops = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if getattr(tok, "chat_template", None):
        stops.append(_end_of_turn(tok, tok.chat_template))
    stops += getattr(tok, "generation_eos_token_ids", None) or []
    return list(dict.fromkeys(s for s in stops if s is not None))
