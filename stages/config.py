"""Pipeline configuration: pydantic models, YAML presets, dotted-key overrides (design.md §5).

Prefect validates flow parameters with these models and draws them as a form in its UI, so
every field has a default and a description where the name alone does not say enough."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

PRESET_DIR = Path(__file__).parent / "presets"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silent default


class DataConfig(Strict):
    source: str = Field("demo", description="'demo' (built-in task) or a local file/dir: "
                                            "jsonl, json, parquet, csv, or a datasets save_to_disk directory")
    val_source: str | None = Field(None, description="held-out data; default: split val_fraction off source")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_length: int = Field(128, gt=8, description="tokens per example (pretraining: block size)")
    too_long: Literal["drop", "error"] = "drop"
    on_bad_rows: Literal["error", "skip"] = "error"


class TrainConfig(Strict):
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    warmup_steps: int = 10
    batch_size: int = Field(16, gt=0, description="per process, per micro-step")
    grad_accum_steps: int = Field(1, gt=0)
    max_steps: int | None = Field(None, description="optimizer steps; overrides max_epochs")
    max_epochs: int = 1
    max_grad_norm: float | None = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    log_interval: int = 10
    eval_interval: int | None = None
    save_interval: int | None = Field(50, description="steps between resumable checkpoints")
    keep_last: int = 2
    seed: int = 0
    compile: bool = False
    nproc_per_node: int = Field(1, ge=1, description=">1 launches the stage with torchrun")
    nnodes: int = Field(1, ge=1)


class EvalConfig(Strict):
    max_prompts: int = Field(64, description="held-out prompts for the task metrics")
    max_new_tokens: int = 16
    reward_samples: int = Field(8, ge=0, description="sampled completions per prompt for the held-out mean reward (0: greedy)")


class PretrainConfig(Strict):
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()


class SFTConfig(Strict):
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()


class DPOConfig(Strict):
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig(lr=1e-4, warmup_steps=0)
    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: float = 0.0
    precompute_ref_log_probs: bool = True


class GRPOConfig(Strict):
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig(lr=1e-4, warmup_steps=0, batch_size=4)
    num_generations: int = 8
    max_completion_length: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: Literal["dapo", "grpo", "bnpo", "dr_grpo"] = "dapo"
    num_iterations: int = 1
    scale_rewards: Literal["group", "batch", "none"] = "group"
    reward_funcs: list[str] = ["exact_match", "format"]
    reward_weights: list[float] | None = None


class DemoConfig(Strict):
    seed: int = 0
    pretrain_docs: int = 4000
    sft_examples: int = 2000
    preference_pairs: int = 1000
    grpo_prompts: int = 400
    eval_prompts: int = 100


class PipelineConfig(Strict):
    preset: str = "tiny"
    model: str = Field("tiny", description="built-in model preset (models.PRESETS)")
    vocab_size: int = Field(1024, description="tokenizer trained on the pretraining corpus")
    runs_dir: str = "runs"
    run_id: str | None = Field(None, description="default: the preset's name")
    device: str | None = Field(None, description="default: cuda if available, else cpu")
    retries: int = Field(1, ge=0, description="Prefect retries per stage; a retry resumes from the stage's last checkpoint")
    demo: DemoConfig = DemoConfig()
    eval: EvalConfig = EvalConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sft: SFTConfig = SFTConfig()
    dpo: DPOConfig = DPOConfig()
    grpo: GRPOConfig = GRPOConfig()

    def stage(self, name: str) -> BaseModel:
        return getattr(self, name)

    def resolved_run_id(self) -> str:
        return self.run_id or self.preset


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """`sft.train.lr` -> tree["sft"]["train"]["lr"] = value."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def parse_override(item: str) -> tuple[str, Any]:
    """'dpo.beta=0.2' -> ('dpo.beta', 0.2); the value is read as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value (e.g. dpo.beta=0.2)")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def load_config(preset: str = "tiny", file: str | Path | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> PipelineConfig:
    """Preset YAML, then a user YAML file on top, then dotted overrides on top of that."""
    path = PRESET_DIR / f"{preset}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(names)}")
    tree = yaml.safe_load(path.read_text()) or {}
    tree["preset"] = preset
    if file is not None:
        try:
            user = yaml.safe_load(Path(file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read config file {file}: {e}") from e
        tree = _merge(tree, user)
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    for key, value in items:
        set_dotted(tree, key, value)
    return PipelineConfig.model_validate(tree)


def config_hash(obj: BaseModel | dict) -> str:
    data = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
