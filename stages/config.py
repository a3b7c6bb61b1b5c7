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
from pydantic import Field, create_model

from .algorithm import freeze, roots
from .settings import SharedConfig

PRESET_DIR = Path(__file__).parent / "presets"

ALGORITHMS = freeze("the pipeline configuration (alignflow.stages.config.PipelineConfig)")
PipelineConfig = create_model(
    "PipelineConfig", __base__=SharedConfig, __module__=__name__,
    __doc__="The whole pipeline's settings: the shared ones and a section per algorithm.",
    start=(Literal[tuple(ALGORITHMS)], Field(roots()[0], description=(
        "the first stage to run: with a Hugging Face model, sft (or an alignment stage) starts from it and "
        "pretrain continues pretraining it"))),
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
