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


def stamp_steps(trainer, metrics: list[dict] | None = None) -> tuple[list[float], list[float]]:
    """Time at the end of every `training_step` of an alignflow trainer, and its losses (and,
    given a list, each step's metrics appended to it)."""
    stamps: list[float] = []
    losses: list[float] = []
    inner = trainer.training_step

    def timed(micro):
        out = inner(micro)
        stamps.append(time.perf_counter())
        losses.append(out["loss"])
        if metrics is not None:
            metrics.append(out)
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


def run_sft_alignflow(args, model_dir: str, examples: list[dict], pad_id: int,
                      packed: bool = True) -> tuple[Result, dict]:
    """`packed`: pack_examples rows, `args.rows` a step; else `args.batch` examples a step, each
    batch right-padded to its longest example."""
    from torch.utils.data import DataLoader

    n = args.warmup + args.steps
    model = load_model(model_dir)
    collate = functools.partial(collate_causal_lm, pad_id=pad_id)
    if packed:
        rows, per_step_rows = pack_examples(examples, args.max_length), args.rows
        info = {"batching": (f"pack_examples -> {len(rows)} packed rows (mean {mean_len(rows):.0f} "
                             f"tokens), {args.rows} rows/step, collate_causal_lm")}
    else:
        rows, per_step_rows = examples, args.batch
        info = {"batching": f"{args.batch} examples/step, collate_causal_lm (right-padded to the batch's longest)"}
    counter = Counting(collate, args.max_length)
    loader = DataLoader(rows, batch_size=per_step_rows, shuffle=False, collate_fn=counter)
    trainer = SFTTrainer(model=model, optimizer=configure_optimizer(model, lr=args.lr, weight_decay=0.01),
                         train_loader=loader, **alignflow_common(args, n))
    seen = arguments_received(model)
    stamps, losses = stamp_steps(trainer)
    trainer.train()
    info["model_kwargs"] = dict(seen)
    info["optimizer"] = optimizer_name(trainer.optimizer, "configure_optimizer")
    return Result("alignflow", stamps, counter, args.warmup, args.steps, losses), info


def run_sft_trl(args, model_dir: str, examples: list[dict], tok, out_dir: str,
                accumulate: bool = False, packed: bool = True) -> tuple[Result, dict]:
    """`accumulate`: one packed row per forward, `rows` forwards accumulated per step (the same
    tokens per optimizer step without flattening the rows into one sequence). Not `packed`:
    `packing=False, padding_free=False`, `args.batch` examples a step, padded to the longest."""
    if not packed:
        return run_sft_trl_padded(args, model_dir, examples, tok, out_dir)
    from trl import SFTConfig

    n = args.warmup + args.steps
    per_forward, accum = (1, args.rows) if accumulate else (args.rows, 1)
    common = trl_common(args, n, out_dir)
    common["gradient_accumulation_steps"] = accum
    config = SFTConfig(per_device_train_batch_size=per_forward, max_length=args.max_length, packing=True,
                       packing_strategy="bfd", padding_free=True, completion_only_loss=None, **common)
    trainer, stamps, counter, seen = trl_sft_trainer(args, model_dir, examples, tok, config)
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


def run_sft_trl_padded(args, model_dir: str, examples: list[dict], tok, out_dir: str) -> tuple[Result, dict]:
    from trl import SFTConfig

    n = args.warmup + args.steps
    config = SFTConfig(per_device_train_batch_size=args.batch, max_length=args.max_length, packing=False,
                       padding_free=False, completion_only_loss=None, **trl_common(args, n, out_dir))
    trainer, stamps, counter, seen = trl_sft_trainer(args, model_dir, examples, tok, config)
    losses = step_losses(trainer, 1)
    trainer.train()
    info = {"padding_free": trainer.padding_free, "model_kwargs": dict(seen),
            "batching": f"packing=False, padding_free={trainer.padding_free}, {args.batch} examples/step (padded)",
            "optimizer": optimizer_name(trainer.optimizer, config.optim)}
    return Result("trl", stamps.stamps, counter, args.warmup, args.steps, losses), info


