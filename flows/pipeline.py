"""The Prefect flows: the whole pipeline, and one stage re-run against an earlier parent.

Flows stay thin: each stage is a task around `stages.run.train_stage`, skipped when its checkpoint
directory is already complete for the same config and parent content hash (the manifest
check), retried on failure (the retry resumes from the stage's last training checkpoint), and
launched through torchrun (or on a Ray cluster) when it asks for more than one process."""
from __future__ import annotations

import logging
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed

from alignflow.stages import aligners, algorithms, chain, check_parent, children, eval_record, handoff, storage
from alignflow.stages.algorithm import roots
from alignflow.stages.config import PipelineConfig, load_config
from alignflow.stages.settings import plain_name
from alignflow.stages.failures import is_permanent
from alignflow.stages.inputs import input_hashes, run_inputs
from alignflow.stages.lock import DirLock
from alignflow.stages.run import train_stage
from alignflow.trainers.checkpoint import latest_checkpoint, step_of

from alignflow.trainers import numbers

from . import eval_report, report, tracking
from .launch import run_stage_processes


# Choices drawn from the registered algorithms (a type each, so Prefect's form offers them).
AlignStage = Literal[aligners() + ("none",)]
ChildStage = Literal[children()]


def reset_stage(out: str) -> None:
    """`force`: forget a stage's output and resumable state, so it runs from scratch."""
    storage.remove(out, handoff.MANIFEST)
    handoff.discard_progress(storage.local_dir(out))


def publish(stage: str, run_id: str, result: dict) -> None:
    """The stage's card (its numbers and curves) as a Prefect artifact, as soon as it finishes."""
    out = result["path"]
    curves = report.plot_curves(storage.local_dir(out), stage)
    if curves is not None and storage.is_url(out):
        storage.put_file(curves, storage.join(out, curves.name))
    create_markdown_artifact(key=report.artifact_key(run_id, stage), markdown=report.stage_card(stage, result, curves),
                             description=f"{stage}: numbers and curves ({out})")


@contextmanager
def progress_into(logger):
    """The stages' and trainers' progress lines (the stdlib logger `alignflow`: a start line per
    stage, a line every log_interval steps) into this task's Prefect log while a stage runs in
    this process; under torchrun they arrive as rank 0's output instead."""
    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logger.log(record.levelno, record.getMessage())

    source, handler = logging.getLogger("alignflow"), Forward()
    # Not also to the root logger: Prefect's console handler there would print each line twice.
    saved = source.level, source.propagate
    # setLevel, not `.level =`: it clears the loggers' isEnabledFor caches, and `alignflow.train`,
    # asked once while the level was WARNING (a trainer run outside a flow), would stay silent.
    source.setLevel(logging.INFO)
    source.propagate = False
    source.addHandler(handler)
    try:
        yield
    finally:
        source.removeHandler(handler)
        source.setLevel(saved[0])
        source.propagate = saved[1]


def summary(metrics: dict) -> str:
    """A stage's final numbers, rounded: `loss 0.64 · val_loss 0.6574 · demo accuracy 0.3696`."""
    return " · ".join(f"{k} {numbers.number(v)}" for k, v in metrics.items() if isinstance(v, float))


def eval_summary(record: dict) -> dict:
    """`{"demo accuracy": 0.37, ...}`: each evaluation set's numbers, named by their set."""
    return {f"{name} {key}": value for name, got in (record.get("sets") or {}).items()
            for key, value in got.items() if isinstance(value, float) and key != "seconds"}


def retryable(task, task_run, state) -> bool:
    """Prefect's retry condition: retry only what a retry can fix (stages.failures)."""
    return not (isinstance(state.data, BaseException) and is_permanent(state.data))


