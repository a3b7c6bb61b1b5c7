"""The stage hand-off: one checkpoint directory per stage, a Hugging Face model directory
(docs/handoff.md). Each path has one writer:

    <runs>/<run-id>/<stage>/
      config.json  generation_config.json  model.safetensors (or model-0000N-of-0000M.safetensors
      + model.safetensors.index.json)  tokenizer.json  tokenizer_config.json  chat_template.jinja
                         the stage (`save_stage`), after training: what transformers, vLLM and
                         the next stage load
      adapter/           a LoRA stage (`save_stage`): adapter_config.json + adapter_model.safetensors,
                         peft's layout, the adapter alone on top of the parent (the model files
                         above hold it merged)
      metrics.jsonl      the trainer's metrics logger, as it trains
      ref_logps/         DPO's trainer: its reference log-prob cache
      curves.png         the flow, after the stage (flows/report.py)
      manifest.json      the stage (`write_manifest`), last: a directory without it is incomplete
      eval.json          the stage's evaluation, after the manifest (stages/eval_record.py): not
                         part of the model, rewritten when only the `eval` settings change
      state/             the trainer: resumable checkpoints (trainers/checkpoint.py)
      work/              the stage's run (`prepare_out_dir`, `work_file`): what state/ was
                         written for (fingerprint.json), pretraining's tokenizer in progress

A stage only ever writes inside its own directory, so a failing stage cannot damage its
parent's checkpoint. state/ and work/ stay local (a URL gets state/ mirrored on its own).

A parent may also be a plain Hugging Face model directory (an external base, e.g. a model
downloaded from the hub): it has no manifest, so `verify` hashes its files and gives a record of
the same shape, whose content hash is what its children's skip check compares."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from alignflow.models import (BUILTIN, REWARD, TRANSFORMERS, ensure_pad_token, fit_vocabulary, load_model,
                              load_tokenizer, save_model)
from alignflow.models.hf_io import is_reward_directory
from alignflow.models.files import seal, sha256_file, verify_seal, write_json_atomic
from alignflow.models.lora import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, save_adapter
from alignflow.models.tokenizer import require_tokenizer_files
from alignflow.trainers.checkpoint import CHECKPOINT_DIR

MANIFEST = "manifest.json"
WORK_DIR = "work"
FINGERPRINT = "fingerprint.json"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
WEIGHT_INDEX = "model.safetensors.index.json"
OPTIONAL_FILES = ("metrics.jsonl",)  # sealed too when present, but not part of content_hash
EVAL_RECORD = "eval.json"  # the stage's evaluation, written after the manifest (stages/eval_record.py)
NOT_MODEL_FILES = {MANIFEST, EVAL_RECORD, "curves.png", *OPTIONAL_FILES}  # top-level files that are not the model


class StageDirError(RuntimeError):
    """A stage directory is incomplete or a file in it does not match its recorded sha256."""


def model_files(directory: str | Path) -> list[str]:
    """The model's files in a directory: its top-level files, less alignflow's own records and
    hidden or temporary files (subdirectories such as state/ are never part of it)."""
    return sorted(p.name for p in Path(directory).iterdir()
                  if p.is_file() and p.name not in NOT_MODEL_FILES and not p.name.startswith(".")
                  and not p.name.endswith((".tmp", ".part")))


def weight_files(directory: Path, names: list[str]) -> list[str]:
    """The safetensors files the model's weights are in: one file, or the shards its index names."""
    if WEIGHT_INDEX in names:
        try:
            index = json.loads((directory / WEIGHT_INDEX).read_text())
            return [WEIGHT_INDEX, *sorted(set(index["weight_map"].values()))]
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise StageDirError(f"{directory / WEIGHT_INDEX} is not a safetensors index: {e}") from e
    found = [n for n in names if n.endswith(".safetensors")]
    if not found:
        # .bin/.pt weights would have to be unpickled: never, for a file from elsewhere.
        raise StageDirError(f"{directory} holds no safetensors weights (alignflow never loads pickled "
                            "weights such as pytorch_model.bin; convert them to safetensors)")
    return found


