"""What every stage does around its trainer: set up, build loaders and the trainer's
arguments, evaluate on held-out prompts, and write the checkpoint directory."""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from models import Tokenizer, generate, save_pretrained
from trainers import configure_optimizer, create_scheduler
from trainers import distributed as dist_utils
from trainers.base import BaseTrainer, unwrap
from trainers.grpo import collate_prompts
from trainers.rewards import get_reward

from . import data as data_mod
from . import handoff, storage
from .config import PipelineConfig, TrainConfig, config_hash

SHARED_KEYS = ("model", "vocab_size", "demo", "eval")
PRECISION = {"fp32": (False, "bfloat16"), "bf16": (True, "bfloat16"), "fp16": (True, "float16")}


def stage_config(config: PipelineConfig, stage: str) -> dict:
    """The part of the pipeline config a stage's output depends on (its cache key)."""
    dumped = config.model_dump(mode="json")
    return {"stage": stage, stage: dumped[stage], **{k: dumped[k] for k in SHARED_KEYS}}


@dataclass
class StageRun:
    """Everything a stage's `run` shares with the helpers below."""
    stage: str
    config: PipelineConfig
    out_dir: Path  # the local working directory
    parent_dir: Path | None  # a verified local copy of the parent
    out_ref: str = ""  # where the stage is published: out_dir itself, or an fsspec URL
    parent_ref: str | None = None  # the parent as given (path or URL), recorded as lineage
    parent_manifest: dict | None = None
    dist: dist_utils.DistInfo = field(default_factory=dist_utils.detect)
    device: torch.device = torch.device("cpu")
    started: float = field(default_factory=time.time)
    data_notes: dict = field(default_factory=dict)

    @property
    def train_cfg(self) -> TrainConfig:
        return self.config.stage(self.stage).train

    @property
    def config_hash(self) -> str:
        return config_hash(stage_config(self.config, self.stage))

    @property
    def parent_hash(self) -> str | None:
        return self.parent_manifest["content_hash"] if self.parent_manifest else None


def begin(stage: str, config: PipelineConfig, parent_dir: str | Path | None, out_dir: str | Path) -> StageRun:
    """Join the process group (if torchrun started us), fetch and verify the parent, prepare the
    local working directory. Either may be an fsspec URL (stages.storage)."""
    info = dist_utils.detect()
    device = torch.device(config.device) if config.device else dist_utils.default_device(info)
    dist_utils.setup(device)
    run = StageRun(stage, config, storage.local_dir(out_dir), None, out_ref=str(out_dir),
                   parent_ref=str(parent_dir) if parent_dir else None, dist=info, device=device)
    if run.parent_ref is not None:
        if info.local_rank == 0:  # one download per node
            storage.localize(run.parent_ref)
        dist_utils.barrier()
        run.parent_dir = storage.local_dir(run.parent_ref)
        run.parent_manifest = handoff.verify(run.parent_dir)
    if info.is_main:
        handoff.prepare_out_dir(run.out_dir, run.config_hash, run.parent_hash)
        if storage.is_url(run.out_ref):  # a retry in another pod resumes from the mirrored state
            storage.restore_checkpoint(run.out_ref, run.out_dir)
    dist_utils.barrier()
    return run


def load_data(run: StageRun, kind: str, tok: Tokenizer, split: str) -> data_mod.LoadedData:
    loaded = data_mod.prepare(kind, run.config.stage(run.stage).data, run.config.demo, tok, split)
    run.data_notes[split] = {"origin": loaded.origin, "rows": len(loaded.dataset), "skipped_bad_rows": loaded.skipped,
                             "dropped_too_long": loaded.dropped_too_long,
                             "fingerprint": getattr(loaded.dataset, "_fingerprint", None)}
    return loaded


