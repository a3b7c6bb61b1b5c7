"""The data kinds of the built-in algorithms, in TRL's formats, and the pieces another
algorithm's kind is built from (row checks, prompt/completion tokenisation).

    TEXT           `text`, cut into blocks of data.max_length tokens       pretraining
    CONVERSATIONS  `prompt` + `completion`, or `messages`                 SFT
    PAIRS          `prompt` + `chosen` + `rejected`                       DPO, SimPO, ORPO
    RANKED_PAIRS   PAIRS + an optional `margin`                           reward model (rm)
    FEEDBACK       `prompt` + `completion` + `label` (or PAIRS, unpaired)  KTO
    PROMPTS        `prompt` + any columns the reward functions read       GRPO
    EVAL_PROMPTS   `prompt` + `answer`                                    held-out evaluation

Prompts, completions and replies are strings or message lists. Conversational rows go through
the tokenizer's own chat template (models.chat), which learns each assistant reply through its
end-of-turn token; plain-text rows are tokenised as they are, as TRL does: the prompt with the
tokenizer's special tokens (e.g. BOS), the completion after it, then EOS."""
from __future__ import annotations

import datasets

from alignflow.models import Tokenizer, render_chat, render_examples
from alignflow.models import prompt_ids as chat_prompt_ids
from alignflow.models.chat import ROLES
from alignflow.trainers.dpo import collate_pairs
from alignflow.trainers.grpo import collate_prompts
from alignflow.trainers.kto import collate_feedback
from alignflow.trainers.reward import collate_ranked_pairs
from alignflow.trainers.sft import collate_causal_lm

from . import demo
from .data import DataKind, Problem, RowRefused

# ---- row checks: (column, what is wrong) or None ----


def message_list_problem(value) -> str | None:
    if not isinstance(value, list) or not value:
        return "must be a non-empty list of {role, content} messages"
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"message {j} must be {{role: system|user|assistant, content: str}}"
    return None


def text_or_messages_problem(value, allow_empty: bool = False) -> str | None:
    if isinstance(value, str):
        return None if (allow_empty or value.strip()) else "is empty"
    if not isinstance(value, list):
        return f"must be a string or a list of messages, got {type(value).__name__}"
    return message_list_problem(value)


def texts_problem(row: dict, columns: tuple[str, ...], allow_empty: str = "") -> Problem | None:
    """The first of `columns` that is not text or a message list (`allow_empty` may be "")."""
    return next(((c, p) for c in columns if (p := text_or_messages_problem(row[c], c == allow_empty))), None)


def _text_row_problem(row: dict) -> Problem | None:
    return None if isinstance(row["text"], str) and row["text"].strip() else ("text", "must be a non-empty string")


def _conversation_row_problem(row: dict) -> Problem | None:
    if "messages" in row and row["messages"] is not None:
        problem = message_list_problem(row["messages"])
        if not problem and not any(m["role"] == "assistant" and m["content"].strip() for m in row["messages"]):
            problem = "has no non-empty assistant message to learn from"
        return ("messages", problem) if problem else None
    return texts_problem(row, ("prompt", "completion"), allow_empty="prompt")


def _pair_row_problem(row: dict) -> Problem | None:
    problem = texts_problem(row, ("prompt", "chosen", "rejected"))
    if problem is None and row["chosen"] == row["rejected"]:
        problem = ("rejected", "is identical to chosen: the pair carries no preference")
    return problem


def _ranked_pair_row_problem(row: dict) -> Problem | None:
    margin = row.get("margin")
    if "margin" in row and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        return ("margin", f"must be a number (how much more chosen is preferred), got {margin!r}")
    return _pair_row_problem(row)


def _feedback_row_problem(row: dict) -> Problem | None:
    if "label" not in row:  # a pair file, unpaired once it is valid
        return _pair_row_problem(row)
    if not isinstance(row["label"], bool):
        return ("label", f"must be true (desirable) or false (undesirable), got {row['label']!r}")
    return texts_problem(row, ("prompt", "completion"))


def _prompt_row_problem(row: dict) -> Problem | None:
    return texts_problem(row, ("prompt",))


# ---- tokenisation ----