def content_hash(sha256: dict[str, str]) -> str:
    """What a child stage depends on: every model file (not alignflow's metrics log)."""
    lines = "".join(f"{name}:{digest}\n" for name, digest in sorted(sha256.items()) if name not in OPTIONAL_FILES)
    return hashlib.sha256(lines.encode()).hexdigest()


def write_manifest(out_dir: Path, fields: dict) -> dict:
    """Hash every file and write manifest.json last (with the content hash derived from the
    same digests); from here on the directory is complete."""
    names = model_files(out_dir)
    missing = [n for n in (CONFIG, TOKENIZER) if n not in names]
    if missing:
        raise StageDirError(f"{out_dir}: cannot complete the stage, missing {', '.join(missing)}")
    weight_files(out_dir, names)  # weights there, and every shard of an index
    names += adapter_files(out_dir) + [n for n in OPTIONAL_FILES if (out_dir / n).exists()]
    return seal(out_dir, MANIFEST, fields, names, derive=lambda sha: {"content_hash": content_hash(sha)})


def is_external_base(directory: str | Path) -> bool:
    """A plain Hugging Face model directory: a model config and no trace of alignflow (an
    unfinished stage directory has work/ and is not one)."""
    d = Path(directory)
    return (d / CONFIG).is_file() and not any((d / name).exists() for name in (MANIFEST, WORK_DIR, CHECKPOINT_DIR))


def external_base(directory: str | Path) -> dict:
    """The record of a plain Hugging Face model directory used as a parent: its path and the
    sha256 of each model file, hashed now (it has no manifest to compare with)."""
    d = Path(directory).resolve()
    names = model_files(d)
    weight_files(d, names)
    require_tokenizer_files(str(d))  # refused here, before a flow starts a stage on it
    digests = {name: sha256_file(d / name) for name in names}
    kind = REWARD if is_reward_directory(str(d)) else TRANSFORMERS  # a sequence classifier loads as one
    return {"stage": None, "external": True, "path": str(d), "model_kind": kind, "run_id": d.name,
            "content_hash": content_hash(digests), "sha256": digests, "metrics": {}, "timings": {}}


def verify(stage_dir: str | Path) -> dict:
    """The manifest, after checking every recorded sha256 (and that the config, the tokenizer
    and every weight file are among them); the error names the bad file. A plain Hugging Face
    model directory gives its `external_base` record."""
    if is_external_base(stage_dir):
        return external_base(stage_dir)
    not_a_model_directory(Path(stage_dir))
    record = verify_seal(stage_dir, MANIFEST, StageDirError, required=(CONFIG, TOKENIZER))
    listed = record["sha256"]
    unlisted = [n for n in weight_files(Path(stage_dir), model_files(stage_dir)) if n not in listed]
    if unlisted:
        raise StageDirError(f"{Path(stage_dir) / MANIFEST} does not list {', '.join(unlisted)} in sha256: "
                            "cannot verify it")
    return record


def not_a_model_directory(d: Path) -> None:
    """Say what `d` really is when it is neither a stage directory (a manifest, or an unfinished
    run's work/ or state/) nor a Hugging Face model directory (config.json): "manifest.json is
    missing" would send the user looking for the wrong file."""
    if not d.exists():
        raise StageDirError(f"{d} does not exist: give a stage directory of an earlier run or a Hugging Face model "
                            "directory")
    if not d.is_dir():
        raise StageDirError(f"{d} is a file: give a stage directory of an earlier run or a Hugging Face model "
                            "directory")
    if any((d / name).exists() for name in (MANIFEST, WORK_DIR, CHECKPOINT_DIR)):
        return  # a stage directory, finished or not: verify_seal says what is wrong with it
    weights = [n for n in model_files(d) if n.endswith(".safetensors") or n in ("pytorch_model.bin", WEIGHT_INDEX)]
    if weights:
        raise StageDirError(f"{d} has no {CONFIG}, so it is not a Hugging Face model directory (its weights "
                            f"{', '.join(weights[:3])} need the model's {CONFIG} beside them): copy it from where "
                            "the model came from")
    raise StageDirError(f"{d} is neither a stage directory ({MANIFEST}) nor a Hugging Face model directory "
                        f"({CONFIG} and weights)")


def work_file(out_dir: Path, name: str) -> Path:
    """A file of the stage's own work/ directory (created on first use)."""
    (out_dir / WORK_DIR).mkdir(parents=True, exist_ok=True)
    return out_dir / WORK_DIR / name


