"""The built-in demo task: small arithmetic word problems with a verifiable answer.

One seeded generator gives every stage its data in the formats TRL users have:
pretraining `text`, SFT `prompt`/`completion`, DPO `prompt`/`chosen`/`rejected` (a correct
solution vs a plausible wrong one), KTO `prompt`/`completion`/`label` (one answer, right or
wrong), GRPO `prompt` + `answer`, and held-out evaluation prompts.
Prompts and replies are conversational (message lists), so every model renders them with its
own chat template.
Problems are split by their (template, a, b) so held-out problems are never seen in training.

A solution reads "3 + 4 = 7.\nAnswer: 7" — short enough for the tiny preset to learn on a
CPU, and checkable by the `exact_match` and `format` rewards."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .settings import DemoConfig

NAMES = ["Tom", "Ana", "Li", "Sam", "Mia", "Ben", "Ada", "Kai"]
ITEMS = ["apples", "books", "coins", "cards", "shells", "pens"]
MAX_OPERAND = 9


@dataclass(frozen=True)
class Problem:
    question: str
    a: int
    b: int
    op: str  # "+" or "-"

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    def solution(self, answer: int | None = None) -> str:
        value = self.answer if answer is None else answer
        return f"{self.a} {self.op} {self.b} = {value}.\nAnswer: {value}"


TEMPLATES = [
    ("+", "{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"),
    ("-", "{name} has {a} {item} and gives away {b}. How many {item} are left?"),
    ("+", "What is {a} plus {b}?"),
    ("-", "What is {a} minus {b}?"),
]


def all_problems(rng: random.Random) -> list[Problem]:
    problems = []
    for op, template in TEMPLATES:
        for a in range(MAX_OPERAND + 1):
            for b in range(MAX_OPERAND + 1):
                if op == "-" and b > a:
                    continue
                text = template.format(name=rng.choice(NAMES), item=rng.choice(ITEMS), a=a, b=b)
                problems.append(Problem(text, a, b, op))
    return problems


def plausible_wrong(problem: Problem, rng: random.Random) -> int:
    """An answer a careless solver gives: off by one, or the other operation."""
    other = problem.a - problem.b if problem.op == "+" else problem.a + problem.b
    candidates = {problem.answer + 1, max(problem.answer - 1, 0), other} - {problem.answer}
    return rng.choice(sorted(candidates))


def split_problems(seed: int, eval_fraction: float = 0.15) -> tuple[list[Problem], list[Problem]]:
    rng = random.Random(seed)
    problems = all_problems(rng)
    rng.shuffle(problems)
    n_eval = max(1, int(len(problems) * eval_fraction))
    return problems[n_eval:], problems[:n_eval]


def _sample(problems: list[Problem], n: int, rng: random.Random) -> list[Problem]:
    return [rng.choice(problems) for _ in range(n)]


def pretrain_rows(train: list[Problem], n: int, rng: random.Random) -> list[dict]:
    """Plain text: worked problems and arithmetic facts, a few per document."""
    rows = []
    for _ in range(n):
        parts = []
        for p in _sample(train, rng.randint(1, 3), rng):
            parts.append(f"{p.question} {p.solution()}" if rng.random() < 0.7 else f"{p.a} {p.op} {p.b} = {p.answer}.")
        rows.append({"text": " ".join(parts)})
    return rows


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def sft_rows(problems: list[Problem], n: int, rng: random.Random) -> list[dict]:
    return [{"prompt": user(p.question), "completion": assistant(p.solution())} for p in _sample(problems, n, rng)]


def preference_rows(problems: list[Problem], n: int, rng: random.Random) -> list[dict]:
    return [{"prompt": user(p.question), "chosen": assistant(p.solution()),
             "rejected": assistant(p.solution(plausible_wrong(p, rng)))} for p in _sample(problems, n, rng)]


def prompt_rows(problems: list[Problem]) -> list[dict]:
    return [{"prompt": user(p.question), "answer": str(p.answer)} for p in problems]


@dataclass(frozen=True)
class DemoSplit:
    """What a row generator draws from: the split's problems (the held-out ones for "val")."""
    problems: list[Problem]
    held_out: list[Problem]
    split: str
    sizes: DemoConfig
    rng: random.Random

    def count(self, train_size: int) -> int:
        """`train_size` rows for "train", a tenth of it for "val" (at least one)."""
        return max(1, int(train_size * (1 if self.split == "train" else 0.1)))


# ---- the rows of each data kind (stages/formats.py), from a split's problems ----

def documents(s: DemoSplit) -> list[dict]:
    """Pretraining text."""
    return pretrain_rows(s.problems, s.count(s.sizes.pretrain_docs), s.rng)


def solutions(s: DemoSplit) -> list[dict]:
    """SFT's prompt/completion conversations."""
    return sft_rows(s.problems, s.count(s.sizes.sft_examples), s.rng)


def preference_pairs(s: DemoSplit) -> list[dict]:
    """A correct solution chosen over a plausible wrong one."""
    return preference_rows(s.problems, s.count(s.sizes.preference_pairs), s.rng)


def feedback(s: DemoSplit) -> list[dict]:
    """Unpaired thumbs-up/down (KTO's): each drawn problem answered once, rightly (desirable) or
    with a plausible wrong answer (undesirable), half and half."""
    rows = []
    for p in _sample(s.problems, s.count(s.sizes.preference_pairs), s.rng):
        good = s.rng.random() < 0.5
        answer = p.solution() if good else p.solution(plausible_wrong(p, s.rng))
        rows.append({"prompt": user(p.question), "completion": assistant(answer), "label": good})
    return rows


def training_prompts(s: DemoSplit) -> list[dict]:
    """Prompts with their answers, drawn with replacement (GRPO's)."""
    n = s.sizes.grpo_prompts if s.split == "train" else s.sizes.eval_prompts
    return prompt_rows(_sample(s.problems, n, s.rng))


def held_out_prompts(s: DemoSplit) -> list[dict]:
    """The held-out problems, each once, for evaluation."""
    return prompt_rows(s.held_out[: s.sizes.eval_prompts])


def demo_rows(stage: str, rows: Callable[[DemoSplit], list[dict]], split: str, sizes: DemoConfig) -> list[dict]:
    """One stage's rows of one split ("train", "val"): `rows` drawn from the split's problems
    (validation rows from the held-out ones), seeded by sizes.seed and the stage's name, so each
    stage gets its own draw and the same one every run."""
    train, held_out = split_problems(sizes.seed)
    rng = random.Random(f"{sizes.seed}-{stage}-{split}")
    return rows(DemoSplit(train if split == "train" else held_out, held_out, split, sizes, rng))
