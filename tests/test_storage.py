"""A runs directory given as an fsspec URL: stages hand checkpoints to each other through it,
as pods sharing a bucket do. `memory://` and `file://` stand in for s3:// or gs://; a local
parent's manifest is held to the same rule for the names it lists."""
import hashlib
import json
import re
import uuid

import fsspec
import pytest

from alignflow.flows.cli import main as cli
from alignflow.flows.pipeline import alignment_pipeline, run_stage
from alignflow.stages import handoff, storage
from alignflow.stages.run import train_stage


@pytest.fixture(params=["memory", "file"])
def runs_url(request, tmp_path):
    if request.param == "memory":
        return f"memory://alignflow-{uuid.uuid4().hex[:8]}"
    return f"file://{tmp_path}/bucket"


def remote_files(url: str) -> set[str]:
    fs, root = fsspec.core.url_to_fs(url)
    return {path[len(root.rstrip('/')) + 1:] for path in fs.find(root)}


def test_stages_hand_off_through_an_fsspec_runs_dir(runs_url, tmp_path, monkeypatch, capsys, small_config,
                                                    prefect_harness):
    monkeypatch.setenv("ALIGNFLOW_CACHE_DIR", str(tmp_path / "cache-a"))
    config = small_config(runs_dir=runs_url, run_id="r1")
    out = alignment_pipeline(config=config, align="none")
    sft_url = f"{runs_url}/r1/sft"
    assert out["stages"]["sft"]["path"] == sft_url
    files = remote_files(f"{runs_url}/r1")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl", "manifest.json", "curves.png",
                 "eval.json"):
        assert f"sft/{name}" in files and f"pretrain/{name}" in files, name
    assert "report.md" in files and "eval.png" in files
    assert not any(f.endswith(storage.PART_SUFFIX) for f in files)  # no partial uploads
    # Training checkpoints are mirrored (the last keep_last of them) so a retry elsewhere can resume.
    mirrored = sorted(f.split("/")[2] for f in files if f.startswith("sft/state/step-") and f.endswith("trainer_state.json"))
    local = sorted(p.name for p in (storage.local_dir(sft_url) / "state").glob("step-*"))
    assert mirrored == local and mirrored
    assert storage.read_manifest(sft_url)["parent"]["path"] == f"{runs_url}/r1/pretrain"

    # Another worker with an empty cache: it downloads the parent, verifies it and publishes DPO.
    monkeypatch.setenv("ALIGNFLOW_CACHE_DIR", str(tmp_path / "cache-b"))
    dpo = run_stage(stage="dpo", config=config, parent=sft_url, run_id="r2")["stages"]["dpo"]
    assert dpo["path"] == f"{runs_url}/r2/dpo"
    manifest = storage.read_manifest(dpo["path"])
    assert manifest["parent"] == {"path": sft_url, "content_hash": out["stages"]["sft"]["content_hash"], "stage": "sft"}
    assert handoff.verify(storage.localize(dpo["path"]))["content_hash"] == dpo["content_hash"]

    # Re-running finds the remote stages complete and skips them, and their evaluation current.
    again = alignment_pipeline(config=config, align="none")
    assert all(r.get("skipped") and not r.get("reevaluated") for r in again["stages"].values())
    assert again["stages"]["sft"]["evaluation"] == out["stages"]["sft"]["evaluation"]

    capsys.readouterr()
    assert cli(["runs", "--runs-dir", runs_url]) == 0
    listing = capsys.readouterr().out
    assert listing.startswith("r1\n  pretrain") and f"<- {sft_url}" in listing  # r2's dpo names its parent


def test_a_corrupt_remote_file_is_named_and_never_loaded(runs_url, tmp_path, monkeypatch, small_config):
    monkeypatch.setenv("ALIGNFLOW_CACHE_DIR", str(tmp_path / "cache"))
    url = f"{runs_url}/r/pretrain"
    train_stage("pretrain", small_config(), None, url)
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{root}/tokenizer.json", b"{}")
    monkeypatch.setenv("ALIGNFLOW_CACHE_DIR", str(tmp_path / "fresh"))
    with pytest.raises(handoff.StageDirError, match="tokenizer.json"):
        storage.localize(url)
    assert not (storage.cache_dir(url) / handoff.MANIFEST).exists()  # the bad copy never looks complete


def test_publish_uploads_the_manifest_last_and_not_the_state(tmp_path, monkeypatch):
    local = tmp_path / "stage"
    (local / "state").mkdir(parents=True)
    for name in ("model.safetensors", "manifest.json", "state/rng.pt"):
        (local / name).write_text(name)
    written = []
    url = f"memory://order-{uuid.uuid4().hex[:8]}/s"
    real_put = storage.put_file
    monkeypatch.setattr(storage, "put_file", lambda path, target: (written.append(target.rsplit("/", 1)[1]),
                                                                   real_put(path, target)))
    storage.publish(local, url)
    assert written == ["model.safetensors", "manifest.json"]  # manifest last; state/ is mirrored on its own


