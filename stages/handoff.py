"""The stage hand-off: one checkpoint directory per stage (docs/handoff.md). Each path has
one writer:

    <runs>/<run-id>/<stage>/
      model.safetensors  config.json  tokenizer.json
                         the stage (`save_stage`), after training
      metrics.jsonl      the trainer's metrics logger, as it trains
      ref_logps/         DPO's trainer: its reference log-prob cache
      curves.png         the flow, after the stage (flows/report.py)
      manifest.json      the stage (`write_manifest`), last: a directory without it is incomplete
      state/             the trainer: resumable checkpoints (trainers/checkpoint.py)
      work/              the stage's run (`prepare_out_dir`, `work_file`): what state/ was
                         written for (fingerprint.json), pretraining's tokenizer in progress

A stage only ever writes inside its own directory, so a failing stage cannot damage its
parent's checkpoint. state/ and work/ stay local (a URL gets state/ mirrored on its own)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from models import Tokenizer, load_pretrained, save_pretrained
from models.files import read_seal, seal, verify_seal, write_json_atomic
from trainers.checkpoint import CHECKPOINT_DIR

MANIFEST = "manifest.json"
WORK_DIR = "work"
FINGERPRINT = "fingerprint.json"
TOKENIZER = "tokenizer.json"
WEIGHT_FILES = ("model.safetensors", "config.json", TOKENIZER)
OPTIONAL_FILES = ("metrics.jsonl",)  # sealed too when present, but not part of content_hash


class StageDirError(RuntimeError):
    """A stage directory is incomplete or a file in it does not match its recorded sha256."""


def content_hash(sha256: dict[str, str]) -> str:
    """What a child stage depends on: the weights, config and tokenizer (not the metrics log)."""
    lines = "".join(f"{name}:{sha256[name]}\n" for name in WEIGHT_FILES)
    return hashlib.sha256(lines.encode()).hexdigest()


def write_manifest(out_dir: Path, fields: dict) -> dict:
    """Hash every file and write manifest.json last (with the content hash derived from the
    same digests); from here on the directory is complete."""
    missing = [n for n in WEIGHT_FILES if not (out_dir / n).exists()]
    if missing:
        raise StageDirError(f"{out_dir}: cannot complete the stage, missing {', '.join(missing)}")
    names = [*WEIGHT_FILES, *(n for n in OPTIONAL_FILES if (out_dir / n).exists())]
    return seal(out_dir, MANIFEST, fields, names, derive=lambda sha: {"content_hash": content_hash(sha)})


def read_manifest(stage_dir: str | Path) -> dict:
    """The manifest as recorded, without checking the files (cheap: for listings)."""
    return read_seal(stage_dir, MANIFEST, StageDirError)


def verify(stage_dir: str | Path) -> dict:
    """The manifest, after checking every recorded sha256 (and that the weights, config and
    tokenizer are among them); the error names the bad file."""
    return verify_seal(stage_dir, MANIFEST, StageDirError, required=WEIGHT_FILES)


def work_file(out_dir: Path, name: str) -> Path:
    """A file of the stage's own work/ directory (created on first use)."""
    (out_dir / WORK_DIR).mkdir(parents=True, exist_ok=True)
    return out_dir / WORK_DIR / name


def discard_progress(out_dir: Path) -> None:
    """Forget an unfinished run: the trainer's checkpoints and the stage's work files."""
    for name in (CHECKPOINT_DIR, WORK_DIR):
        shutil.rmtree(out_dir / name, ignore_errors=True)


def prepare_out_dir(out_dir: Path, config_hash: str, parent_hash: str | None) -> None:
    """Make `out_dir` ready for a (re)run: drop an old manifest, and keep the resumable state
    only when it was written for this same config and parent (then a retry resumes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    fingerprint = {"config_hash": config_hash, "parent_hash": parent_hash}
    path = out_dir / WORK_DIR / FINGERPRINT
    if not path.exists() or json.loads(path.read_text()) != fingerprint:
        discard_progress(out_dir)
    write_json_atomic(work_file(out_dir, FINGERPRINT), fingerprint)


def save_stage(out_dir: Path, model: torch.nn.Module, tokenizer: Tokenizer) -> None:
    """The files a child stage loads (`load_stage`); the manifest comes after them."""
    save_pretrained(model, str(out_dir))
    tokenizer.save(str(out_dir / TOKENIZER))


def load_stage(stage_dir: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, manifest) of a verified stage directory."""
    manifest = verify(stage_dir)
    model = load_pretrained(str(stage_dir), device=device)
    tokenizer = Tokenizer.load(str(Path(stage_dir) / TOKENIZER))
    return model, tokenizer, manifest


def stage_result(ref: str | Path, manifest: dict) -> dict:
    """What a stage hands the next one (and the flow): where it is and what it contains."""
    return {"stage": manifest["stage"], "path": str(ref), "content_hash": manifest["content_hash"],
            "metrics": manifest["metrics"], "timings": manifest["timings"]}