def discard_progress(out_dir: Path) -> None:
    """Forget an unfinished run: the trainer's checkpoints and the stage's work files."""
    for name in (CHECKPOINT_DIR, WORK_DIR):
        shutil.rmtree(out_dir / name, ignore_errors=True)


def prepare_out_dir(out_dir: Path, config_hash: str, parent_hash: str | None,
                    inputs: dict[str, str] | None = None) -> None:
    """Make `out_dir` ready for a (re)run: drop an old manifest, and keep the resumable state
    only when it was written for this same config, parent and other inputs ({role: content
    hash}) (then a retry resumes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    fingerprint = {"config_hash": config_hash, "parent_hash": parent_hash}
    if inputs:  # absent without: the state of a stage that reads none stays valid as it was written
        fingerprint["inputs"] = inputs
    path = out_dir / WORK_DIR / FINGERPRINT
    if not path.exists() or json.loads(path.read_text()) != fingerprint:
        discard_progress(out_dir)
    write_json_atomic(work_file(out_dir, FINGERPRINT), fingerprint)


def save_stage(out_dir: Path, model: torch.nn.Module, tokenizer, max_shard_size: str = "5GB",
               adapter: tuple[dict, object] | None = None) -> None:
    """The Hugging Face model directory a child stage loads (`load_stage`); the manifest comes
    after it. A previous attempt's model files go first, so no stale shard is sealed with it.
    `adapter`: a LoRA stage's (tensors, peft config), written to adapter/ beside the merged model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in model_files(out_dir):
        (out_dir / name).unlink()
    shutil.rmtree(out_dir / ADAPTER_DIR, ignore_errors=True)
    save_model(model, str(out_dir), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(out_dir))
    if adapter is not None:
        save_adapter(str(out_dir / ADAPTER_DIR), *adapter)


def adapter_files(directory: Path) -> list[str]:
    """adapter/'s two files, as the manifest names them, when the stage trained a LoRA adapter."""
    names = [f"{ADAPTER_DIR}/{name}" for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)]
    return names if (directory / ADAPTER_DIR).is_dir() else []


def load_stage(stage_dir: str | Path, device: str | torch.device = "cpu", options=None,
               manifest: dict | None = None, quantize: str | None = None, as_reward_model: bool = False):
    """(model, tokenizer, manifest) of a verified stage directory or plain Hugging Face model
    directory. `options`: how to load a transformers model (stages.config.HFConfig); the
    tokenizer gets a padding token that is not EOS, the model an embedding row for it.
    `manifest`: what `verify` already returned for it (a multi-GB base is hashed once, not at
    every load). `quantize`: "4bit" loads a transformers model's linear layers in NF4 (QLoRA).
    `as_reward_model`: a causal LM loaded under a new scalar head (models.load_reward_model)."""
    manifest = manifest or verify(stage_dir)
    chat_template = None
    if options is not None and options.chat_template:
        try:
            chat_template = Path(options.chat_template).read_text()
        except OSError as e:
            raise ValueError(f"hf.chat_template: cannot read {options.chat_template}: {e}") from e
    trust = bool(options and options.trust_remote_code)
    tokenizer = load_tokenizer(str(stage_dir), chat_template=chat_template, trust_remote_code=trust)
    added = int(ensure_pad_token(tokenizer))  # the one token the model may lack a row for
    kwargs = {} if options is None else {"dtype": options.dtype, "attn_implementation": options.attn_implementation}
    # Manifests from before transformers models were supported only ever held the built-in model.
    model = load_model(str(stage_dir), manifest.get("model_kind", BUILTIN), device=device, trust_remote_code=trust,
                       quantize=quantize, as_reward_model=as_reward_model, **kwargs)
    fit_vocabulary(model, tokenizer, added, source=str(stage_dir))
    return model, tokenizer, manifest


def stage_result(ref: str | Path, manifest: dict) -> dict:
    """What a stage hands the next one (and the flow): where it is and what it contains."""
    return {"stage": manifest["stage"], "path": str(ref), "content_hash": manifest["content_hash"],
            "metrics": manifest["metrics"], "timings": manifest["timings"], "external": manifest.get("external", False)}
