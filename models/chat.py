"""Conversations to token ids through the tokenizer's own chat template, with the assistant's
tokens found robustly for any template.

Which tokens the assistant wrote is derived by rendering: for each assistant message, the
conversation before it with the generation prompt must tokenise to a prefix of the
conversation up to and including it; the tokens in between are the reply. That is the very
property generation relies on (a prompt is rendered with the generation prompt and the model
continues it), so a template without it fails here, naming the turn, instead of training on a
split the model never sees at inference. The span is cut after its last special token (the
end-of-turn token: `<|eot_id|>`, `<|im_end|>`, `<|end|>`, our `<|eos|>`): the model learns to
stop, not the separator a template writes between turns."""
from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered, or the template's turns do not split as tokens."""


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


def render(tok: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
    """The ids of `messages` rendered by the tokenizer's template, as `apply_chat_template` gives
    them (the template writes any BOS itself, so none is added)."""
    if not tok.chat_template:
        raise ChatTemplateError("the tokenizer has no chat template, and conversational data needs one; "
                                "set hf.chat_template to a Jinja template file")
    try:
        text = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # a template raises what it likes (e.g. "roles must alternate")
        raise ChatTemplateError(f"the chat template cannot render this conversation: {e}") from e
    return tok(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tok: Tokenizer, messages: Sequence[dict]) -> list[int]:
    """A prompt ready for the model to continue as the assistant."""
    check_messages(messages)
    return render(tok, messages, add_generation_prompt=True)


def _is_prefix(prefix: list[int], ids: list[int]) -> bool:
    return len(prefix) <= len(ids) and ids[: len(prefix)] == prefix


def _through_end_of_turn(ids: list[int], start: int, end: int, specials: set[int]) -> int:
    """`end`, pulled back to just after the last special token in ids[start:end] (if any)."""
    for i in range(end - 1, start - 1, -1):
        if ids[i] in specials:
            return i + 1
    return end


def render_chat(tok: Tokenizer, messages: Sequence[dict], learn_from: int = 0) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and an equally long mask, 1 on each assistant reply (from
    message `learn_from` on: the completion, not a prompt's earlier turns) and its end-of-turn
    token: what SFT learns, the completion DPO scores."""
    check_messages(messages)
    ids = render(tok, messages)
    mask = [0] * len(ids)
    specials = set(tok.all_special_ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < learn_from:
            continue
        before = render(tok, messages[:i], add_generation_prompt=True)
        upto = render(tok, messages[: i + 1])
        if not (_is_prefix(before, upto) and _is_prefix(upto, ids)):
            raise ChatTemplateError(
                f"the chat template does not render message {i} (assistant) as a continuation of the "
                "conversation before it: the prompt rendered with add_generation_prompt=True is not a token "
                "prefix of the prompt plus the reply, so the model would train on a split it never sees when "
                "generating")
        for j in range(len(before), _through_end_of_turn(ids, len(before), len(upto), specials)):
            mask[j] = 1
    return ids, mask


def stop_ids(tok) -> list[int]:
    """Tokens that end a reply: EOS and the template's end-of-turn token when that differs
    (Llama-3's <|eot_id|>, ChatML's <|im_end|>, Phi-3's <|end|>), found by rendering a reply."""
    stops = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if getattr(tok, "chat_template", None):
        try:
            ids, mask = render_chat(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
        except ChatTemplateError:
            return stops
        reply = [t for t, m in zip(ids, mask) if m]
        if reply and reply[-1] in set(tok.all_special_ids) and reply[-1] not in stops:
            stops.append(reply[-1])
    return stops
