"""lm-evaluation-harness on a stage's output directory: `run_lm_eval(stage_dir, LMEvalConfig(...))`
runs lm-eval's Python API with its Hugging Face backend (`model="hf"`, `pretrained=<dir>`) over
the config's tasks -- lm-eval's built-in ones, or the user's own YAMLs under `include_path` --
and gives `{task: {metric: value}}`, the same numbers as

    lm_eval --model hf --model_args pretrained=DIR,dtype=float32 --tasks A,B --include_path P \
        --device cpu --batch_size 8 --seed 0

A stage directory is a Hugging Face model directory (weights, config.json, tokenizer), so lm-eval
loads it as it loads any checkpoint. lm-eval is an optional dependency (`alignflow[eval]`),
imported only when it runs. The config is `eval.lm_eval`; this module imports neither
stages.settings nor stages.config (they import it)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import Field, field_validator

from alignflow.trainers.args import Settings

log = logging.getLogger("alignflow.stage")

KEY = "eval.lm_eval"  # where LMEvalConfig sits in the pipeline's config, for messages
INSTALL = f"{KEY} needs lm-eval: pip install 'alignflow[eval]'"
GLOB_CHARS = set("*?[")  # lm-eval matches task names as glob patterns


class LMEvalConfig(Settings):
    """lm-evaluation-harness tasks run on each stage's model directory."""
    tasks: list[str] = Field(..., min_length=1, description="lm-eval task (or group) names: its built-in tasks, or "
                                                             "the task names of the YAMLs under include_path")
    include_path: str | None = Field(None, description="a directory of your own lm-eval task YAMLs (lm-eval's "
                                                       "--include_path); built-in tasks download their data from "
                                                       "the Hugging Face hub, local copies need a YAML here")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per prompt (None: each task's own)")
    limit: int | None = Field(None, ge=1, description="examples per task at most (None: all)")
    batch_size: int = Field(8, ge=1)
    apply_chat_template: bool = Field(False, description="render prompts with the tokenizer's chat template "
                                                         "(few-shot examples as turns)")
    max_new_tokens: int | None = Field(None, ge=1, description="tokens a generate_until task generates at most, "
                                                               "over its own max_gen_toks (None: the task's)")
    seed: int = Field(0, description="python, numpy, torch and few-shot seeds (lm-eval's --seed)")

    @field_validator("tasks")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        names = [n.strip() for n in names]
        if not all(names):
            raise ValueError(f"{KEY}.tasks: an empty task name")
        return names

    @field_validator("include_path")
    @classmethod
    def _a_directory(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).is_dir():
            raise ValueError(f"{KEY}.include_path: {path} is not a directory: point it at a directory of lm-eval "
                             "task YAMLs, or leave it unset to use lm-eval's built-in tasks only")
        return path


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ValueError(INSTALL) from e
    return lm_eval, TaskManager


def _task_manager(TaskManager, cfg: LMEvalConfig, metadata: dict):
    """lm-eval's task index, and the names to run as the CLI resolves them (a name may be a glob
    pattern). Indexing lm-eval's ~15,000 built-in tasks takes seconds, so when every name is
    plainly one task of include_path, the index of include_path alone serves: a task (unlike a
    group or tag) is built from its own YAML, so the numbers are the same."""
    if cfg.include_path and not any(GLOB_CHARS & set(n) for n in cfg.tasks):
        local = TaskManager(include_path=cfg.include_path, include_defaults=False, metadata=metadata)
        if all(n in local.all_subtasks for n in cfg.tasks):
            return local, list(dict.fromkeys(cfg.tasks))
    manager = TaskManager(include_path=cfg.include_path, metadata=metadata)
    resolved = {n: manager.match_tasks([n]) for n in cfg.tasks}
    unknown = [n for n, found in resolved.items() if not found]
    if unknown:
        where = f"{KEY}.include_path ({cfg.include_path})" if cfg.include_path else f"{KEY}.include_path (not set)"
        raise ValueError(f"{KEY}.tasks: unknown task {', '.join(map(repr, unknown))}: tasks come from lm-eval's "
                         f"registry (lm-eval ls tasks) or the YAMLs under {where}; built-in tasks download their "
                         "data from the Hugging Face hub, so offline point include_path at task YAMLs over local "
                         "copies")
    return manager, list(dict.fromkeys(t for found in resolved.values() for t in found))


def metric_name(key: str) -> str:
    """lm-eval's result key as a metric name: 'acc,none' -> 'acc', 'acc_stderr,none' ->
    'acc_stderr'; a filter other than 'none' stays, after a slash: 'exact_match,strict-match'
    -> 'exact_match/strict-match'."""
    metric, _, filter_name = key.partition(",")
    return metric if filter_name in ("", "none") else f"{metric}/{filter_name}"


def clean_metrics(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's `results["results"]` as `{task: {metric: float}}`: its names and aliases,
    sample counts and the stderrs it could not compute ('N/A') are left out."""
    cleaned = {}
    for task, entries in results.items():
        numbers = {}
        for key, value in entries.items():
            if key in ("alias", "name", "sample_len") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            numbers[metric_name(key)] = float(value)
        cleaned[task] = numbers
    return cleaned


class _Quiet:
    """lm-eval's own logger at WARNING for the run (its INFO lines come per request batch),
    unless LMEVAL_LOG_LEVEL, lm-eval's knob, asks for another level."""

    def __enter__(self):
        self.logger = logging.getLogger("lm_eval")
        self.level = self.logger.level
        if not os.environ.get("LMEVAL_LOG_LEVEL"):
            self.logger.setLevel(max(logging.WARNING, self.level))

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def run_lm_eval(model_dir: str | Path, cfg: LMEvalConfig, device: str = "cpu", dtype: str = "float32",
                trust_remote_code: bool = False) -> dict[str, dict[str, float]]:
    """lm-eval's tasks of `cfg` on the model saved in `model_dir` (a stage directory or any
    Hugging Face causal-LM directory), as `{task: {metric: value}}`: e.g.
    `{"arc_easy": {"acc": 0.41, "acc_stderr": 0.01, "acc_norm": ..., "acc_norm_stderr": ...}}`."""
    model_dir = Path(model_dir).absolute()
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{KEY}: {model_dir} is no Hugging Face model directory (no config.json)")
    lm_eval, TaskManager = _lm_eval()
    model_args = {"pretrained": str(model_dir), "dtype": dtype}  # a dict: a path may hold a comma
    if trust_remote_code:
        model_args["trust_remote_code"] = True
    with _Quiet():
        manager, tasks = _task_manager(TaskManager, cfg, metadata=dict(model_args))  # metadata as the CLI's
        try:
            out = lm_eval.simple_evaluate(
                model="hf", model_args=model_args, tasks=tasks, task_manager=manager, device=device,
                batch_size=cfg.batch_size, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                apply_chat_template=cfg.apply_chat_template, fewshot_as_multiturn=cfg.apply_chat_template,
                gen_kwargs={"max_gen_toks": cfg.max_new_tokens} if cfg.max_new_tokens else None,
                random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                fewshot_random_seed=cfg.seed, log_samples=False)
        except ConnectionError as e:  # a task's data is on the hub and the hub is out of reach
            raise ValueError(f"{KEY}: cannot fetch a task's data ({e}): built-in tasks download their data from the "
                             f"Hugging Face hub; offline, point {KEY}.include_path at task YAMLs over local "
                             "copies") from e
    metrics = clean_metrics(out["results"])
    n = out.get("n-samples", {})
    for task, numbers in metrics.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in numbers.items())
        count = n.get(task, {}).get("effective")
        log.info(f"lm-eval {task}{f' ({count:,} examples)' if count is not None else ''}: {shown or 'no metrics'}")
    return metrics