def make_loader(run: StageRun, dataset, collate, shuffle: bool) -> DataLoader:
    """A DistributedSampler even in one process: its order is a function of (seed, epoch), and
    N ranks with batch B together see exactly the batches one process sees with batch N*B."""
    sampler = DistributedSampler(dataset, num_replicas=run.dist.world_size, rank=run.dist.rank,
                                 shuffle=shuffle, seed=run.train_cfg.seed)
    return DataLoader(dataset, batch_size=run.train_cfg.batch_size, sampler=sampler, collate_fn=collate)


def trainer_kwargs(run: StageRun) -> dict:
    t = run.train_cfg
    use_amp, amp_dtype = PRECISION[t.precision]
    # As in HF's Trainer, max_steps (when set) replaces the epoch limit rather than racing it.
    return dict(device=run.device, max_epochs=None if t.max_steps else t.max_epochs, max_steps=t.max_steps,
                grad_accum_steps=t.grad_accum_steps, max_grad_norm=t.max_grad_norm, use_amp=use_amp,
                amp_dtype=amp_dtype, log_interval=t.log_interval, eval_interval=t.eval_interval,
                save_dir=run.out_dir, save_interval=t.save_interval, keep_last=t.keep_last, seed=t.seed,
                on_checkpoint=checkpoint_mirror(run), compile=t.compile)


def checkpoint_mirror(run: StageRun):
    """For a stage published at a URL: copy each training checkpoint there as well."""
    if not storage.is_url(run.out_ref):
        return None
    return lambda step_dir: storage.mirror_checkpoint(run.out_dir, step_dir, run.out_ref)


def optimizer_for(model: torch.nn.Module, run: StageRun) -> torch.optim.Optimizer:
    t = run.train_cfg
    return configure_optimizer(model, t.optimizer, lr=t.lr, weight_decay=t.weight_decay, betas=t.betas)


def loaders(run: StageRun, train: data_mod.LoadedData, val: data_mod.LoadedData, collate) -> dict:
    return {"train_loader": make_loader(run, train.dataset, collate, shuffle=True),
            "val_loader": make_loader(run, val.dataset, collate, shuffle=False) if len(val.dataset) else None}


def train_and_finish(run: StageRun, trainer: BaseTrainer, tok: Tokenizer) -> dict | None:
    """Schedule, train (resuming from this stage's last checkpoint if a retry finds one),
    evaluate on held-out prompts, write the checkpoint directory."""
    t = run.train_cfg
    trainer.scheduler = create_scheduler(trainer.optimizer, t.schedule, warmup_steps=t.warmup_steps,
                                         total_steps=(trainer.estimated_total_steps() or 1000) * trainer.updates_per_step,
                                         min_lr_ratio=t.min_lr_ratio)
    started = time.time()
    metrics = trainer.train(resume_from="latest")
    train_seconds = time.time() - started
    model = unwrap(trainer.model)
    evaluation = (task_accuracy(run.config, run.config.stage(run.stage).data, model, tok, run.device)
                  if run.dist.is_main else {})
    return finish(run, model, tok, metrics, evaluation, train_seconds)


@torch.no_grad()
def _complete(model, rows: list[dict], tok: Tokenizer, device, max_new_tokens: int, temperature: float,
              generator: torch.Generator | None = None) -> list[str]:
    batch = collate_prompts(rows, tok.pad_id)
    prompt = batch["prompt_input_ids"].to(device)
    out = generate(model, prompt, batch["prompt_attention_mask"].to(device), max_new_tokens=max_new_tokens,
                   temperature=temperature, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, generator=generator)
    return [tok.decode(ids) for ids in out[:, prompt.shape[1]:].tolist()]


def _score(fns, weights, rows: list[dict], completions: list[str]) -> list[float]:
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    per_fn = [fn(prompts, completions, answer=answers) for fn in fns]
    return [sum(w * (v or 0.0) for w, v in zip(weights, values)) for values in zip(*per_fn)]