def evaluated(stage: str, config: PipelineConfig, result: dict, logger) -> dict:
    """The result with its evaluation: the one the stage made as it trained, or its eval.json when
    that measured this model with these `eval` settings; else the finished directory is
    evaluated now (e.g. only `eval` changed), and its training is not run again."""
    record = result.get("evaluation") or eval_record.current_record(result["path"], config, stage,
                                                                     result["content_hash"])
    if record is not None:
        return {**result, "evaluation": record}
    logger.info("evaluating %s: %s has no evaluation with these eval settings", stage, result["path"])
    with progress_into(logger):
        record = eval_record.evaluate_directory(result["path"], config, stage=stage)
    return {**result, "evaluation": record, "reevaluated": True}


@task(task_run_name="{stage}", retry_condition_fn=retryable)
def stage_task(stage: str, config: PipelineConfig, parent: dict | None, out_dir: str,
               inputs: dict[str, dict] | None = None) -> dict:
    """One stage into `out_dir` (a path or an fsspec URL), unless it is already complete there.
    `inputs`: the results of the run's stages it reads besides its parent (grpo's rm), upstream
    of it in the task graph as the parent is."""
    logger = get_run_logger()
    parent_hash = parent["content_hash"] if parent else None
    every_input = run_inputs(stage, config, inputs or {})
    why = storage.why_incomplete(out_dir, config.stage_hash(stage), parent_hash, input_hashes(every_input))
    if why is None:
        logger.info("%s is already complete for this config and parent: skipped", out_dir)
        result = {**handoff.stage_result(out_dir, storage.read_manifest(out_dir)), "skipped": True}
        result = evaluated(stage, config, result, logger)
        # Completed, so the chain goes on with its result, but named so the UI tells it apart.
        return Completed(name="Skipped", message=f"{stage} already complete in {out_dir}", data=result)
    if why.damaged:
        logger.warning("%s: rebuilding %s from its last checkpoint (training it again if there is none)",
                       why.reason, stage)
    else:
        logger.info("running %s: %s", stage, why.reason)
    parent_path = parent["path"] if parent else None
    run_stages = {name: got["path"] for name, got in (inputs or {}).items()}
    if config.stage(stage).train.resolved_launcher != "local":
        run_stage_processes(stage, config, parent_path, out_dir, logger, run_stages)
        result = handoff.stage_result(out_dir, storage.read_manifest(out_dir, verify=True))
    else:
        with progress_into(logger):
            result = train_stage(stage, config, parent_path, out_dir, run_stages)
    result = evaluated(stage, config, result, logger)
    publish(stage, config.resolved_run_id(), result)
    logger.info("%s done: %s", stage, summary({**result["metrics"], **eval_summary(result["evaluation"])}))
    return result


def run_chain(config: PipelineConfig, run_dir: str, stages: list[str], base: dict | None,
              force: list[str], title: str) -> dict[str, dict]:
    """The stages in order, the first on `base` (a parent from elsewhere, or None), each later one
    on its parent's result and reading the results of the stages its settings name (grpo's rm);
    then the report of the run directory. With `tracking`, an MLflow run for the chain and a
    nested one per stage as it finishes."""
    for stage in stages:
        unrun = [name for name in config.stage(stage).input_stages() if name not in stages]
        if unrun:
            raise ValueError(f"{stage}.reward_model: {unrun[0]} is not a stage of this run ({' → '.join(stages)}): "
                             f"give an earlier {unrun[0]} directory as {stage}.reward_models: [{{path: DIR}}] instead")
    tracker = tracking.tracker(config, run_dir, title, {"alignflow.run_id": config.resolved_run_id(),
                                                        "alignflow.chain": "→".join(stages)})
    results, outcome = {}, "FAILED"
    try:
        for stage in stages:
            out = storage.join(run_dir, stage)
            if stage in force:
                reset_stage(out)
            parent = results[algorithms()[stage].parent] if stage != stages[0] else base
            reads = {name: results[name] for name in config.stage(stage).input_stages() if name in results}
            state = stage_task.with_options(retries=config.retries)(stage, config, parent, out, reads or None,
                                                                    return_state=True)
            results[stage] = state.result()
            tracker.stage(stage, config, results[stage])
        write_report(run_dir, config.resolved_run_id(), results, stages)
        outcome = "FINISHED"
    except KeyboardInterrupt:
        outcome = "KILLED"
        raise
    finally:
        tracker.finish(outcome)
    return results


