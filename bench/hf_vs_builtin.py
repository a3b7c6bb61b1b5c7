"""Training-step tokens/s of transformers' LlamaForCausalLM vs the built-in one, same weights, one run.

The built-in `models.LlamaForCausalLM` is saved with `models.save_pretrained` and loaded back as
the pipeline loads a Hugging Face model (`models.load_model`: transformers' AutoModelForCausalLM,
fp32 weights, sdpa, config.use_cache off for training);
both must give the same logits (max |diff| printed) before anything is timed. Each model then runs
full optimizer steps through the project's own trainers (`SFTTrainer.training_step`,
`DPOTrainer.training_step`: their loss, backward, gradient clipping, AdamW from
`configure_optimizer`):

  sft  one right-padded batch from `collate_causal_lm` (attention_mask, labels -100 on the prompt)
  dpo  `collate_pairs` pairs: `concatenated_logps` of the policy on chosen+rejected, a no-grad
       `concatenated_logps` of a frozen reference copy (live, not precomputed), sigmoid `dpo_loss`

each on a batch with padding ("pad": rows of random length) and one without ("nopad": every row
full length; the collators still give an all-ones attention_mask, as in the pipeline). The
built-in and HF steps of a row run back to back, alternating which goes first (AB BA AB ...),
so machine noise hits both alike; the first repetition warms up and is dropped. Prints median
tokens/s (real tokens, padding excluded) of each model and hf/builtin, the median of the
per-repetition ratios (requirement >= 0.95 on every row).

transformers' own default, use_cache=True, would make every training forward also fill a
DynamicCache (a copy of each layer's keys and values, fp32 under autocast): 3-7% of a bf16 step,
which is why `load_model` turns it off. Under bf16 transformers also rotates q and k in fp32 (the
built-in in bf16), a further ~2-3% it keeps: the more accurate choice. --drop-full-mask
gives both models attention_mask=None for batches without padding (the built-in then takes SDPA's
is_causal path; transformers already skips an all-ones mask by itself). --profile prints the top
ops of one step of each. On a busy CPU pass --threads 1: a descheduled OpenMP thread stalls
every op of a multi-threaded run.

    python bench/hf_vs_builtin.py [--device cpu|cuda] [--precision fp32|bf16] [--batch 8] [--seq 256]
                                  [--hidden 256] [--layers 4] [--heads 8] [--vocab 4096] [--reps 10]
                                  [--rows sft-pad,sft-nopad,dpo-pad,dpo-nopad] [--threads N]
                                  [--drop-full-mask] [--profile]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile

import torch
from torch import nn

from alignflow.models import LlamaForCausalLM, get_preset, load_model, save_pretrained  # noqa: E402
from alignflow.trainers import SFTTrainer, configure_optimizer  # noqa: E402
from alignflow.trainers.dpo import DPOTrainer, collate_pairs  # noqa: E402
from alignflow.trainers.modules import logits_of  # noqa: E402
from alignflow.trainers.sft import collate_causal_lm  # noqa: E402
from timing import seconds  # noqa: E402  (bench/timing.py, beside this script)

TARGET = 0.95
KINDS = ("builtin", "hf")
ROWS = ("sft-pad", "sft-nopad", "dpo-pad", "dpo-nopad")


# ---- data ----

def lengths(g: torch.Generator, n: int, seq: int, padded: bool) -> list[int]:
    """Row lengths: all `seq`, or random in [seq/2, seq] with the first row full, so every
    padded batch has the same width and the two variants the same shape."""
    if not padded:
        return [seq] * n
    return [seq] + torch.randint(seq // 2, seq + 1, (n - 1,), generator=g).tolist()


def prompt_len(g: torch.Generator, total: int) -> int:
    return int(torch.randint(max(1, total // 8), max(2, total // 2), (1,), generator=g))


def sft_batches(n: int, batch: int, seq: int, vocab: int, padded: bool) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        items = []
        for total in lengths(g, batch, seq, padded):
            ids = torch.randint(3, vocab, (total,), generator=g)
            labels = ids.clone()
            labels[:prompt_len(g, total)] = -100
            items.append({"input_ids": ids, "labels": labels})
        out.append(collate_causal_lm(items, pad_id=0))
    return out


def dpo_batches(n: int, pairs: int, seq: int, vocab: int, padded: bool) -> list[dict]:
    """Pairs sharing a prompt; chosen and rejected completions of independent lengths."""
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        items = []
        for chosen_total, rejected_total in zip(lengths(g, pairs, seq, padded), lengths(g, pairs, seq, padded)):
            p = prompt_len(g, min(chosen_total, rejected_total))
            prompt = torch.randint(3, vocab, (p,), generator=g)
            item = {}
            for side, total in (("chosen", chosen_total), ("rejected", rejected_total)):
                ids = torch.cat([prompt, torch.randint(3, vocab, (total - p,), generator=g)])
                labels = ids.clone()
                labels[:p] = -100
                item[f"{side}_input_ids"], item[f"{side}_labels"] = ids, labels
            items.append(item)
        out.append(collate_pairs(items, pad_id=0))
    return out


# ---- models ----

class DropFullMask(nn.Module):
    """Passes attention_mask=None when the batch has no padding (what --drop-full-mask tries):
    the fix the pipeline could apply in the trainers' forward calls."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, **kwargs):
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def load_hf(builtin: LlamaForCausalLM) -> nn.Module:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="hf_vs_builtin-") as tmp:
        save_pretrained(builtin, tmp)
        return load_model(tmp)  # as the pipeline loads a transformers model


