"""The stage hand-off: one checkpoint directory per stage (design.md §2).

    <runs>/<run-id>/<stage>/
      model.safetensors  config.json  tokenizer.json  metrics.jsonl
      manifest.json      written last: a directory without it is incomplete
      state/             resumable training state of an unfinished stage

A stage only ever writes inside its own directory, so a failing stage cannot damage its
parent's checkpoint."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from models import Tokenizer, load_pretrained
from trainers.checkpoint import CHECKPOINT_DIR, sha256_file, write_json_atomic

MANIFEST = "manifest.json"
FINGERPRINT = "fingerprint.json"
WEIGHT_FILES = ("model.safetensors", "config.json", "tokenizer.json")


class StageDirError(RuntimeError):
    """A stage directory is incomplete or a file in it does not match its recorded sha256."""


def file_hashes(out_dir: Path) -> dict[str, str]:
    names = [*WEIGHT_FILES, "metrics.jsonl"]
    return {n: sha256_file(out_dir / n) for n in names if (out_dir / n).exists()}


def content_hash(sha256: dict[str, str]) -> str:
    """What a child stage depends on: the weights, config and tokenizer (not the metrics log)."""
    lines = "".join(f"{name}:{sha256[name]}\n" for name in WEIGHT_FILES)
    return hashlib.sha256(lines.encode()).hexdigest()


def write_manifest(out_dir: Path, fields: dict) -> dict:
    """Hash every file and write manifest.json last; from here on the directory is complete."""
    sha = file_hashes(out_dir)
    missing = [n for n in WEIGHT_FILES if n not in sha]
    if missing:
        raise StageDirError(f"{out_dir}: cannot complete the stage, missing {', '.join(missing)}")
    manifest = {**fields, "sha256": sha, "content_hash": content_hash(sha)}
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def read_manifest(stage_dir: str | Path) -> dict:
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        raise StageDirError(f"{stage_dir} is not a complete stage directory: {MANIFEST} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StageDirError(f"{path} is not valid JSON: {e}") from e


def verify(stage_dir: str | Path) -> dict:
    """The manifest, after checking every recorded sha256; the error names the bad file."""
    stage_dir = Path(stage_dir)
    manifest = read_manifest(stage_dir)
    for name, digest in manifest["sha256"].items():
        path = stage_dir / name
        if not path.exists():
            raise StageDirError(f"{path} is listed in the manifest but missing")
        if sha256_file(path) != digest:
            raise StageDirError(f"{path} does not match the sha256 recorded in {stage_dir / MANIFEST}")
    return manifest


def prepare_out_dir(out_dir: Path, config_hash: str, parent_hash: str | None) -> None:
    """Make `out_dir` ready for a (re)run: drop an old manifest, and keep the resumable state
    only when it was written for this same config and parent (then a retry resumes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    state = out_dir / CHECKPOINT_DIR
    fingerprint = {"config_hash": config_hash, "parent_hash": parent_hash}
    fp_path = state / FINGERPRINT
    if state.exists() and (not fp_path.exists() or json.loads(fp_path.read_text()) != fingerprint):
        shutil.rmtree(state)
    state.mkdir(exist_ok=True)
    write_json_atomic(fp_path, fingerprint)


def load_stage(stage_dir: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, manifest) of a verified stage directory."""
    manifest = verify(stage_dir)
    model = load_pretrained(str(stage_dir), device=device)
    tokenizer = Tokenizer.load(str(Path(stage_dir) / "tokenizer.json"))
    return model, tokenizer, manifest
