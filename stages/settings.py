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

from .harness import LMEvalConfig

# Sections every stage's trained output depends on: the model and how it is loaded, the
# tokenizer, the demo data. Not evaluation: it is keyed on its own (stages/eval_record.py).
SHARED_KEYS = ("model", "hf", "vocab_size", "demo")


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
    nproc_per_node: int = Field(1, ge=1, description=">1 launches the stage with torchrun (or on Ray)")
    nnodes: int = Field(1, ge=1)
    launcher: Literal["local", "torchrun", "ray"] | None = Field(
        None, description="how the flow starts the stage's processes: local (in the flow's own process), torchrun, "
                          "or ray (nnodes x nproc_per_node Ray Train workers on the cluster at ray.address; "
                          "pip install 'alignflow[ray]'). Default: torchrun when it needs several processes or "
                          "a process group (fsdp), else local")

    @property
    def needs_torchrun(self) -> bool:
        """Several processes, or a process group for one (`needs_process_group`): the flow
        launches the stage with torchrun instead of running it in its own process."""
        return self.nproc_per_node > 1 or self.nnodes > 1 or self.needs_process_group

    @property
    def resolved_launcher(self) -> str:
        return self.launcher or ("torchrun" if self.needs_torchrun else "local")

    @model_validator(mode="after")
    def _the_launcher_can_start_it(self) -> "TrainConfig":
        if self.launcher == "local" and self.needs_torchrun:
            raise ValueError(f"launcher: local runs one process without a process group; nnodes {self.nnodes} x "
                             f"nproc_per_node {self.nproc_per_node} with strategy {self.strategy} needs torchrun "
                             "or ray")
        if self.launcher == "ray" and not ray_installed():
            raise ValueError("launcher: ray needs Ray Train, which is not installed here: "
                             "pip install 'alignflow[ray]' (or choose launcher: torchrun)")
        return self


def ray_installed() -> bool:
    """Whether `ray.train` can be imported, without importing it (a second or more)."""
    import importlib.util

    try:
        return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.train") is not None
    except (ImportError, ValueError):  # sys.modules["ray"] is None: blocked
        return False


class RayConfig(Settings):
    """The Ray cluster that stages with `train.launcher: ray` train on (flows/launch.py,
    stages/ray_job.py). Not part of any stage's cache key: where a stage trains does not change
    what it computes."""
    address: str | None = Field(None, description="the cluster's GCS address host:port, or 'auto' on a node of it "
                                                  "(default: $RAY_ADDRESS)")
    connect_timeout_s: float = Field(30.0, gt=0, description="how long to wait for the cluster's address to answer")
    use_gpu: bool | None = Field(None, description="one GPU per worker (NCCL); default: when the cluster has GPUs")
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(0, ge=0, description="Ray Train restarts of a failed worker group (each resumes from "
                                                   "the stage's last checkpoint) before the stage fails; the flow's "
                                                   "retries come after these")


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

    def input_stages(self) -> tuple[str, ...]:
        """The stages of the run this stage reads besides its parent (grpo.reward_model): they run
        first, and their content hashes join its parent's in its skip check and lineage."""
        return ()

    def input_dirs(self) -> dict[str, str]:
        """Checkpoint directories from elsewhere it reads besides its parent, by role
        (grpo.reward_models[0]), hashed into its lineage as an external parent is."""
        return {}

    @model_validator(mode="after")
    def _qlora_runs_under_ddp(self) -> "StageConfig":
        if self.quantized and self.train.strategy == "fsdp":
            raise ValueError("lora.quantize: 4bit with train.strategy: fsdp is not supported: QLoRA trains under ddp")
        return self


EVAL_COLUMNS = ("answer",)  # what the demo's held-out prompts hand each reward function
DEMO_SET = "demo"  # the evaluation set of the demo's held-out prompts


class EvalSet(Settings):
    """One evaluation set: prompts from a local file (or the demo's held-out prompts), and how
    they are scored. A field left unset takes the `eval` section's value of the same name."""
    name: str = Field(description="the set's name in the report, eval.json and MLflow")
    source: str = Field(DEMO_SET, description="a local file (jsonl, json, parquet, csv) of `prompt` (text or "
                                              "messages), optional `answer` and any columns its reward functions "
                                              "read; or 'demo' (the demo task's held-out prompts)")
    max_prompts: int | None = Field(None, ge=1, description="the first this many prompts of the file")
    max_new_tokens: int | None = Field(None, ge=1)
    samples: int | None = Field(None, ge=0, description="sampled completions per prompt for the sampled mean "
                                                        "reward (0: greedy only)")
    temperature: float | None = Field(None, gt=0)
    reward_funcs: list[str] | None = Field(None, min_length=1)
    reward_weights: list[float] | None = None

    @field_validator("name")
    @classmethod
    def _name_is_plain(cls, value: str) -> str:
        return plain_name(value, "eval.sets name")