def new_run_id(runs_dir: str, parent_manifest: dict, stage: str, attempts: int = 100) -> str:
    """A run directory name for a one-stage re-run that no other run has: `<parent run>-<stage>-
    <time>-<random>`, its directory created here so a re-run started in the same second (in
    this or another process) cannot take it too."""
    base = f"{parent_manifest.get('run_id') or 'run'}-{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    for _ in range(attempts):
        run_id = f"{base}-{secrets.token_hex(2)}"
        run_dir = storage.join(runs_dir, run_id)
        if storage.is_url(run_dir) and storage.subdirs(run_dir):
            continue
        try:
            storage.local_dir(run_dir).mkdir(parents=True)
            return run_id
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run directory name {base}-* in {runs_dir} after {attempts} tries")


def resume_point(run_dir: str, stages: list[str]) -> tuple[str, int | None] | None:
    """Where an interrupted run stands: its first stage without a manifest and the step of that
    stage's last checkpoint (None: no checkpoint yet), or None when every stage is complete."""
    for stage in stages:
        out = storage.join(run_dir, stage)
        try:
            storage.read_manifest(out)
        except handoff.StageDirError:
            last = latest_checkpoint(storage.local_dir(out))
            return stage, step_of(last) if last else None
    return None


def earlier_result(out: str) -> dict | None:
    """A complete stage directory's result, or None."""
    try:
        manifest = storage.read_manifest(out)
    except handoff.StageDirError:
        return None
    return {**handoff.stage_result(out, manifest), "parent_hash": (manifest.get("parent") or {}).get("content_hash"),
            "evaluation": eval_record.read_record(out)}


def write_report(run_dir: str, run_id: str, results: dict[str, dict], chain: list[str]) -> str:
    """report.md (curves linked) and the report artifact (curves inside), over every complete
    stage of the run directory, so a GRPO chain run after a DPO one keeps DPO in the report."""
    every = report.complete_stages(run_dir, results, earlier_result)
    local = storage.local_dir(run_dir)
    local.mkdir(parents=True, exist_ok=True)
    if eval_report.plot(every, local / report.EVAL_CHART) is None:
        (local / report.EVAL_CHART).unlink(missing_ok=True)  # an earlier run's, of stages no longer evaluated
    elif storage.is_url(run_dir):
        storage.put_file(local / report.EVAL_CHART, storage.join(run_dir, report.EVAL_CHART))
    (local / "report.md").write_text(report.report_card(run_dir, run_id, every, chain, inline=False))
    if storage.is_url(run_dir):
        storage.put_file(local / "report.md", storage.join(run_dir, "report.md"))
    card = report.report_card(run_dir, run_id, every, chain, inline=True)
    create_markdown_artifact(key=report.artifact_key(run_id, "report"), markdown=card,
                             description=f"alignflow report card: {' → '.join(chain)} and every other complete stage")
    return card


def base_model(path: str) -> dict:
    """The Hugging Face model directory a run starts from, as a parent: its files hashed (what
    the first stage's skip check compares, so a changed base re-runs the stages after it)."""
    if storage.is_url(path):
        raise ValueError(f"model: {path} is a URL; a Hugging Face model to start from must be a local directory")
    if not Path(path).is_dir():
        raise ValueError(f"model: {path} is neither a built-in preset nor a directory")
    absolute = str(Path(path).resolve())
    return handoff.stage_result(absolute, storage.read_manifest(absolute, verify=True))


def resolve(config: PipelineConfig | None, preset: str, overrides: dict[str, Any] | None) -> PipelineConfig:
    """A whole config (Python callers, the CLI), or a preset plus dotted overrides (deployments and
    the UI form: {"runs_dir": "s3://bucket/runs", "dpo.beta": 0.3})."""
    if config is not None and overrides:
        raise ValueError("give either config or overrides (dotted keys laid over the preset), not both")
    return config if config is not None else load_config(preset, overrides=overrides)


