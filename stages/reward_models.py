"""Reward models as GRPO's reward functions: each completion, rendered after its prompt the way the
rm stage's pairs were (the reward model's own tokenizer and chat template: stages/formats.py's
`prompt_and_completion`), scored at its last token in batches on the stage's device, the model
frozen (and sharded under fsdp) as a reference is. A scorer has the reward-function signature, so
trainers.rewards' `Rewards` weighs it beside the functions: one weighted sum."""
from __future__ import annotations

import torch

from alignflow.models import Tokenizer
from alignflow.trainers.reward import sequence_rewards

from .formats import prompt_and_completion

BATCH = 32  # sequences scored together


class RewardModelScorer:
    """fn(prompts, completions, prompt_messages=None, **columns) -> one float per completion.
    `prompt_messages`: a conversational prompt's messages (the prompt data's encoding keeps them),
    rendered with the completion as the assistant's reply; otherwise the plain prompt text."""

    def __init__(self, name: str, model: torch.nn.Module, tok: Tokenizer, device: torch.device, batch: int = BATCH):
        self.__name__ = name  # what the metrics call it: rewards/<name>
        self.model, self.tok, self.device, self.batch = model, tok, device, batch

    def sequences(self, prompts: list[str], completions: list[str], prompt_messages=None) -> list[list[int]]:
        out = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            if prompt_messages is not None and prompt_messages[i] is not None:
                prompt = list(prompt_messages[i])
            out.append(prompt_and_completion(self.tok, prompt, completion)["input_ids"])
        return out

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], prompt_messages=None, **columns) -> list[float]:
        rows = self.sequences(prompts, completions, prompt_messages)
        scores: list[float] = []
        for start in range(0, len(rows), self.batch):
            chunk = rows[start:start + self.batch]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), self.tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, r in enumerate(chunk):  # right-padded: the head reads each row's last real token
                ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, :len(r)] = 1
            scores += sequence_rewards(self.model, ids.to(self.device), mask.to(self.device)).cpu().tolist()
        return scores

