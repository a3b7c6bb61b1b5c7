"""The two sides of bench/vs_trl.py: alignflow's and TRL's SFT and DPO trainers on the same
model directory and data, each timed at the end of its own optimizer steps."""
from __future__ import annotations

import functools
import time

import torch

from alignflow.trainers import configure_optimizer
from alignflow.trainers.dpo import DPOTrainer, collate_pairs
from alignflow.trainers.packing import pack_examples
from alignflow.trainers.sft import SFTTrainer, collate_causal_lm

from vs_trl_data import Counting, Result, as_alignflow_pair, load_model, mean_len  # bench/, beside this script

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
