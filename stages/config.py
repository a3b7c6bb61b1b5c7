"""Pipeline configuration: one pydantic model, YAML presets, dotted-key overrides.

`PipelineConfig` holds the settings every stage shares (the model and how it loads, the demo
data, evaluation, where runs go) and one section per registered algorithm (`sft:`, `dpo:`, ...,
each the algorithm's own `settings` model: stages/algorithm.py), composed here when this module
is first imported. The trainers' settings models are embedded, not copied: a section's `train`
is `trainers.TrainingArgs` plus the optimizer, batch and launch settings, and `dpo:` is
`DPOArgs` plus its data and loop. The classes hold the defaults a bare trainer has; the YAML
presets (stages/presets/) hold the pipeline's choices (schedule, checkpoint interval, sizes).
Prefect validates flow parameters with this model and draws it as a form in its UI."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, create_model, field_validator, model_validator

from alignflow.models import PRESETS
from alignflow.trainers.args import Settings

from .algorithm import algorithms, freeze, roots
from .settings import SHARED_KEYS, DemoConfig, EvalConfig, HFConfig, RayConfig, StageConfig, config_hash, plain_name

PRESET_DIR = Path(__file__).parent / "presets"


class SharedConfig(Settings):
    """What every stage shares; `PipelineConfig` adds a section per algorithm, which the methods
    here read."""
    preset: str = "tiny"
    model: str = Field("tiny", description="a built-in model preset (tiny, gpt2-small), trained from scratch "
                                            "by pretrain, or a Hugging Face model directory to start from")
    # Its type, the registered stages, and its default are PipelineConfig's: declared here so the
    # UI form shows it after the model.
    start: str = Field("", description="the first stage to run: with a Hugging Face model, sft (or an alignment "
                                       "stage) starts from it and pretrain continues pretraining it")
    hf: HFConfig = HFConfig()
    vocab_size: int = Field(1024, description="tokenizer trained on the pretraining corpus (built-in models)")
    runs_dir: str = "runs"
    run_id: str | None = Field(None, description="default: the preset's name")
    device: str | None = Field(None, description="default: cuda if available, else cpu")
    retries: int = Field(1, ge=0, description="Prefect retries per stage; a retry resumes from the stage's last checkpoint")
    tracking: Literal["none", "mlflow"] = Field(
        "none", description="mlflow: one MLflow run per pipeline, a nested run per stage (pip install 'alignflow[mlflow]')")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (a server, or sqlite:///path.db); default: sqlite in runs_dir, offline")
    tracking_experiment: str = Field("alignflow", description="the MLflow experiment the runs go to")
    demo: DemoConfig = DemoConfig()
    eval: EvalConfig = EvalConfig()
    ray: RayConfig = Field(RayConfig(), description="the Ray cluster of stages with train.launcher: ray")

    @model_validator(mode="after")
    def _a_start_needs_a_model_to_start_from(self) -> "SharedConfig":
        if algorithms()[self.start].parent is not None and self.builtin_model:
            raise ValueError(f"start: {self.start} needs a model to start from: set model to a Hugging Face model "
                             f"directory ({self.model!r} is a built-in preset, which only a first stage such as "
                             f"{', '.join(roots())} trains from scratch)")
        return self

    @model_validator(mode="after")
    def _evaluated_stages_exist(self) -> "SharedConfig":
        unknown = [s for s in self.eval.stages or [] if s not in algorithms()]
        if unknown:
            raise ValueError(f"eval.stages names {', '.join(unknown)}, which no algorithm is; stages: "
                             f"{', '.join(algorithms())}")
        return self

    @field_validator("run_id")
    @classmethod
    def _run_id_is_a_name(cls, value: str | None) -> str | None:
        return plain_name(value, "run_id") if value else None  # a form's empty field: the default

    @model_validator(mode="after")
    def _lora_needs_a_trained_parent(self) -> "SharedConfig":
        for name, section in self.sections().items():
            if section.lora is not None and self.builtin_model and algorithms()[name].parent is None:
                raise ValueError(f"{name}.lora: the built-in model {self.model!r} is trained from scratch by {name}, "
                                 "and an adapter on random weights learns nothing useful; use lora on a later stage, "
                                 "or set model to a Hugging Face model directory")
        quantized = [name for name, section in self.sections().items() if section.quantized]
        if quantized and self.builtin_model:
            raise ValueError(f"{quantized[0]}.lora.quantize: 4bit quantizes a transformers model (bitsandbytes), "
                             f"not the built-in model {self.model!r}; set model to a Hugging Face model directory")
        return self

    @property
    def builtin_model(self) -> bool:
        """`model` names a built-in preset (else it is a Hugging Face model directory)."""
        return self.model in PRESETS

    def sections(self) -> dict[str, StageConfig]:
        """Every stage's section, in pipeline order."""
        return {name: getattr(self, name) for name in algorithms()}

    def stage(self, name: str) -> StageConfig:
        return getattr(self, name)

    def stage_key(self, stage: str) -> dict:
        """What a stage's output depends on: its own section and the shared ones (its cache key)."""
        dumped = self.model_dump(mode="json")
        # How its processes are started does not change what a stage computes (nnodes and
        # nproc_per_node, which set the global batch, do).
        dumped[stage]["train"].pop("launcher", None)
        # Nor where its rollouts' inference server runs (GRPO's rollout.vllm).
        dumped[stage].get("rollout", {}).pop("vllm", None)
        return {"stage": stage, stage: dumped[stage], **{k: dumped[k] for k in SHARED_KEYS}}

    def stage_hash(self, stage: str) -> str:
        return config_hash(self.stage_key(stage))

    def resolved_run_id(self) -> str:
        return self.run_id or self.preset


ALGORITHMS = freeze("the pipeline configuration (alignflow.stages.config.PipelineConfig)")
PipelineConfig = create_model(
    "PipelineConfig", __base__=SharedConfig, __module__=__name__,
    __doc__="The whole pipeline's settings: the shared ones and a section per algorithm.",
    start=(Literal[tuple(ALGORITHMS)], Field(roots()[0], description=SharedConfig.model_fields["start"].description)),
    **{name: (a.settings, a.settings()) for name, a in ALGORITHMS.items()})


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """`sft.train.lr` -> tree["sft"]["train"]["lr"] = value. A dict value is merged into what is
    there, as a config file's section is: {"sft.train": {"strategy": "fsdp"}} keeps the lr."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = _merge(tree[leaf], value) if isinstance(value, dict) and isinstance(tree.get(leaf), dict) else value


def parse_override(item: str, flag: str = "--set") -> tuple[str, Any]:
    """'dpo.beta=0.2' -> ('dpo.beta', 0.2); the value is read as YAML (numbers, bools, lists).
    `flag`: the option it came with, for the message."""
    if "=" not in item:
        raise ValueError(f"{flag} {item!r} is not key=value (e.g. dpo.beta=0.2)")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as e:  # its own message spans lines and never says which key
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{flag} {key.strip()}: the value {raw!r} is not plain YAML ({problem}); give a number, "
                         "true/false, text, a [list] or a {mapping}, quoted for the shell") from None


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
