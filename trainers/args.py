"""Settings as pydantic models: each setting, its default and its validation written once.

`TrainingArgs` holds the loop's settings (what every algorithm shares); each algorithm module
has its own (`trainers.dpo.DPOArgs`, `trainers.grpo.GRPOArgs`). A trainer takes them as objects
or as plain keywords (the seeds' API: `SFTTrainer(model=..., max_epochs=3, use_amp=True)`),
and the pipeline's configuration embeds the same classes, so a setting has one default
whether it comes from a YAML preset or a Python call."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignflow.models.dtypes import short_name

Precision = Literal["fp32", "bf16", "fp16"]
ScheduleName = Literal["cosine", "linear", "constant", "wsd"]


class Settings(BaseModel):
    """A settings model: a misspelt key is an error, not a silently ignored default."""
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def take(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Pop this model's fields out of `kwargs` (the rest is somebody else's)."""
        return {name: kwargs.pop(name) for name in list(kwargs) if name in cls.model_fields}

    @classmethod
    def build(cls, given: BaseModel | None = None, **overrides: Any):
        """`given` (this model, or a config that embeds it) with keyword overrides on top."""
        base = given.model_dump(include=cls.field_tree()) if given is not None else {}
        return cls.model_validate({**base, **overrides})

    @classmethod
    def field_tree(cls) -> dict:
        """This model's fields, and a nested settings model's own fields only: a config that
        extends a nested section (GRPO's `rollout` with the stage's `vllm` server) still builds
        the trainer's narrower one."""
        return {name: field.annotation.field_tree()
                if isinstance(field.annotation, type) and issubclass(field.annotation, Settings) else True
                for name, field in cls.model_fields.items()}


class TrainingArgs(Settings):
    """The loop: how long, how many micro-batches per step, precision, clipping, LR schedule,
    logging and checkpoints."""
    max_epochs: int | None = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; when set it replaces max_epochs")
    grad_accum_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, description="clip the global gradient norm to this (None: no clipping)")
    precision: Precision = Field("fp32", description="bf16: autocast; fp16: autocast with a GradScaler")
    schedule: ScheduleName | None = Field(None, description="LR schedule the trainer builds once it knows how many "
                                                            "updates it makes; None: the optimizer's LR throughout")
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    log_interval: int = Field(10, ge=1)
    eval_interval: int | None = Field(None, ge=1, description="steps between evaluations (None: each epoch)")
    save_interval: int | None = Field(None, ge=1, description="steps between resumable checkpoints")
    keep_last: int | None = Field(2, ge=1, description="checkpoints kept (None: all)")
    seed: int | None = Field(0, description="seeds Python, numpy and torch at construction (None: leave them)")
    compile: bool | str = Field(False, description="torch.compile the model (a string names the backend)")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: a full copy of the model per rank; fsdp: FSDP2, weights, gradients and optimizer "
                           "state sharded over the ranks (needs torchrun, even for one process)")
    activation_checkpointing: bool = Field(False, description="recompute each decoder layer's activations in "
                                                              "backward instead of storing them")
    fsdp_cpu_offload: bool = Field(False, description="fsdp: keep parameters, gradients and optimizer state in "
                                                      "CPU memory between uses")
    tensorboard: bool = False
    progress_bar: bool = Field(True, description="a tqdm bar on rank 0 when stderr is a terminal (the progress "
                                                 "lines on the alignflow.train logger are always written)")

    @model_validator(mode="before")
    @classmethod
    def _from_amp_keywords(cls, data: Any) -> Any:
        """The seeds' `use_amp=True, amp_dtype="float16"` spelling of `precision`."""
        if not isinstance(data, dict) or ("use_amp" not in data and "amp_dtype" not in data):
            return data
        data = dict(data)
        use_amp, dtype = data.pop("use_amp", False), data.pop("amp_dtype", "bfloat16")
        precision = short_name(dtype)
        if precision not in ("bf16", "fp16"):
            raise ValueError(f"amp_dtype must be bfloat16 or float16, got {dtype!r}")
        if use_amp:
            data["precision"] = precision
        return data

    @model_validator(mode="after")
    def _has_an_end(self) -> "TrainingArgs":
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("set max_steps or max_epochs")
        return self

    @model_validator(mode="after")
    def _offload_is_fsdp_s(self) -> "TrainingArgs":
        if self.fsdp_cpu_offload and self.strategy != "fsdp":
            raise ValueError("fsdp_cpu_offload needs strategy: fsdp")
        return self

    @property
    def needs_process_group(self) -> bool:
        """FSDP shards over a process group even for one process (and offloads through it), so
        `strategy: fsdp` runs under torchrun; DDP in one process needs none."""
        return self.strategy == "fsdp"

    @property
    def epoch_limit(self) -> int | None:
        """As in Hugging Face's Trainer, max_steps replaces the epoch limit rather than racing it."""
        return None if self.max_steps is not None else self.max_epochs