def trl_sft_trainer(args, model_dir: str, examples: list[dict], tok, config):
    """TRL's SFTTrainer on the pre-tokenised examples, instrumented as every TRL side is: (trainer,
    step stamps, the collator's token counter, the keyword arguments the model received)."""
    from datasets import Dataset
    from trl import SFTTrainer as TRLSFTTrainer

    model = load_model(model_dir)
    data = Dataset.from_dict({"input_ids": [x["input_ids"] for x in examples],
                              "labels": [x["labels"] for x in examples]})
    stamps = trl_stamps()
    trainer = TRLSFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[stamps])
    silence(trainer)
    counter = Counting(trainer.data_collator, args.max_length)
    trainer.data_collator = counter
    return trainer, stamps, counter, arguments_received(model)


def optimizer_name(optimizer, name) -> str:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    flags = [k for k in ("fused", "foreach") if inner.defaults.get(k)]
    return f"{type(inner).__name__}({', '.join(flags) or 'for-loop'}; optim={getattr(name, 'value', name)})"


def run_dpo_alignflow(args, model_dir: str, pairs: list[dict], pad_id: int,
                      precompute: bool = True) -> tuple[Result, dict]:
    from torch.utils.data import DataLoader

    n = args.warmup + args.steps
    model, ref = load_model(model_dir), load_model(model_dir)
    items = [as_alignflow_pair(p) for p in pairs]
    counter = Counting(functools.partial(collate_pairs, pad_id=pad_id), args.dpo_max_length)
    loader = DataLoader(items, batch_size=args.pairs, shuffle=False, collate_fn=counter)
    optimizer = configure_optimizer(model, lr=args.lr, weight_decay=0.01)
    trainer = DPOTrainer(model=model, ref_model=ref, optimizer=optimizer, train_loader=loader,
                         precompute_ref_log_probs=precompute, beta=args.beta, loss_type="sigmoid",
                         **alignflow_common(args, n))
    del ref
    if precompute:
        trainer.precompute_reference_logps()  # the one-off scoring pass, as TRL's happens in its __init__
        counter.reset()
    seen = arguments_received(model)
    stamps, losses = stamp_steps(trainer)
    trainer.train()
    return Result("alignflow", stamps, counter, args.warmup, args.steps, losses), {
        "model_kwargs": dict(seen), "optimizer": optimizer_name(trainer.optimizer, "configure_optimizer")}


