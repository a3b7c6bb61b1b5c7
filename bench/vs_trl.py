"""Training tokens/s of alignflow's SFT and DPO trainers against TRL's: same model, data and settings, CPU.

Both sides train the same random-weight Hugging Face model (Llama by default, `--arch qwen2`;
`--model-size`, default `small`: ~22M parameters, 16M of them the untied 32k-vocabulary
embeddings), loaded the same way (`from_pretrained`, fp32, `attn_implementation="sdpa"`,
`config.use_cache=False`), with the same word-level tokenizer, data, batch size, max length,
learning rate (constant), AdamW betas (0.9, 0.95), weight decay 0.01, clipping at 1.0, seed and
number of optimizer steps, fp32 throughout. Each keeps its own AdamW kernel (alignflow's
`configure_optimizer`: foreach; TRL: transformers' default `adamw_torch_fused`), printed.

  sft  chat-like data: prompt+completion lengths log-uniform in 16..max_length (seeded), the
       prompt 1/8..1/2 of it (labels -100 there), the completion ending in EOS. The data
       reaches TRL already tokenized (input_ids and labels columns), so both pack the same ids.
       alignflow: `trainers.packing.pack_examples` (best-fit decreasing) + `trainers.sft.collate_causal_lm`,
       `--rows` packed rows per step, the model given position_ids (restarting per example).
       TRL: `SFTTrainer(packing=True)` (strategy "bfd", best-fit decreasing, which turns
       `padding_free` on whatever it is set to): `--rows` packed rows per step, flattened into
       one sequence with position_ids. Both count packed rows of max_length, so a step holds
       about the same real tokens on both sides. `--trl-accumulate` adds a TRL row that takes
       one packed row per forward and accumulates `--rows` of them per step.
  dpo  pairs sharing a prompt, chosen and rejected lengths log-uniform in 16..dpo_max_length,
       given to TRL as text ("w17 w3 ...": one word is one token) and tokenised by TRL itself;
       alignflow gets the same ids (checked against TRL's). Both `DPOTrainer`s with
       `precompute_ref_log_probs=True` (the one-off scoring pass is not timed), sigmoid loss,
       `--pairs` pairs per step, chosen and rejected padded to one width and run as one forward.
       TRL is asked for `padding_free=True`; the output says whether it used it (TRL 1.16
       turns it off for DPO: "temporarily unavailable after a refactor").

Timing: each side runs `--warmup` + `--steps` optimizer steps through its own `train()`; the
clock runs from the end of the last warm-up step to the end of the last step (alignflow: its
`training_step` returning; TRL: `on_step_end`), so data loading, collation, the step and the
library's per-step bookkeeping are all inside. Real tokens are counted from the rows each side's
collator was given for the timed steps (packed rows' lengths; prompt+chosen plus prompt+rejected),
by one function for both sides, not from either library's logging; "positions" is what the
model ran over, padding included. The sides run one after the other, not interleaved: on a
shared machine run it more than once (and try --threads 1).

Not equal by design (what each library does, measured as it is): TRL's padding-free SFT
flattens a step's rows into one sequence, so with sdpa its attention (and the block-diagonal
mask transformers builds from position_ids) is quadratic in the whole step's tokens, not in
each row's; flash-attention's varlen kernel, which TRL targets, would not pay that (GPU only).
TRL's LM head is a chunked log-prob kernel: Triton on GPU (only label positions scored); on CPU
a torch-op fallback over every position that recomputes the projection in backward and also
computes entropy, top-1 and (DPO) mean-logit metrics each step. alignflow computes the full
logits, then chunked label log-probs. So CPU ratios say nothing about GPU ones.

Environment (TRL lives only here, never in the project's .venv or pyproject.toml):

    python3 -m venv /tmp/trl-bench && /tmp/trl-bench/bin/pip install torch==2.13.0 -e /work/main trl
    /tmp/trl-bench/bin/python bench/vs_trl.py [--only sft|dpo] [--steps 8] [--warmup 2]
        [--model-size tiny|small|medium|large] [--arch llama|qwen2] [--rows 2] [--pairs 2]
        [--max-length 1024] [--dpo-max-length 1024] [--vocab 32000] [--lr 1e-5] [--threads N]
        [--trl-accumulate]

(`torch==2.13.0` makes pip take the CPU build.) Default size: ~3 minutes on 2 idle cores.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference-scoring bar, datasets' map bars
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Run as a plain script from anywhere, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alignflow.trainers import configure_optimizer  # noqa: E402
from alignflow.trainers.dpo import DPOTrainer, collate_pairs  # noqa: E402
from alignflow.trainers.sft import SFTTrainer  # noqa: E402

from alignflow.trainers.packing import pack_examples  # noqa: E402
from alignflow.trainers.sft import collate_causal_lm  # noqa: E402

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


# ---- the two libraries ----

def alignflow_common(args, steps: int) -> dict:
    return dict(max_steps=steps, log_interval=10 ** 6, device="cpu", seed=args.seed, progress_bar=False,
                max_grad_norm=1.0, precision="fp32")


def stamp_steps(trainer) -> tuple[list[float], list[float]]:
    """Time at the end of every `training_step` of an alignflow trainer, and its losses."""
    stamps: list[float] = []
    losses: list[float] = []
    inner = trainer.training_step

    def timed(micro):
        out = inner(micro)
        stamps.append(time.perf_counter())
        losses.append(out["loss"])
        return out

    trainer.training_step = timed
    return stamps, losses


def step_losses(trainer, micro_batches: int) -> list[float]:
    """Loss of each of a TRL trainer's first two optimizer steps: the sums of its compute_loss
    values per step (each is already divided by the whole step's label count)."""
    values: list[float] = []
    inner = trainer.compute_loss

    def recorded(*args, **kwargs):
        out = inner(*args, **kwargs)
        if len(values) < 2 * micro_batches:
            values.append(float((out[0] if isinstance(out, tuple) else out).detach()))
        return out

    trainer.compute_loss = recorded
    return values


def per_step(values: list[float], micro_batches: int) -> list[float]:
    return [sum(values[i:i + micro_batches]) for i in range(0, len(values), micro_batches)]


def arguments_received(model) -> dict:
    """The keyword arguments (names -> None or shape) of the model's first forward call."""
    seen: dict = {}

    def hook(module, args, kwargs):
        if not seen:
            seen.update({k: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
        return None

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def trl_common(args, steps: int, out_dir: str) -> dict:
    return dict(output_dir=out_dir, max_steps=steps, learning_rate=args.lr, lr_scheduler_type="constant",
                warmup_steps=0, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
                gradient_accumulation_steps=1, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
                seed=args.seed, data_seed=args.seed, train_sampling_strategy="sequential", logging_strategy="no",
                save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
                dataloader_pin_memory=False)


def trl_stamps():
    from transformers import TrainerCallback

    class Stamps(TrainerCallback):
        def __init__(self):
            self.stamps: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())

    return Stamps()


def silence(trainer) -> None:
    """No metrics dict printed at the end of train() (disable_tqdm swaps the bar for a printer)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)


def run_sft_alignflow(args, model_dir: str, examples: list[dict], pad_id: int) -> tuple[Result, dict]:
    from torch.utils.data import DataLoader

    n = args.warmup + args.steps
    model = load_model(model_dir)
    rows = pack_examples(examples, args.max_length)
    collate = functools.partial(collate_causal_lm, pad_id=pad_id)
    info = {"rows": rows, "batching": (f"pack_examples -> {len(rows)} packed rows (mean {mean_len(rows):.0f} "
                                       f"tokens), {args.rows} rows/step, collate_causal_lm")}
    counter = Counting(collate, args.max_length)
    loader = DataLoader(rows, batch_size=args.rows, shuffle=False, collate_fn=counter)
    trainer = SFTTrainer(model=model, optimizer=configure_optimizer(model, lr=args.lr, weight_decay=0.01),
                         train_loader=loader, **alignflow_common(args, n))
    seen = arguments_received(model)
    stamps, losses = stamp_steps(trainer)
    trainer.train()
    info["model_kwargs"] = dict(seen)
    info["optimizer"] = optimizer_name(trainer.optimizer, "configure_optimizer")
    return Result("alignflow", stamps, counter, args.warmup, args.steps, losses), info


def run_sft_trl(args, model_dir: str, examples: list[dict], tok, out_dir: str,
                accumulate: bool = False) -> tuple[Result, dict]:
    """`accumulate`: one packed row per forward, `rows` forwards accumulated per step (the same
    tokens per optimizer step without flattening the rows into one sequence)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer as TRLSFTTrainer

    n = args.warmup + args.steps
    model = load_model(model_dir)
    data = Dataset.from_dict({"input_ids": [x["input_ids"] for x in examples],
                              "labels": [x["labels"] for x in examples]})
    per_forward, accum = (1, args.rows) if accumulate else (args.rows, 1)
    common = trl_common(args, n, out_dir)
    common["gradient_accumulation_steps"] = accum
    config = SFTConfig(per_device_train_batch_size=per_forward, max_length=args.max_length, packing=True,
                       packing_strategy="bfd", padding_free=True, completion_only_loss=None, **common)
    stamps = trl_stamps()
    trainer = TRLSFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[stamps])
    silence(trainer)
    counter = Counting(trainer.data_collator, args.max_length)
    trainer.data_collator = counter
    seen = arguments_received(model)
    rows = trainer.train_dataset
    losses = step_losses(trainer, accum)
    trainer.train()
    info = {"padding_free": trainer.padding_free, "model_kwargs": dict(seen),
            "batching": (f"packing=True (bfd) -> {len(rows)} packed rows (mean {mean_len(rows['input_ids']):.0f} "
                         f"tokens), {per_forward} row(s)/forward x {accum} accumulated = {args.rows} rows/step, "
                         f"padding_free={trainer.padding_free}"
                         + (" (a forward's rows flattened into one sequence)" if per_forward > 1 else "")),
            "optimizer": optimizer_name(trainer.optimizer, config.optim)}
    side = f"trl {per_forward}x{accum}" if accumulate else "trl"
    return Result(side, stamps.stamps, counter, args.warmup, args.steps, per_step(losses, accum),
                  batches_per_step=accum), info


def optimizer_name(optimizer, name) -> str:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    flags = [k for k in ("fused", "foreach") if inner.defaults.get(k)]
    return f"{type(inner).__name__}({', '.join(flags) or 'for-loop'}; optim={getattr(name, 'value', name)})"


def run_dpo_alignflow(args, model_dir: str, pairs: list[dict], pad_id: int) -> tuple[Result, dict]:
    from torch.utils.data import DataLoader

    n = args.warmup + args.steps
    model, ref = load_model(model_dir), load_model(model_dir)
    items = [as_alignflow_pair(p) for p in pairs]
    counter = Counting(functools.partial(collate_pairs, pad_id=pad_id), args.dpo_max_length)
    loader = DataLoader(items, batch_size=args.pairs, shuffle=False, collate_fn=counter)
    optimizer = configure_optimizer(model, lr=args.lr, weight_decay=0.01)
    trainer = DPOTrainer(model=model, ref_model=ref, optimizer=optimizer, train_loader=loader,
                         precompute_ref_log_probs=True, beta=args.beta, loss_type="sigmoid",
                         **alignflow_common(args, n))
    del ref
    trainer.precompute_reference_logps()  # the one-off scoring pass, as TRL's happens in its __init__
    counter.reset()
    seen = arguments_received(model)
    stamps, losses = stamp_steps(trainer)
    trainer.train()
    return Result("alignflow", stamps, counter, args.warmup, args.steps, losses), {
        "model_kwargs": dict(seen), "optimizer": optimizer_name(trainer.optimizer, "configure_optimizer")}


def run_dpo_trl(args, model_dir: str, texts: list[dict], pairs: list[dict], tok, out_dir: str) -> tuple[Result, dict]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer as TRLDPOTrainer

    n = args.warmup + args.steps
    model = load_model(model_dir)
    # padding_free=True is asked for; TRL versions that cannot do it for DPO turn it off (reported)
    config = DPOConfig(per_device_train_batch_size=args.pairs, max_length=args.dpo_max_length, beta=args.beta,
                       loss_type=["sigmoid"], precompute_ref_log_probs=True, padding_free=True,
                       **trl_common(args, n, out_dir))
    stamps = trl_stamps()
    trainer = TRLDPOTrainer(model=model, ref_model=None, args=config, train_dataset=Dataset.from_list(texts),
                            processing_class=tok, callbacks=[stamps])
    silence(trainer)
    prepared = trainer.train_dataset
    for i, want in enumerate(pairs):  # both sides train on the same ids
        got = prepared[i]
        if any(got[k] != want[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")):
            raise AssertionError(f"pair {i}: TRL tokenised the text differently from alignflow's copy")
    counter = Counting(trainer.data_collator, args.dpo_max_length)
    trainer.data_collator = counter
    seen = arguments_received(model)
    losses = step_losses(trainer, 1)
    trainer.train()
    return Result("trl", stamps.stamps, counter, args.warmup, args.steps, losses), {
        "padding_free": trainer.padding_free, "model_kwargs": dict(seen),
        "optimizer": optimizer_name(trainer.optimizer, config.optim)}


# ---- output ----

def mean_len(rows) -> float:
    rows = list(rows)
    return sum(len(r["input_ids"] if isinstance(r, dict) else r) for r in rows) / max(1, len(rows))


def table(title: str, results: list[Result]) -> None:
    print(f"\n{title}")
    print(f"  {'side':10s} {'steps':>5s} {'real tokens':>12s} {'positions':>10s} {'pad %':>6s} {'seconds':>8s} "
          f"{'real tok/s':>11s}  loss at steps 1, 2")
    for r in results:
        pad = 100.0 * (1 - r.tokens / r.positions) if r.positions else 0.0
        print(f"  {r.side:10s} {r.steps:5d} {r.tokens:12,d} {r.positions:10,d} {pad:6.1f} {r.seconds:8.2f} "
              f"{r.rate:11,.0f}  {', '.join(f'{x:.6f}' for x in r.losses)}")
    ours, *theirs = results
    for other in theirs:
        print(f"  ratio alignflow / {other.side.replace('trl', 'TRL')} (real tok/s) = {ours.rate / other.rate:.3f}")


@contextlib.contextmanager
def quiet():
    """TRL and transformers warn about CPU, padding-free without flash attention and so on:
    the settings lines below say what matters."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    trl_logger = logging.getLogger("trl")
    trl_level = trl_logger.level
    trl_logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)
            trl_logger.setLevel(trl_level)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("sft", "dpo"), help="run one comparison (default: both)")
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (at least 1)")
    ap.add_argument("--model-size", choices=tuple(MODEL_SIZES), default="small")
    ap.add_argument("--arch", choices=("llama", "qwen2"), default="llama")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rows", type=int, default=2, help="SFT: packed rows of max_length per step (both sides)")
    ap.add_argument("--pairs", type=int, default=2, help="DPO: preference pairs per step (both sides)")
    ap.add_argument("--max-length", type=int, default=1024, help="SFT max length (packed row length)")
    ap.add_argument("--dpo-max-length", type=int, default=1024, help="DPO: longest prompt+completion")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--trl-accumulate", action="store_true",
                    help="SFT: also time TRL with one packed row per forward and --rows of them accumulated "
                         "per step (no flattening of rows into one sequence)")
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        import trl
    except ImportError:
        sys.exit("bench/vs_trl.py needs TRL in its own environment; see the docstring:\n"
                 "  python3 -m venv /tmp/trl-bench && /tmp/trl-bench/bin/pip install torch==2.13.0 -e /work/main trl")
    import accelerate
    import datasets
    import transformers

    datasets.disable_progress_bars()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"accelerate {accelerate.__version__}, datasets {datasets.__version__}; cpu, "
          f"threads {torch.get_num_threads()}, fp32")

    tok = build_tokenizer(args.vocab)
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as tmp, quiet():
        model_dir = os.path.join(tmp, "model")
        save_model(args.arch, args.model_size, args.vocab, max(args.max_length, args.dpo_max_length), tok,
                   model_dir, args.seed)
        probe = load_model(model_dir)
        hidden, inter, layers, heads, kv = MODEL_SIZES[args.model_size]
        print(f"model: {type(probe).__name__} '{args.model_size}' ({probe.num_parameters() / 1e6:.1f}M parameters: "
              f"hidden {hidden}, intermediate {inter}, {layers} layers, {heads}/{kv} heads, vocab {args.vocab}, "
              f"tied={probe.config.tie_word_embeddings}), sdpa, use_cache=False; lr {args.lr} constant, AdamW "
              f"(0.9, 0.95), weight decay 0.01, clip 1.0; {args.warmup} warm-up + {args.steps} timed steps per side")
        del probe
        n = args.warmup + args.steps

        if args.only in (None, "sft"):
            # ~10% more tokens than the steps need, so the emptier packed rows BFD makes last stay unused.
            examples = sft_examples(int(1.1 * n * args.rows * args.max_length), args.max_length, args.vocab,
                                    tok.eos_token_id, args.seed)
            lengths = [len(x["input_ids"]) for x in examples]
            median = sorted(lengths)[len(lengths) // 2]
            print(f"\nSFT data: {len(examples)} examples, {sum(lengths):,} tokens, length log-uniform "
                  f"16..{args.max_length} (mean {sum(lengths) / len(lengths):.0f}, median {median}), "
                  f"prompt 1/8..1/2 of each (no loss there)")
            ours, ours_info = run_sft_alignflow(args, model_dir, examples, tok.pad_token_id)
            theirs, theirs_info = run_sft_trl(args, model_dir, examples, tok, os.path.join(tmp, "trl-sft"))
            extra = []
            if args.trl_accumulate and args.rows > 1:
                extra = [run_sft_trl(args, model_dir, examples, tok, os.path.join(tmp, "trl-sft-acc"), True)]
            print(f"  alignflow: {ours_info['batching']}; model got {describe(ours_info['model_kwargs'])}; "
                  f"{ours_info['optimizer']}")
            if "position_ids" not in ours_info["model_kwargs"]:
                print("  WARNING: SFTTrainer did not pass position_ids: packed examples attended across their "
                      "boundaries (the timing holds, the training would be wrong)")
            for result, info in [(theirs, theirs_info)] + extra:
                print(f"  {result.side + ':':10s} {info['batching']}; model got {describe(info['model_kwargs'])}; "
                      f"{info['optimizer']}")
            print(f"  batch size: {args.rows} packed rows of <= {args.max_length} tokens a step on both sides "
                  "(both count packed rows, so a step holds about the same real tokens)")
            table(f"SFT: alignflow packed vs TRL "
                  f"packing=True (bfd), padding_free={theirs_info['padding_free']}",
                  [ours, theirs] + [result for result, _ in extra])

        if args.only in (None, "dpo"):
            texts = dpo_texts(n * args.pairs, args.dpo_max_length, args.vocab, args.seed + 1)
            pairs = tokenize_pairs(texts, tok)
            seqs = [len(p["prompt_ids"]) + len(p[f"{s}_ids"]) for p in pairs for s in ("chosen", "rejected")]
            print(f"\nDPO data: {len(pairs)} pairs, sequence lengths log-uniform 16..{args.dpo_max_length} "
                  f"(mean {sum(seqs) / len(seqs):.0f}); {args.pairs} pairs/step on both sides "
                  f"(chosen and rejected in one forward), beta {args.beta}, sigmoid, "
                  f"precompute_ref_log_probs=True on both sides (the scoring pass is not timed)")
            ours, ours_info = run_dpo_alignflow(args, model_dir, pairs, tok.pad_token_id)
            theirs, theirs_info = run_dpo_trl(args, model_dir, texts, pairs, tok, os.path.join(tmp, "trl-dpo"))
            print(f"  alignflow: collate_pairs; model got {describe(ours_info['model_kwargs'])}; "
                  f"{ours_info['optimizer']}")
            print(f"  trl:       padding_free=True asked, {theirs_info['padding_free']} used"
                  + ("" if theirs_info["padding_free"] else
                     f" (TRL {trl.__version__}'s DPOTrainer turns it off: 'temporarily unavailable')")
                  + f"; model got {describe(theirs_info['model_kwargs'])}; {theirs_info['optimizer']}")
            table(f"DPO: alignflow vs TRL (padding_free={theirs_info['padding_free']})", [ours, theirs])
    print("\n(one run, sides one after the other; on a shared machine compare several runs)")


def describe(kwargs: dict) -> str:
    keys = [f"{k}{list(v) if isinstance(v, tuple) else ''}" for k, v in kwargs.items()
            if k in ("input_ids", "attention_mask", "position_ids") and v is not None]
    return ", ".join(keys) if keys else "(none)"


if __name__ == "__main__":
    main()