def remote_stage(url: str, extra: dict[str, bytes] = {}, sha256=None) -> dict:
    """A published stage in a memory:// bucket (placeholder bytes: only the hand-off is tested);
    `extra` adds files that the manifest lists after the weights, `sha256` replaces the map."""
    fs, root = fsspec.core.url_to_fs(url)
    files = {**{name: name.encode() for name in ("config.json", "model.safetensors", "tokenizer.json")}, **extra}
    for name, data in files.items():
        if name:  # an empty name is only listed: there is no such remote file
            fs.pipe_file(f"{root}/{name}", data)
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    manifest = {"stage": "sft", "content_hash": handoff.content_hash(digests), "sha256": digests}
    if sha256 is not None:
        manifest["sha256"] = sha256
    if sha256 == "missing":
        del manifest["sha256"]
    fs.pipe_file(f"{root}/{handoff.MANIFEST}", json.dumps(manifest).encode())
    return manifest


@pytest.mark.parametrize("entry", ["../../../../../escaped.sh", "ABSOLUTE", "a/../../b.sh", "..\\b.sh", "C:b.sh", ""])
def test_localize_refuses_names_outside_the_stage_dir(tmp_path, monkeypatch, entry):
    monkeypatch.setenv("ALIGNFLOW_CACHE_DIR", str(tmp_path / "cache"))
    url = f"memory://trav-{uuid.uuid4().hex[:8]}/r/sft"
    entry = str(tmp_path / "absolute.sh") if entry == "ABSOLUTE" else entry
    remote_stage(url, extra={entry: b"echo pwned"})
    with pytest.raises(handoff.StageDirError) as info:
        storage.localize(url)
    message = str(info.value)
    assert f"{url}/manifest.json" in message and repr(entry) in message, message
    assert "\n" not in message
    # Refused before anything was downloaded, inside the cache or out of it.
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "escaped.sh").exists() and not (tmp_path / "absolute.sh").exists()


@pytest.mark.parametrize("entry", ["../../../secret.txt", "ABSOLUTE", "a/../../../../secret.txt"])
def test_a_local_parent_whose_manifest_names_a_file_outside_it_is_refused(tmp_path, capsys, entry):
    """The same rule for a local directory: a manifest listing `../../../../etc/hostname` (with
    its right hash) was accepted as a parent, and `alignflow eval` hashed `/etc/os-release`."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    stage = tmp_path / "runs" / "r" / "sft"
    stage.mkdir(parents=True)
    entry = str(secret) if entry == "ABSOLUTE" else entry
    files = {"config.json": b"{}", "tokenizer.json": b"{}"}
    for name, data in files.items():
        (stage / name).write_bytes(data)
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    digests[entry] = hashlib.sha256(secret.read_bytes()).hexdigest()  # the right hash
    (stage / handoff.MANIFEST).write_text(json.dumps({"stage": "sft", "sha256": digests}))
    with pytest.raises(handoff.StageDirError, match=rf"refusing sha256 entry '{re.escape(entry)}': not a plain "):
        handoff.verify(stage)
    assert cli(["eval", str(stage)]) == 1
    err = capsys.readouterr().err
    assert "not a plain relative path" in err and hashlib.sha256(b"not yours").hexdigest() not in err, err


def test_localize_does_not_follow_a_symlink_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNFLOW_CACHE_DIR", str(tmp_path / "cache"))
    url = f"memory://link-{uuid.uuid4().hex[:8]}/r/sft"
    remote_stage(url, extra={"evil/run.sh": b"echo pwned"})
    outside = tmp_path / "outside"
    outside.mkdir()
    local = storage.cache_dir(url)
    local.mkdir(parents=True)
    (local / "evil").symlink_to(outside)
    with pytest.raises(handoff.StageDirError, match=r"manifest\.json: refusing sha256 entry 'evil/run\.sh'.*symlink"):
        storage.localize(url)
    assert list(outside.iterdir()) == []
    assert not (local / "config.json").exists()  # nothing downloaded


@pytest.mark.parametrize("sha256", ["missing", ["model.safetensors"], "abc"])
def test_localize_names_a_manifest_without_a_sha256_map(tmp_path, monkeypatch, sha256):
    monkeypatch.setenv("ALIGNFLOW_CACHE_DIR", str(tmp_path / "cache"))
    url = f"memory://nomap-{uuid.uuid4().hex[:8]}/r/sft"
    remote_stage(url, sha256=sha256)
    with pytest.raises(handoff.StageDirError, match=rf"^{url}/manifest\.json records no sha256 map"):
        storage.localize(url)


def test_localize_downloads_a_well_formed_remote_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNFLOW_CACHE_DIR", str(tmp_path / "cache"))
    url = f"memory://ok-{uuid.uuid4().hex[:8]}/r/sft"
    manifest = remote_stage(url, extra={"metrics.jsonl": b"{}\n"})
    local = storage.localize(url)
    assert local == storage.cache_dir(url)
    assert handoff.verify(local)["content_hash"] == manifest["content_hash"]
    assert (local / "metrics.jsonl").read_bytes() == b"{}\n"