@torch.no_grad()
def max_logit_diff(builtin: nn.Module, hf: nn.Module, batch: dict, device: torch.device, amp) -> float:
    """Max |logits diff| over real (unpadded) positions: at padding the two differ by design
    (position ids, a padded query's self-attention) and no loss ever reads them."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    with amp():
        a = logits_of(builtin(input_ids=ids, attention_mask=mask)).float()
        b = logits_of(hf(input_ids=ids, attention_mask=mask, use_cache=False)).float()
    return (a - b).abs()[mask.bool()].max().item()


# ---- timing ----

def build_trainer(task: str, model: nn.Module, batches: list[dict], args, device) -> SFTTrainer | DPOTrainer:
    policy = copy.deepcopy(model)
    policy.train()
    if args.drop_full_mask:
        policy = DropFullMask(policy)
    common = dict(optimizer=configure_optimizer(policy, lr=1e-5), device=device, max_steps=len(batches),
                  precision=args.precision, progress_bar=False, seed=None)
    if task == "sft":
        return SFTTrainer(model=policy, train_loader=batches, **common)
    ref = copy.deepcopy(policy)
    return DPOTrainer(model=policy, ref_model=ref, train_loader=batches, precompute_ref_log_probs=False,
                      loss_type="sigmoid", **common)


def profile_step(name: str, trainer, batch: dict, device: torch.device, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    trainer.training_step([batch])  # warm
    with profile(activities=activities) as prof:
        trainer.training_step([batch])
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n--- profile: {name} (one step, top {top} by {sort}) ---")
    print(prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=48))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: the trainers' torch.autocast on the device (weights stay fp32)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per SFT step")
    ap.add_argument("--pairs", type=int, help="pairs per DPO step (default batch/2: the policy sees as many "
                                              "sequences as in SFT)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, help="MLP width (default 3 x hidden, as the tiny preset)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, help="GQA key/value heads (default: = heads)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=10, help="timed steps per model and row (after 1 warm-up)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--drop-full-mask", action="store_true",
                    help="both models get attention_mask=None when a batch has no padding")
    ap.add_argument("--profile", action="store_true", help="also profile one step of each model per row")
    ap.add_argument("--profile-top", type=int, default=15)
    args = ap.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    if unknown := set(rows) - set(ROWS):
        ap.error(f"unknown rows {sorted(unknown)}; valid: {', '.join(ROWS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = args.pairs or max(1, args.batch // 2)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for both

    try:
        import transformers
    except ImportError:
        print("SKIP: bench/hf_vs_builtin.py needs transformers (pip install -e '.[hf]')")
        return

    cfg = get_preset("tiny", vocab_size=args.vocab, hidden_size=args.hidden,
                     intermediate_size=args.intermediate or 3 * args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                     max_position_embeddings=max(args.seq, 256))
    torch.manual_seed(0)
    builtin = LlamaForCausalLM(cfg)
    hf = load_hf(builtin)
    builtin.to(device).eval()
    hf.to(device).eval()

    print(f"device={device} precision={args.precision} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} transformers={transformers.__version__}")
    print(f"model: hidden={cfg.hidden_size} intermediate={cfg.intermediate_size} layers={cfg.num_hidden_layers} "
          f"heads={cfg.num_attention_heads}/{cfg.kv_heads} vocab={cfg.vocab_size} "
          f"params={builtin.num_parameters() / 1e6:.2f}M; hf attn={hf.config._attn_implementation} "
          f"use_cache={hf.config.use_cache}")
    print(f"sft batch {args.batch}x{args.seq}, dpo {pairs} pairs x{args.seq} (policy {2 * pairs} seqs + ref fwd); "
          f"{args.reps} timed reps + 1 warm-up, interleaved AB/BA; drop_full_mask={args.drop_full_mask}")

    n = args.reps + 1
    data = {
        "sft-pad": sft_batches(n, args.batch, args.seq, cfg.vocab_size, padded=True),
        "sft-nopad": sft_batches(n, args.batch, args.seq, cfg.vocab_size, padded=False),
    }
    if any(r.startswith("dpo") for r in rows):
        data["dpo-pad"] = dpo_batches(n, pairs, args.seq, cfg.vocab_size, padded=True)
        data["dpo-nopad"] = dpo_batches(n, pairs, args.seq, cfg.vocab_size, padded=False)

    # Same weights, same logits: fp32 to the README's 1e-4, and under the timed precision.
    fp32 = lambda: torch.autocast(device.type, enabled=False)  # noqa: E731
    bf16 = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    for label in ("sft-pad", "sft-nopad"):
        d = max_logit_diff(builtin, hf, data[label][0], device, fp32)
        print(f"logits max|builtin-hf| fp32 {label:9s} = {d:.2e}")
        assert d < 1e-4, f"the HF model's logits differ from the built-in's by {d:.2e} (> 1e-4)"
        if args.precision == "bf16":
            d16 = max_logit_diff(builtin, hf, data[label][0], device, bf16)
            print(f"logits max|builtin-hf| bf16 {label:9s} = {d16:.2e}  "
                  "(informational: HF rotates q,k in fp32, the built-in in bf16)")

    models = {"builtin": builtin, "hf": hf}
    trainers = {(row, kind): build_trainer(row.split("-")[0], models[kind], data[row], args, device)
                for row in rows for kind in KINDS}
    rates = {key: [] for key in trainers}
    for rep in range(n):
        order = KINDS if rep % 2 == 0 else KINDS[::-1]
        for row in rows:
            for kind in order:
                trainer, batch = trainers[(row, kind)], data[row][rep]
                out = {}
                t = seconds(lambda: out.update(trainer.training_step([batch])), device)
                if rep > 0:  # rep 0 warms up: allocator, kernels, optimizer state
                    rates[(row, kind)].append(out["tokens"] / t)

    # hf/builtin = median of the per-repetition ratios: the two steps of a repetition ran back to
    # back, so a load change on the machine cancels out of each ratio (the ratio of the medians is
    # shown beside it).
    print(f"\n{'row':10s} {'builtin tok/s':>14s} {'hf tok/s':>10s} {'hf/builtin':>10s} {'of medians':>10s}  "
          f"(medians of {args.reps} reps)")
    verdicts = {}
    for row in rows:
        b, h = statistics.median(rates[(row, "builtin")]), statistics.median(rates[(row, "hf")])
        verdicts[row] = statistics.median(x / y for x, y in zip(rates[(row, "hf")], rates[(row, "builtin")]))
        print(f"{row:10s} {b:14,.0f} {h:10,.0f} {verdicts[row]:10.3f} {h / b:10.3f}  "
              f"{'PASS' if verdicts[row] >= TARGET else 'FAIL'}")
    worst = min(verdicts, key=verdicts.get)
    print(f"{'PASS' if verdicts[worst] >= TARGET else 'FAIL'}: hf/builtin >= {TARGET} on every row "
          f"(lowest {verdicts[worst]:.3f}, {worst})")

    if args.profile:
        for row in rows:
            for kind in KINDS:
                profile_step(f"{row} {kind}", trainers[(row, kind)], data[row][0], device, args.profile_top)


if __name__ == "__main__":
    main()