def run_dpo_trl(args, model_dir: str, texts: list[dict], pairs: list[dict], tok, out_dir: str,
                precompute: bool = True) -> tuple[Result, dict]:
    """`precompute`: precompute_ref_log_probs=True (no reference model kept); else a live reference,
    the same model directory loaded the same way, run under no_grad every step."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer as TRLDPOTrainer

    n = args.warmup + args.steps
    model = load_model(model_dir)
    # padding_free=True is asked for; TRL versions that cannot do it for DPO turn it off (reported)
    config = DPOConfig(per_device_train_batch_size=args.pairs, max_length=args.dpo_max_length, beta=args.beta,
                       loss_type=["sigmoid"], precompute_ref_log_probs=precompute, padding_free=True,
                       **trl_common(args, n, out_dir))
    stamps = trl_stamps()
    ref = None if precompute else load_model(model_dir)
    trainer = TRLDPOTrainer(model=model, ref_model=ref, args=config, train_dataset=Dataset.from_list(texts),
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


# ---- GRPO ----

def completion_reward(prompts, completions, **columns):
    """Deterministic in the completion text: the fraction of distinct words (varies within every
    group, so each step does real policy-gradient work). Same function on both sides."""
    return [len(set(c.split())) / max(len(c.split()), 1) for c in completions]


def grpo_prompts(args, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(args.seed + 2)
    n = (args.warmup + args.steps) * args.prompts
    return torch.randint(3, vocab, (n, args.prompt_len), generator=g).tolist()


def no_eos_generate(eos_id: int):
    """alignflow's generate_text with the EOS logit at -inf while sampling (a hook on the LM head,
    removed after): every completion is exactly max_completion_length tokens, as TRL's
    `min_new_tokens=max_completion_length` makes its own."""
    from alignflow.models import generate_text

    def generate_fn(model, tokenizer, prompts, **kwargs):
        def hook(module, inputs, output):
            output[..., eos_id] = float("-inf")
            return output

        handle = model.get_output_embeddings().register_forward_hook(hook)
        try:
            return generate_text(model, tokenizer, prompts, **kwargs)
        finally:
            handle.remove()

    return generate_fn


class StepResult:
    """Optimizer steps per second of the timed steps, completion tokens generated, generation seconds."""

    def __init__(self, side, stamps, warmup, steps, tokens, gen_seconds, losses):
        n = warmup + steps
        if len(stamps) < n:
            raise RuntimeError(f"{side}: {len(stamps)} steps ran, {n} expected")
        self.side, self.steps, self.losses = side, steps, losses[:2]
        self.seconds = stamps[n - 1] - stamps[warmup - 1]
        self.tokens, self.gen_seconds = tokens, gen_seconds

    @property
    def rate(self) -> float:
        return self.steps / self.seconds


def run_grpo_alignflow(args, model_dir: str, tok, beta: float) -> tuple[StepResult, dict]:
    from torch.utils.data import DataLoader

    from alignflow.trainers.grpo import GRPOTrainer, collate_prompts

    n = args.warmup + args.steps
    model = load_model(model_dir)
    ref = load_model(model_dir) if beta else None
    items = [{"prompt_input_ids": p} for p in grpo_prompts(args, model.config.vocab_size)]
    loader = DataLoader(items, batch_size=args.prompts, shuffle=False,
                        collate_fn=functools.partial(collate_prompts, pad_id=tok.pad_token_id))
    trainer = GRPOTrainer(model, ref, configure_optimizer(model, lr=args.lr, weight_decay=0.01), loader,
                          [completion_reward], generate_fn=no_eos_generate(tok.eos_token_id), tokenizer=tok,
                          num_generations=args.generations, max_completion_length=args.new_tokens,
                          temperature=1.0, beta=beta, num_iterations=1, loss_type="dapo",
                          **alignflow_common(args, n))
    del ref
    metrics: list[dict] = []
    stamps, losses = stamp_steps(trainer, metrics)
    trainer.train()
    timed_metrics = metrics[args.warmup:n]
    step_s = [b - a for a, b in zip(stamps[args.warmup - 1:n - 1], stamps[args.warmup:n])]
    gen = sum(m["time/generation_share"] * s for m, s in zip(timed_metrics, step_s))
    tokens = sum(m["completion_length/mean"] * args.prompts * args.generations for m in timed_metrics)
    lengths = sorted({m["completion_length/mean"] for m in timed_metrics})
    return StepResult("alignflow", stamps, args.warmup, args.steps, int(tokens), gen, losses), {
        "optimizer": optimizer_name(trainer.optimizer, "configure_optimizer"),
        "lengths": f"mean completion length per step {lengths}"}


def run_grpo_trl(args, model_dir: str, tok, out_dir: str, beta: float) -> tuple[StepResult, dict]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer as TRLGRPOTrainer

    n = args.warmup + args.steps
    model = load_model(model_dir)
    prompts = [" ".join(f"w{i}" for i in p) for p in grpo_prompts(args, model.config.vocab_size)]
    common = trl_common(args, n, out_dir)
    config = GRPOConfig(per_device_train_batch_size=args.prompts * args.generations,
                        num_generations=args.generations, max_completion_length=args.new_tokens,
                        temperature=1.0, top_p=1.0, top_k=0, beta=beta, num_iterations=1, loss_type="dapo",
                        scale_rewards="group", epsilon=0.2, use_vllm=False, shuffle_dataset=False,
                        generation_kwargs={"min_new_tokens": args.new_tokens}, **common)
    stamps = trl_stamps()
    trainer = TRLGRPOTrainer(model=model, reward_funcs=[completion_reward], args=config,
                             train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                             callbacks=[stamps])
    silence(trainer)
    gen_times: list[float] = []
    tokens: list[int] = []
    inner = trainer._generate_single_turn

    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        out = inner(*a, **k)
        gen_times.append(time.perf_counter() - t0)
        tokens.append(sum(len(c) for c in out[0]))
        return out

    trainer._generate_single_turn = timed_generate
    losses = step_losses(trainer, 1)
    trainer.train()
    return StepResult("trl", stamps.stamps, args.warmup, args.steps, sum(tokens[args.warmup:n]),
                      sum(gen_times[args.warmup:n]), losses), {
        "optimizer": optimizer_name(trainer.optimizer, config.optim),
        "ref_model": type(trainer.ref_model).__name__ if trainer.ref_model is not None else None}
