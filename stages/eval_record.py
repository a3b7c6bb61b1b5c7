"""A stage's evaluation record, eval.json beside its model: the numbers of stages/evaluation.py's
sets and of lm-evaluation-harness (stages/harness.py), and what they were measured on.

Evaluation is keyed on its own, apart from training: the record holds the hash of the `eval`
settings it ran with (`eval_hash`) and the content hash of the model it measured. A stage
evaluates right after it trains, in its own process with the model still loaded; when only the
`eval` settings change, the flow (or `alignflow eval DIR`) loads the finished directory and
evaluates it again, and the weights are not touched."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from alignflow.models import Tokenizer
from alignflow.models.files import sha256_file, write_json_atomic
from alignflow.trainers import distributed as dist_utils

from . import handoff, storage
from .evaluation import evaluate_sets, is_evaluated, stage_sets
from .settings import DEMO_SET, config_hash

log = logging.getLogger("alignflow.stage")


def eval_key(config, stage: str) -> dict:
    """What a stage's evaluation depends on besides its model: the sets it runs (a file's content
    by its sha256), lm-eval's settings, which stages are evaluated, and the demo's draw."""
    ev = config.eval
    sets = [{**s.model_dump(mode="json"), **({} if s.source == DEMO_SET else {"sha256": sha256_file(s.source)})}
            for s in stage_sets(config, stage)]
    return {"stage": stage, "stages": ev.stages, "sets": sets, "demo": config.demo.model_dump(mode="json"),
            "lm_eval": ev.lm_eval.model_dump(mode="json") if ev.lm_eval else None}


def eval_hash(config, stage: str) -> str:
    return config_hash(eval_key(config, stage))


def read_record(ref: str | Path) -> dict | None:
    """A stage directory's eval.json (local or at a URL), or None when it has none readable."""
    try:
        raw = storage.read_bytes(storage.join(ref, handoff.EVAL_RECORD))
        return json.loads(raw) if raw is not None else None
    except (OSError, ValueError):
        return None  # a damaged record is measured again


def current_record(ref: str | Path, config, stage: str, content_hash: str) -> dict | None:
    """The stage's record when it measured this model with these settings, else None."""
    record = read_record(ref)
    if record and record.get("eval_hash") == eval_hash(config, stage) and record.get("model_hash") == content_hash:
        return record
    return None


def evaluate(config, stage: str, model: torch.nn.Module, tok: Tokenizer, model_dir: Path) -> dict:
    """The record's numbers for `stage`'s model (loaded; `model_dir`: its finished directory,
    which lm-eval loads on its own)."""
    started = time.perf_counter()
    record = {"sets": {}, "lm_eval": {}}
    if is_evaluated(config, stage, tok):
        record["sets"] = evaluate_sets(config, stage, model, tok)
        if config.eval.lm_eval is not None:
            from .harness import run_lm_eval

            device = next(model.parameters()).device
            record["lm_eval"] = run_lm_eval(model_dir, config.eval.lm_eval, device=str(device),
                                            dtype=config.hf.dtype, trust_remote_code=config.hf.trust_remote_code)
    else:
        log.info(f"{stage}: not evaluated (eval.stages; a first stage without a chat template, and a reward model, "
                 "are left out)")
    record["seconds"] = round(time.perf_counter() - started, 2)
    return record


def write_record(ref: str | Path, config, stage: str, content_hash: str, numbers: dict) -> dict:
    """eval.json in the stage's directory (and at its URL), after its manifest."""
    record = {"stage": stage, "eval_hash": eval_hash(config, stage), "model_hash": content_hash, **numbers,
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    local = storage.local_dir(ref)
    write_json_atomic(local / handoff.EVAL_RECORD, record)
    if storage.is_url(ref):
        storage.put_file(local / handoff.EVAL_RECORD, storage.join(ref, handoff.EVAL_RECORD))
    return record


def evaluate_directory(ref: str | Path, config, device: str | torch.device | None = None,
                       stage: str | None = None) -> dict:
    """Evaluate a finished stage directory (verified, fetched when at a URL) and record it there;
    a plain Hugging Face model directory is evaluated as `stage` (default sft) and nothing is
    written into it."""
    local = storage.localize(ref)
    device = device or config.device or dist_utils.default_device(dist_utils.detect())
    model, tok, manifest = handoff.load_stage(local, device, options=config.hf)
    name = manifest["stage"] or stage or "sft"
    numbers = evaluate(config, name, model, tok, local)
    if manifest.get("external"):
        return {"stage": name, "model_hash": manifest["content_hash"], **numbers}
    return write_record(ref, config, name, manifest["content_hash"], numbers)
