"""Reward functions, looked up by name, and `Rewards`: the one scorer GRPO's training, its
validation and every stage's held-out evaluation share.

A reward function scores a batch of completions:

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

`columns` are the prompt dataset's other columns (e.g. `answer`), one value per completion.
A function returns None for a row it does not apply to (say, a row without a reference
answer); `Rewards` leaves such rows out of that function's mean and out of the weighted sum.
Functions take `**columns` so they ignore the columns they do not use.

Register your own and name it in the trainer (or a config), with the columns it reads: the
GRPO stage refuses data that lacks one, since the function would score nothing and training
would go on silently on the other functions alone:

    from alignflow.trainers.rewards import register_reward

    @register_reward("brevity")  # reads no column; a function needing `answer`: columns=("answer",)
    def brevity(prompts, completions, **columns):
        return [1.0 if len(c) < 200 else 0.0 for c in completions]

    GRPOTrainer(..., reward_funcs=["exact_match", "format", "brevity"],
                reward_weights=[1.0, 0.2, 0.1])

Built-ins suit the demo task, small arithmetic word problems whose completions end with a line
`Answer: <number>`: `exact_match` scores correctness, `format` the answer line, `contains`
checks for a `target` string.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Callable

import torch

RewardFn = Callable[..., list]

_REGISTRY: dict[str, RewardFn] = {}
_COLUMNS: dict[str, tuple[str, ...]] = {}  # the data columns each registered function reads
DEFAULT_REWARDS = ["exact_match", "format"]  # the demo task's: a right answer, in the answer format

# A number as people write it in word problems: optional sign, thousands commas, decimals.
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_ANSWER_LINE = re.compile(r"^[ \t]*answer[ \t]*:[ \t]*(.*?)[ \t]*$", re.IGNORECASE | re.MULTILINE)
# The completion's last line is "Answer: <number>" (a trailing newline is fine).
ANSWER_FORMAT = r"(?m)^Answer: *-?\d+(?:,\d{3})*(?:\.\d+)?\s*\Z"


def register_reward(name: str, columns: tuple[str, ...] = ()) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make a reward function available as `get_reward(name)`; `columns` are the
    data columns it reads (see `required_columns`)."""
    def decorator(fn: RewardFn) -> RewardFn:
        _REGISTRY[name] = fn
        _COLUMNS[name] = tuple(columns)
        return fn
    return decorator


def get_reward(name: str) -> RewardFn:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(_REGISTRY)}") from None


def required_columns(names: list[str]) -> dict[str, list[str]]:
    """{column: [the named reward functions that read it]} for registered functions."""
    needs: dict[str, list[str]] = {}
    for name in names:
        get_reward(name)  # an unknown name fails here, naming the registered ones
        for column in _COLUMNS[name]:
            needs.setdefault(column, []).append(name)
    return needs


def resolve_reward_weights(funcs: list, weights: list[float] | None) -> list[float]:
    """One weight per reward function (1 each by default)."""
    if not funcs:
        raise ValueError("GRPO needs at least one reward function")
    weights = [1.0] * len(funcs) if weights is None else list(weights)
    if len(weights) != len(funcs):
        raise ValueError(f"{len(weights)} reward weights for {len(funcs)} reward functions")
    return weights


def reward_name(fn: RewardFn) -> str:
    """The name metrics use for a reward callable (functools.partial shows its function's)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


class Rewards:
    """Reward functions (registered names or callables) and their weights (1 each by default)."""

    def __init__(self, funcs: list, weights: list[float] | None = None):
        self.weights = torch.tensor(resolve_reward_weights(funcs, weights), dtype=torch.float32)
        self.funcs = [get_reward(f) if isinstance(f, str) else f for f in funcs]
        self.names = [f if isinstance(f, str) else reward_name(f) for f in funcs]

    def score(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> torch.Tensor:
        """[N, F]: each function's reward for each completion, NaN where it returned None.
        `columns`: the data's other columns, one value per completion."""
        scores = []
        for fn, name in zip(self.funcs, self.names):
            values = fn(prompts, completions, **columns)
            if len(values) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
            scores.append([math.nan if v is None else float(v) for v in values])
        return torch.tensor(scores, dtype=torch.float32).T.reshape(len(completions), len(self.funcs))

    def total(self, per_function: torch.Tensor) -> torch.Tensor:
        """[N]: the weighted sum over functions; one that does not apply (NaN) adds nothing."""
        return torch.nansum(per_function * self.weights.to(per_function.dtype), dim=1)


def final_answer(text: str) -> str:
    """What a completion answers: its last `Answer:` line's value, else its last number,
    else the whole stripped text."""
    lines = _ANSWER_LINE.findall(text)
    if lines:
        return lines[-1]
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else text.strip()


def _as_number(text: str) -> float | None:
    return float(text.replace(",", "")) if _NUMBER.fullmatch(text) else None


def answers_match(predicted: str, expected) -> bool:
    """Numeric answers compare as numbers (so "1,000.0" matches 1000), the last number of
    `predicted` counting; other answers compare as case-folded stripped strings."""
    expected = str(expected).strip()
    target = _as_number(expected)
    if target is None:
        return predicted.strip().casefold() == expected.casefold()
    numbers = _NUMBER.findall(predicted)
    return bool(numbers) and _as_number(numbers[-1]) == target


@register_reward("exact_match", columns=("answer",))
def exact_match(prompts, completions, answer=None, **columns) -> list[float | None]:
    """1.0 when the completion's final answer equals the `answer` column, None without one."""
    if answer is None:
        return [None] * len(completions)
    return [None if a is None else float(answers_match(final_answer(c), a))
            for c, a in zip(completions, answer)]


@register_reward("contains", columns=("target",))
def contains(prompts, completions, target=None, **columns) -> list[float | None]:
    """1.0 when the completion contains the `target` column's string, None without one."""
    if target is None:
        return [None] * len(completions)
    return [None if t is None else float(str(t) in c) for c, t in zip(completions, target)]


@register_reward("format")
def format_reward(prompts, completions, pattern: str = ANSWER_FORMAT, **columns) -> list[float]:
    """1.0 when `re.search(pattern, completion)` matches. The default asks for a final line
    `Answer: <number>`; bind another with `functools.partial(format_reward, pattern=...)`."""
    regex = re.compile(pattern)
    return [float(regex.search(c) is not None) for c in completions]
