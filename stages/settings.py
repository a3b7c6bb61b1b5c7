"""The settings the pipeline's configuration is built from: each stage's section (`StageConfig`
and its parts) and the shared sections (data sizes of the demo, evaluation, how models load).
The stage sections themselves sit with their algorithms (e.g. `DPOConfig` in
stages/recipes/dpo.py), and stages/config.py composes everything into `PipelineConfig`.

A stage's section is a `StageConfig`: `data` (where its rows come from and how long they may
be), `train` (the trainers' `TrainingArgs` plus the optimizer, batch and launch settings) and
`lora`; an algorithm adds its own settings by subclassing it together with its trainer's
(`class DPOConfig(DPOArgs, StageConfig)`). Prefect draws these models as its UI form, so every
field has a default and a description where the name alone does not say enough."""
from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from alignflow.models.lora import LoRAConfig
from alignflow.trainers.args import Settings, TrainingArgs
from alignflow.trainers.rewards import DEFAULT_REWARDS, required_columns

# Sections every stage's output depends on: the model and how it is loaded, the tokenizer, the
# demo data, evaluation.
SHARED_KEYS = ("model", "hf", "vocab_size", "demo", "eval")


class DataConfig(Settings):
    source: str = Field("demo", description="'demo' (built-in task) or a local file/dir: "
                                            "jsonl, json, parquet, csv, or a datasets save_to_disk directory")
    val_source: str | None = Field(None, description="held-out data; default: split val_fraction off source")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_val_rows: int | None = Field(2000, ge=1, description="held-out rows the validation loss runs over at most: a "
                                                             "larger held-out split is cut to a seeded sample of this "
                                                             "many, the same every run (None: all of them)")
    max_length: int = Field(128, gt=8, description="tokens per example (pretraining: block size)")
    too_long: Literal["drop", "error"] = "drop"
    on_bad_rows: Literal["error", "skip"] = "error"
    multi_turn: Literal["auto", "expand", "last", "refuse"] = Field(
        "auto", description="conversations with several replies: one example each (auto: when the chat template "
                            "renders earlier turns as at inference, else one example per reply), expand (always "
                            "one per reply), last (only the last reply), refuse (error unless one example fits)")


class TrainConfig(TrainingArgs):
    """The trainer's loop settings (`trainers.TrainingArgs`: steps, accumulation, precision,
    clipping, schedule, checkpoints) plus what the stage builds around the trainer."""
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    batch_size: int = Field(16, gt=0, description="per process, per micro-step")
    nproc_per_node: int = Field(1, ge=1, description=">1 launches the stage with torchrun")
    nnodes: int = Field(1, ge=1)

    @property
    def needs_torchrun(self) -> bool:
        """Several processes, or a process group for one (`needs_process_group`): the flow
        launches the stage with torchrun instead of running it in its own process."""
        return self.nproc_per_node > 1 or self.nnodes > 1 or self.needs_process_group


class StageConfig(Settings):
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    lora: LoRAConfig | None = Field(None, description="train a LoRA adapter instead of every weight "
                                                      "(absent: full fine-tuning)")

    @model_validator(mode="before")
    @classmethod
    def _keep_the_algorithms_defaults(cls, values):
        """A section given as a dict (a preset, `--set dpo.train.max_steps=5`) is laid over the
        algorithm's own defaults, not the generic ones: DPO's `train` defaults to lr 1e-4, and
        naming another of its keys must not reset that to TrainConfig's 1e-3."""
        if not isinstance(values, dict):
            return values
        merged = dict(values)
        for name, field in cls.model_fields.items():
            default, given = field.default, values.get(name)
            if isinstance(default, Settings) and isinstance(given, dict):
                merged[name] = {**default.model_dump(include=default.model_fields_set), **given}
        return merged

    @property
    def quantized(self) -> bool:
        return self.lora is not None and self.lora.quantize != "none"

    @model_validator(mode="after")
    def _qlora_runs_under_ddp(self) -> "StageConfig":
        if self.quantized and self.train.strategy == "fsdp":
            raise ValueError("lora.quantize: 4bit with train.strategy: fsdp is not supported: QLoRA trains under ddp")
        return self


EVAL_COLUMNS = ("answer",)  # what stages/evaluation.py hands each reward function


class EvalConfig(Settings):
    """Held-out evaluation of every stage (stages/evaluation.py). Part of every stage's cache
    key: changing it re-runs the stages whose numbers it changes."""
    max_prompts: int = Field(64, ge=1, description="held-out prompts for the task metrics")
    max_new_tokens: int = Field(16, ge=1)
    reward_samples: int = Field(8, ge=0, description="sampled completions per prompt for the held-out mean reward (0: greedy)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the held-out reward")
    reward_funcs: list[str] = Field(DEFAULT_REWARDS, min_length=1,
                                    description="reward functions of the held-out reward (by default GRPO's)")
    reward_weights: list[float] | None = None

    @field_validator("reward_funcs")
    @classmethod
    def _held_out_rows_have_the_columns(cls, names: list[str]) -> list[str]:
        # The held-out prompts carry only `answer`: a function reading another column would
        # score no row, and the held-out reward would silently count it as 0.
        unknown = {c: fns for c, fns in required_columns(names).items() if c not in EVAL_COLUMNS}
        if unknown:
            raise ValueError("the held-out prompts have only " + ", ".join(EVAL_COLUMNS) + "; " +
                             "; ".join(f"{', '.join(fns)} reads {c!r}" for c, fns in unknown.items()))
        return names


class DemoConfig(Settings):
    seed: int = 0
    pretrain_docs: int = Field(4000, ge=1)
    sft_examples: int = Field(2000, ge=1)
    preference_pairs: int = Field(1000, ge=1)
    grpo_prompts: int = Field(400, ge=1)
    eval_prompts: int = Field(100, ge=1)


class HFConfig(Settings):
    """How models and tokenizers are loaded from Hugging Face model directories (the `model` one,
    and every stage directory after it), and how stage directories are written."""
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights' dtype; float32 keeps fp32 master weights under train.precision bf16/fp16")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="transformers' attention kernel (flash_attention_2 needs the flash-attn package)")
    trust_remote_code: bool = Field(False, description="run code a model directory ships (auto_map); off: refused")
    chat_template: str | None = Field(None, description="a Jinja chat template file replacing the tokenizer's own")
    max_shard_size: str = Field("5GB", description="stage outputs above this are saved in safetensors shards")


def plain_name(value: str, what: str) -> str:
    """`value` if it can name one directory inside another (a run id under runs_dir): not empty,
    no path separator, not `.` or `..`. A run id is also a flow parameter a deployment's form
    passes, so it is checked wherever it arrives, not only on the command line."""
    if not value or value in (".", "..") or any(c in value for c in "/\\\0") or value != value.strip():
        raise ValueError(f"{what} {value!r} is not a plain name: it names a directory under runs_dir, so it "
                         "may not be empty, contain '/' or '\\', be '.' or '..', or start or end with a space")
    return value


def config_hash(obj: BaseModel | dict) -> str:
    data = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