def pipeline_title(config: PipelineConfig, align: str) -> str:
    """`tiny · pretrain→sft→dpo`: which run directory, which chain."""
    names = chain(None if align == "none" else align, config.start, config)
    return f"{config.resolved_run_id()} · {'→'.join(names)}"


def stage_title(stage: str, parent: str) -> str:
    """`dpo ← nightly-1/sft`: the stage and the checkpoint it trains on."""
    return f"{stage} ← {'/'.join(parent.rstrip('/').split('/')[-2:])}"


def flow_run_name() -> str:
    """The flow run's name in the UI, from its parameters; the flow's own name when they do not
    parse (the flow then fails with the real error)."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    try:
        if flow_run.flow_name == "run-stage":
            return stage_title(p["stage"], p["parent"])
        config = p.get("config")
        config = PipelineConfig.model_validate(config) if isinstance(config, dict) else config
        return pipeline_title(resolve(config, p.get("preset", "tiny"), p.get("overrides")), p.get("align", "dpo"))
    except Exception:  # a name is not worth failing for: the flow reports bad parameters itself
        return flow_run.flow_name


@flow(name="alignment-pipeline", flow_run_name=flow_run_name)
def alignment_pipeline(config: PipelineConfig | None = None, align: AlignStage = "dpo",
                       force: list[str] | None = None, preset: str = "tiny",
                       overrides: dict[str, Any] | None = None) -> dict:
    """pretrain -> SFT -> the alignment stage (`align`) into runs_dir/run_id/<stage>/, from `config.start` on: a run from
    a Hugging Face model directory (`config.model`) hands it to its first stage as the parent."""
    config = resolve(config, preset, overrides)
    force = force or []
    unknown = set(force) - set(algorithms())
    if unknown:
        raise ValueError(f"force names unknown stages {sorted(unknown)}; stages: {', '.join(algorithms())}")
    stages = chain(None if align == "none" else align, config.start, config)
    base = None if config.builtin_model else base_model(config.model)
    run_dir = storage.join(config.runs_dir, config.resolved_run_id())
    with DirLock(storage.local_dir(run_dir), f"alignment-pipeline {config.resolved_run_id()}"):
        results = run_chain(config, run_dir, stages, base, force, pipeline_title(config, align))
    return {"run_dir": run_dir, "stages": results}


@flow(name="run-stage", flow_run_name=flow_run_name)
def run_stage(stage: ChildStage, config: PipelineConfig | None = None, parent: str = "",
              run_id: str | None = None, preset: str = "tiny", overrides: dict[str, Any] | None = None) -> dict:
    """Re-run one stage against an earlier run's parent directory (e.g. DPO with another beta on
    last week's SFT checkpoint) into a new run directory whose manifest records the lineage."""
    if not parent:
        raise ValueError("run_stage needs parent: the checkpoint directory (path or URL) of the parent stage")
    if run_id:  # a form's value, before anything is read or written with it
        plain_name(run_id, "run_id")
    if config is None:  # `start` is the full pipeline's; a preset's (hf-small: sft, from a model) does not apply
        overrides = {**(overrides or {}), "start": roots()[0]}
    config = resolve(config, preset, overrides)
    manifest = storage.read_manifest(parent, verify=True)  # a URL's files are checked as the stage fetches them
    check_parent(stage, manifest, parent)
    run_id = run_id or new_run_id(config.runs_dir, manifest, stage)
    config = config.model_copy(update={"run_id": run_id})
    run_dir = storage.join(config.runs_dir, run_id)
    with DirLock(storage.local_dir(run_dir), f"run-stage {run_id}"):
        results = run_chain(config, run_dir, [stage], handoff.stage_result(parent, manifest), [],
                            stage_title(stage, parent))
    return {"run_dir": run_dir, "stages": results}
