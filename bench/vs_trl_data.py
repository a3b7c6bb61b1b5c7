"""The model, tokenizer and data both sides of bench/vs_trl.py train on, and the one rule that
counts their tokens (`real_tokens`, `Counting`, `Result`)."""
from __future__ import annotations

import math

import torch

IGNORE = -100
SPECIALS = ("<|pad|>", "<|eos|>", "<|unk|>")  # ids 0, 1, 2; words w3 .. w{vocab-1} after them
MODEL_SIZES = {  # hidden, intermediate, layers, heads, kv heads
    "tiny": (128, 384, 2, 4, 2),  # ~8.6M at vocab 32000, nearly all embeddings: for trying the script
    "small": (256, 1024, 6, 4, 2),  # ~22M (16M of them the untied embeddings)
    "medium": (384, 1024, 6, 6, 2),  # ~34M
    "large": (512, 1536, 8, 8, 4),  # ~58M
}


# ---- tokenizer and model ----

def build_tokenizer(vocab_size: int):
    """A word-level tokenizer: "w17" is token 17, so text of n words is n tokens and any
    string of words round-trips exactly (prompt + completion tokenises to the concatenation)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>",
                                   unk_token="<|unk|>", model_max_length=1 << 20)


def save_model(arch: str, size: str, vocab: int, max_len: int, tok, path: str, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    hidden, inter, layers, heads, kv = MODEL_SIZES[size]
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max(max_len, 256),
                  bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype="float32")
    torch.manual_seed(seed)
    if arch == "llama":  # untied, GQA (Llama 3 style)
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **common))
    else:  # tied, q/k/v bias (Qwen2 style)
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))
    model.float().save_pretrained(path)
    tok.save_pretrained(path)


def load_model(path: str):
    """As the pipeline loads a Hugging Face model: fp32 weights, sdpa, no KV cache in training."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


# ---- data ----

def log_uniform(g: torch.Generator, lo: int, hi: int) -> int:
    u = torch.rand((), generator=g).item()
    return int(round(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))))


def prompt_len(g: torch.Generator, total: int) -> int:
    """1/8 .. 1/2 of the sequence, at least one token (so position 0 is never a target)."""
    return int(torch.randint(max(1, total // 8), max(2, total // 2 + 1), (1,), generator=g))


def words(g: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(len(SPECIALS), vocab, (n,), generator=g).tolist()


def sft_examples(total_tokens: int, max_len: int, vocab: int, eos: int, seed: int) -> list[dict]:
    """Chat-like SFT rows until `total_tokens`: length log-uniform in 16..max_len, EOS last."""
    g = torch.Generator().manual_seed(seed)
    out, n = [], 0
    while n < total_tokens:
        total = log_uniform(g, 16, max_len)
        p = prompt_len(g, total)
        ids = words(g, total - 1, vocab) + [eos]
        out.append({"input_ids": ids, "labels": [IGNORE] * p + ids[p:]})
        n += total
    return out


def dpo_texts(n_pairs: int, max_len: int, vocab: int, seed: int) -> list[dict]:
    """Pairs as text: a shared prompt, chosen and rejected completions (each starting with a
    space, as TRL concatenates prompt + completion as strings); with the EOS TRL appends, each
    side is log-uniform in 16..max_len tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_pairs):
        chosen_total, rejected_total = log_uniform(g, 16, max_len), log_uniform(g, 16, max_len)
        p = prompt_len(g, min(chosen_total, rejected_total))
        text = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
        rows.append({"prompt": text(words(g, p, vocab)),
                     "chosen": " " + text(words(g, chosen_total - p - 1, vocab)),
                     "rejected": " " + text(words(g, rejected_total - p - 1, vocab))})
    return rows


def tokenize_pairs(rows: list[dict], tok) -> list[dict]:
    """What TRL's DPO preparation makes of the text: prompt ids, and the completion as the ids
    of prompt + completion + EOS after the prompt's."""
    out = []
    for row in rows:
        prompt = tok(row["prompt"])["input_ids"]
        item = {"prompt_ids": prompt}
        for side in ("chosen", "rejected"):
            full = tok(row["prompt"] + row[side] + tok.eos_token)["input_ids"]
            assert full[:len(prompt)] == prompt, "the word-level tokenizer must keep the prompt a prefix"
            item[f"{side}_ids"] = full[len(prompt):]
        out.append(item)
    return out


def as_alignflow_pair(item: dict) -> dict:
    p = item["prompt_ids"]
    out = {}
    for side in ("chosen", "rejected"):
        out[f"{side}_input_ids"] = p + item[f"{side}_ids"]
        out[f"{side}_labels"] = [IGNORE] * len(p) + item[f"{side}_ids"]
    return out


# ---- counting: one rule for both sides ----

def real_tokens(example: dict, max_len: int) -> int:
    """Non-pad tokens the model runs over for one dataset row, whichever side's format it is in."""
    if "prompt_ids" in example:  # TRL preference row
        p = len(example["prompt_ids"])
        return min(p + len(example["chosen_ids"]), max_len) + min(p + len(example["rejected_ids"]), max_len)
    if "chosen_input_ids" in example:  # alignflow preference item
        return len(example["chosen_input_ids"]) + len(example["rejected_input_ids"])
    return len(example["input_ids"])  # an SFT example or a packed row (either side)


class Counting:
    """Wraps a collator: records, per batch, the real tokens of the rows it was given and the
    positions of what it returned (every position the model computes, padding included)."""

    def __init__(self, collate, max_len: int):
        self.collate, self.max_len = collate, max_len
        self.tokens: list[int] = []
        self.positions: list[int] = []

    def __call__(self, examples):
        batch = self.collate(examples)
        self.tokens.append(sum(real_tokens(x, self.max_len) for x in examples))
        ids = [v for k, v in batch.items() if k.endswith("input_ids")]
        # DPO: chosen and rejected run as one [2B, L] batch, both sides padded to the same width
        self.positions.append(sum(t.numel() for t in ids))
        return batch

    def reset(self) -> None:
        self.tokens.clear()
        self.positions.clear()


class Result:
    """Seconds, real tokens and positions of the timed steps. Batches are consumed in order, so
    step k used the collator's batches k*per_step .. (k+1)*per_step - 1 (a loader that reads
    ahead only appends later batches)."""

    def __init__(self, side: str, stamps: list[float], counter: Counting, warmup: int, steps: int,
                 losses: list[float], batches_per_step: int = 1):
        n = warmup + steps
        if len(stamps) < n:
            raise RuntimeError(f"{side}: {len(stamps)} steps ran, {n} expected")
        if len(counter.tokens) < n * batches_per_step:
            raise RuntimeError(f"{side}: the collator saw {len(counter.tokens)} batches, "
                               f"{n * batches_per_step} expected")
        self.side, self.steps, self.losses = side, steps, losses[:2]
        self.seconds = stamps[n - 1] - stamps[warmup - 1]
        timed = slice(warmup * batches_per_step, n * batches_per_step)
        self.tokens = sum(counter.tokens[timed])
        self.positions = sum(counter.positions[timed])

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def mean_len(rows) -> float:
    rows = list(rows)
    return sum(len(r["input_ids"] if isinstance(r, dict) else r) for r in rows) / max(1, len(rows))