class EvalConfig(Settings):
    """Evaluation of every stage after it trains (stages/evaluation.py): each set's prompts
    generated greedily (exact-match accuracy, reward, format rate, length) and sampled (mean
    reward), and lm-evaluation-harness tasks. Not part of a stage's training cache key: changing
    it re-evaluates the stages, it does not retrain them (stages/eval_record.py)."""
    sets: list[EvalSet] | None = Field(None, description="evaluation sets (default: the demo's held-out prompts, "
                                                         "on the stages trained on demo data)")
    stages: list[str] | None = Field(None, description="the stages evaluated (default: every stage, pretraining "
                                                       "only when its tokenizer has a chat template)")
    lm_eval: LMEvalConfig | None = Field(None, description="lm-evaluation-harness tasks run on every evaluated "
                                                           "stage's directory (pip install 'alignflow[eval]')")
    # The defaults of every set's own fields:
    max_prompts: int = Field(64, ge=1, description="prompts of each set evaluated at most")
    max_new_tokens: int = Field(16, ge=1)
    reward_samples: int = Field(8, ge=0, description="sampled completions per prompt for the sampled mean reward "
                                                     "(0: greedy only)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the sampled mean reward")
    reward_funcs: list[str] = Field(DEFAULT_REWARDS, min_length=1,
                                    description="reward functions of each set (by default GRPO's)")
    reward_weights: list[float] | None = None

    def resolved_sets(self) -> list[EvalSet]:
        """Every set with its unset fields filled from this section (the demo set when none is given)."""
        given = self.sets if self.sets is not None else [EvalSet(name=DEMO_SET)]
        defaults = {"max_prompts": self.max_prompts, "max_new_tokens": self.max_new_tokens,
                    "samples": self.reward_samples, "temperature": self.temperature,
                    "reward_funcs": self.reward_funcs, "reward_weights": self.reward_weights}
        out = []
        for s in given:
            filled = {k: v for k, v in defaults.items() if getattr(s, k) is None}
            if s.reward_funcs is not None and s.reward_weights is None:
                filled.pop("reward_weights", None)  # its own functions, weighted 1 each
            out.append(s.model_copy(update=filled))
        return out

    @model_validator(mode="after")
    def _sets_are_readable(self) -> "EvalConfig":
        """A bad set fails here, at config load, with one line naming its file and row, not after
        a stage has trained."""
        names = [s.name for s in self.sets or []]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"eval.sets: {', '.join(twice)} named twice; each set needs its own name")
        given = self.sets if self.sets is not None else [None]
        for i, (own, s) in enumerate(zip(given, self.resolved_sets())):
            columns = EVAL_COLUMNS if s.source == DEMO_SET else eval_set_columns(s)
            unknown = {c: fns for c, fns in required_columns(s.reward_funcs).items() if c not in columns}
            if unknown:
                key = f"eval.sets[{i}].reward_funcs" if own is not None and own.reward_funcs else "eval.reward_funcs"
                where = "the demo's held-out prompts have" if s.source == DEMO_SET else f"{s.source} has"
                raise ValueError(f"{key} (set {s.name}): {where} only the columns " + ", ".join(columns) + "; " +
                                 "; ".join(f"{', '.join(fns)} reads {c!r}" for c, fns in unknown.items()))
        return self


def eval_set_columns(s: EvalSet) -> tuple[str, ...]:
    """The columns of an evaluation set's file, after checking every row's prompt (its answer,
    when it has one, must be text or a number). Raises one line naming the file and the row."""
    from .data import validate
    from .data_files import DataError, read_file
    from .formats import PROMPTS

    try:
        ds, place = read_file(s.source, "error")
        ds, _, _ = validate(ds, f"eval set {s.name}", PROMPTS, s.source, "error", place)
    except DataError as e:
        raise ValueError(f"eval.sets {s.name}: {e}") from None
    if len(ds) == 0:
        raise ValueError(f"eval.sets {s.name}: {s.source} has no rows")
    return tuple(ds.column_names)


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