def task_accuracy(config: PipelineConfig, data_cfg, model: torch.nn.Module, tok: Tokenizer,
                  device: torch.device | str) -> dict:
    """Task metrics on the demo's held-out prompts, the same prompts for every stage so the
    numbers compare. Greedy decoding gives exact-match accuracy and format rate; the held-out
    reward is the GRPO reward (its functions and weights) averaged over `eval.reward_samples`
    seeded samples per prompt at GRPO's sampling temperature -- the quantity GRPO maximises, so
    it shows a policy growing surer of right answers even where the greedy answer is unchanged.
    User data without answers gets no task metrics."""
    if data_cfg.source != "demo":
        return {}
    loaded = data_mod.prepare("eval", data_cfg, config.demo, tok, "val")
    ds = loaded.dataset.select(range(min(len(loaded.dataset), config.eval.max_prompts)))
    model = unwrap(model)
    grpo, ev = config.grpo, config.eval
    reward_fns = [get_reward(name) for name in grpo.reward_funcs]
    weights = grpo.reward_weights or [1.0] * len(reward_fns)
    generator = torch.Generator(device=device).manual_seed(config.demo.seed)
    hits, formatted, greedy, sampled, samples = [], [], [], [], []
    for start in range(0, len(ds), 32):
        rows = [ds[i] for i in range(start, min(start + 32, len(ds)))]
        completions = _complete(model, rows, tok, device, ev.max_new_tokens, 0.0)
        hits += _score([get_reward("exact_match")], [1.0], rows, completions)
        formatted += _score([get_reward("format")], [1.0], rows, completions)
        greedy += _score(reward_fns, weights, rows, completions)
        samples += [{"prompt": r["prompt"], "completion": c, "answer": r["answer"]} for r, c in zip(rows, completions)]
        repeated = [r for r in rows for _ in range(ev.reward_samples)]
        if repeated:
            drawn = _complete(model, repeated, tok, device, ev.max_new_tokens, grpo.temperature, generator)
            sampled += _score(reward_fns, weights, repeated, drawn)
    n = max(len(hits), 1)
    return {"task_accuracy": sum(hits) / n, "format_rate": sum(formatted) / n, "greedy_reward": sum(greedy) / n,
            "heldout_reward": sum(sampled) / len(sampled) if sampled else sum(greedy) / n, "eval_prompts": len(hits), "samples": samples[:5]}


def package_versions() -> dict:
    names = ["alignflow", "torch", "safetensors", "tokenizers", "datasets", "pydantic"]
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def finish(run: StageRun, model: torch.nn.Module, tok: Tokenizer, metrics: dict, evaluation: dict,
           train_seconds: float) -> dict:
    """Write weights, tokenizer and, last, the manifest (rank 0); return the stage result."""
    result = None
    if run.dist.is_main:
        save_pretrained(unwrap(model), str(run.out_dir))
        tok.save(str(run.out_dir / "tokenizer.json"))
        tokens = metrics.get("tokens", 0.0)
        manifest = handoff.write_manifest(run.out_dir, {
            "stage": run.stage,
            "run_id": run.config.resolved_run_id(),
            "config": stage_config(run.config, run.stage),
            "config_hash": run.config_hash,
            "parent": ({"path": run.parent_ref, "content_hash": run.parent_hash, "stage": run.parent_manifest["stage"]}
                       if run.parent_dir else None),
            "data": run.data_notes,
            "metrics": {**metrics, **evaluation},
            "timings": {"wall_seconds": round(time.time() - run.started, 2), "train_seconds": round(train_seconds, 2),
                        "tokens_per_second": round(tokens / train_seconds, 1) if train_seconds > 0 else None},
            "world_size": run.dist.world_size,
            "device": str(run.device),
            "versions": package_versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        if storage.is_url(run.out_ref):
            storage.publish(run.out_dir, run.out_ref)
        result = stage_result(run.out_ref, manifest)
    dist_utils.barrier()
    return result


def stage_result(out_ref: str | Path, manifest: dict) -> dict:
    """What a stage hands the next one (and the flow): where it is and what it contains."""
    return {"stage": manifest["stage"], "path": str(out_ref), "content_hash": manifest["content_hash"],
            "metrics": manifest["metrics"], "timings": manifest["timings"]}
