"""A stage's inputs besides its parent: today grpo's reward models, read from a stage of the same
run (`grpo.reward_model: rm`, which makes the pipeline a graph: rm and grpo both train on sft,
and grpo reads rm) or from directories elsewhere (`grpo.reward_models: [{path, weight}]`).

Each input is named by its role (the stage's name for a stage of the run, `reward_models_<i>`
for a directory) and verified as a parent is. Its content hash joins the parent's in the stage's
skip check and resumable-state fingerprint, and the manifest's `inputs` record where each was
and what it held: changing rm's settings re-runs rm and then grpo, not sft."""
from __future__ import annotations

import json
from pathlib import Path

from . import handoff, storage
from .algorithm import algorithms


def check_input(stage: str, role: str, manifest: dict, local: Path, ref: str) -> None:
    """An input is a reward model: a checkpoint of a stage whose model scores (rm), or a plain
    Hugging Face sequence-classification directory with one label."""
    if manifest.get("external"):
        config = json.loads((Path(local) / handoff.CONFIG).read_text())
        classes = config.get("architectures") or []
        labels = config.get("num_labels", len(config.get("id2label") or {}) or None)
        if not any(c.endswith("ForSequenceClassification") for c in classes) or labels not in (1, None):
            raise ValueError(f"{stage} input {role}: {ref} is not a reward model (its config.json has architectures "
                             f"{classes or 'none'}, {labels} labels); give an rm stage's directory or a Hugging Face "
                             "...ForSequenceClassification directory with num_labels 1")
        return
    found = manifest.get("stage")
    scoring = [name for name, a in algorithms().items() if a.scores]
    if found not in scoring:
        raise ValueError(f"{stage} input {role}: {ref} holds a {found} stage, not a reward model "
                         f"({' or '.join(scoring)} stage, or a Hugging Face sequence-classification directory)")


def input_refs(stage: str, settings, given: dict[str, str]) -> dict[str, str]:
    """{role: where it is} for every input `settings` name: a stage of the run from `given` (the
    flow's results, or `--input rm=DIR`), a directory from the settings themselves."""
    refs = {}
    for name in settings.input_stages():
        if name not in given:
            raise ValueError(f"{stage} reads the {name} stage's output ({stage}.reward_model: {name}), but no {name} "
                             f"directory was given: run the pipeline (it runs {name} first), or name a directory "
                             f"instead ({stage}.reward_models: [{{path: DIR}}])")
        refs[name] = str(given[name])
    extra = sorted(set(given) - set(refs))
    if extra:
        raise ValueError(f"{stage} reads no input named {', '.join(extra)} (its inputs: "
                         f"{', '.join(settings.input_stages()) or 'none'})")
    return {**refs, **settings.input_dirs()}


def run_inputs(stage: str, config, results: dict[str, dict]) -> dict[str, dict]:
    """{role: result} of the stage's inputs for the flow: the run's stages from `results`, the
    directories verified now (a plain Hugging Face one hashed, as a base model is)."""
    settings = config.stage(stage)
    missing = [name for name in settings.input_stages() if name not in results]
    if missing:
        raise ValueError(f"{stage} reads the {missing[0]} stage's output ({stage}.reward_model: {missing[0]}), "
                         f"which this run does not train before it: run the whole pipeline, or give its directory "
                         f"as {stage}.reward_models: [{{path: DIR}}]")
    found = {name: results[name] for name in settings.input_stages()}
    for role, path in settings.input_dirs().items():
        found[role] = handoff.stage_result(path, storage.read_manifest(path, verify=True))
    return found


def input_hashes(inputs: dict[str, dict]) -> dict[str, str]:
    return {role: result["content_hash"] for role, result in inputs.items()}