def as_messages(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def prompt_text(value) -> str:
    """A prompt's plain text (the last user message of a conversation), for reward functions."""
    if isinstance(value, str):
        return value
    return next((m["content"] for m in reversed(value) if m["role"] == "user"), value[-1]["content"])


def labelled(ids: list[int], mask: list[int], prefix: str = "") -> dict:
    """`{prefix}input_ids` and `{prefix}labels` (-100 on the tokens not learned)."""
    return {f"{prefix}input_ids": ids, f"{prefix}labels": [t if m else -100 for t, m in zip(ids, mask)]}


def prompt_and_completion(tok: Tokenizer, prompt, completion, prefix: str = "") -> dict:
    """A prompt and its completion as one sequence whose labels cover only the completion."""
    if isinstance(prompt, list) or isinstance(completion, list):
        messages = as_messages(prompt, "user")
        ids, mask = render_chat(tok, messages + as_messages(completion, "assistant"), learn_from=len(messages))
        return labelled(ids, mask, prefix)
    start = tok(prompt, add_special_tokens=True)["input_ids"]
    end = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return labelled(start + end, [0] * len(start) + [1] * len(end), prefix)


def prompt_ids(tok: Tokenizer, prompt) -> list[int]:
    """A prompt for the model to continue: rendered with the generation prompt when it is a
    conversation, tokenised as it is when plain text."""
    if isinstance(prompt, list):
        return chat_prompt_ids(tok, prompt)
    return tok(prompt, add_special_tokens=True)["input_ids"]


def blocks_of_text(ds: datasets.Dataset, tok: Tokenizer, block: int) -> datasets.Dataset:
    """Documents joined by EOS, cut into blocks of `block` tokens (a tail short of a block is dropped)."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []

    def cut(batch):
        stream: list[int] = []
        for ids in tok(batch["text"], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.extend(eos)
        n = len(stream) // block
        return {"input_ids": [stream[i * block:(i + 1) * block] for i in range(n)]}

    return ds.map(cut, batched=True, batch_size=1000, remove_columns=ds.column_names, desc="tokenise into blocks")


def _conversation(row: dict, tok: Tokenizer) -> list[dict]:
    """One example, or one per reply when the chat template needs it (models.chat.render_examples)."""
    if row.get("messages") is not None:
        return [labelled(ids, mask) for ids, mask in render_examples(tok, row["messages"])]
    return [prompt_and_completion(tok, row["prompt"], row["completion"])]


def _pair(row: dict, tok: Tokenizer) -> dict:
    prompt = row["prompt"]
    if any(isinstance(row[c], list) for c in ("prompt", "chosen", "rejected")):
        prompt = as_messages(prompt, "user")  # one side a conversation: both are
    pair = {**prompt_and_completion(tok, prompt, row["chosen"], "chosen_"),
            **prompt_and_completion(tok, prompt, row["rejected"], "rejected_")}
    if pair["chosen_input_ids"] == pair["rejected_input_ids"]:
        raise RowRefused("column 'rejected' is identical to chosen once rendered and tokenised (what tells them "
                         "apart, e.g. surrounding whitespace, is trimmed by the chat template): the pair carries "
                         "no preference")
    return pair


def _ranked_pair(row: dict, tok: Tokenizer) -> dict:
    return {**_pair(row, tok), **({"margin": float(row["margin"])} if "margin" in row else {})}


def _unpaired(ds: datasets.Dataset) -> tuple[datasets.Dataset, list[int]]:
    """Feedback rows, each with the completion of another row as its KL partner; a pair file
    first becomes two rows per pair (chosen: desirable, rejected: undesirable), as TRL's
    `unpair_preference_dataset`. The partner is the row half the split away, so it answers
    another prompt (a pair's two rows sit side by side)."""
    if "label" in ds.column_names:
        rows, came_from = [{k: r[k] for k in ("prompt", "completion", "label")} for r in ds], list(range(len(ds)))
    else:
        rows, came_from = [], []
        for i, r in enumerate(ds):
            rows += [{"prompt": r["prompt"], "completion": r["chosen"], "label": True},
                     {"prompt": r["prompt"], "completion": r["rejected"], "label": False}]
            came_from += [i, i]
    shift = max(1, len(rows) // 2)
    for i, row in enumerate(rows):
        row["kl_completion"] = rows[(i + shift) % len(rows)]["completion"]
    return datasets.Dataset.from_list(rows), came_from


def _feedback(row: dict, tok: Tokenizer) -> dict:
    prompt = row["prompt"]
    if any(isinstance(row[c], list) for c in ("prompt", "completion", "kl_completion")):
        prompt = as_messages(prompt, "user")
    return {**prompt_and_completion(tok, prompt, row["completion"], "completion_"),
            **prompt_and_completion(tok, prompt, row["kl_completion"], "kl_"), "label": row["label"]}


def _prompt(row: dict, tok: Tokenizer) -> dict:
    """Prompt ids, every other column, and `prompt` as plain text (what reward functions read); a
    conversation's messages also as `prompt_messages` (what a reward model renders)."""
    messages = {"prompt_messages": row["prompt"]} if isinstance(row["prompt"], list) else {}
    return {**row, **messages, "prompt_input_ids": prompt_ids(tok, row["prompt"]), "prompt": prompt_text(row["prompt"])}


# ---- the kinds ----

TEXT = DataKind("text", (("text",),), _text_row_problem, ("input_ids",), collate_causal_lm, demo.documents,
                blocks=blocks_of_text)
CONVERSATIONS = DataKind("conversations", (("prompt", "completion"), ("messages",)), _conversation_row_problem,
                         ("input_ids",), collate_causal_lm, demo.solutions, encode=_conversation, packable=True)
PAIRS = DataKind("pairs", (("prompt", "chosen", "rejected"),), _pair_row_problem,
                 ("chosen_input_ids", "rejected_input_ids"), collate_pairs, demo.preference_pairs, encode=_pair)
RANKED_PAIRS = DataKind("pairs", (("prompt", "chosen", "rejected"),), _ranked_pair_row_problem,
                        ("chosen_input_ids", "rejected_input_ids"), collate_ranked_pairs, demo.preference_pairs,
                        encode=_ranked_pair)
FEEDBACK = DataKind("feedback", (("prompt", "completion", "label"), ("prompt", "chosen", "rejected")),
                    _feedback_row_problem, ("completion_input_ids", "kl_input_ids"), collate_feedback, demo.feedback,
                    encode=_feedback, convert=_unpaired)
PROMPTS = DataKind("prompts", (("prompt",),), _prompt_row_problem, ("prompt_input_ids",), collate_prompts,
                   demo.training_prompts, encode=_prompt)
EVAL_PROMPTS = DataKind("held-out prompts", (("prompt", "answer"),), _prompt_row_problem, ("prompt_input_ids",),
                        collate_prompts, demo.held_out_prompts, encode=_prompt)
