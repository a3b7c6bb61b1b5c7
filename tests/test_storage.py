"""A runs directory given as an fsspec URL: stages hand checkpoints to each other through it,
as pods sharing a bucket do. `memory://` and `file://` stand in for s3:// or gs://."""
import uuid

import fsspec
import pytest

from flows.cli import main as cli
from flows.pipeline import alignment_pipeline, run_stage
from stages import STAGES, handoff, storage


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
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl", "manifest.json", "curves.png"):
        assert f"sft/{name}" in files and f"pretrain/{name}" in files, name
    assert "report.md" in files
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

    # Re-running finds the remote stages complete and skips them.
    again = alignment_pipeline(config=config, align="none")
    assert all(r.get("skipped") for r in again["stages"].values())

    capsys.readouterr()
    assert cli(["runs", "--runs-dir", runs_url]) == 0
    listing = capsys.readouterr().out
    assert listing.startswith("r1\n  pretrain") and f"<- {sft_url}" in listing  # r2's dpo names its parent


def test_a_corrupt_remote_file_is_named_and_never_loaded(runs_url, tmp_path, monkeypatch, small_config):
    monkeypatch.setenv("ALIGNFLOW_CACHE_DIR", str(tmp_path / "cache"))
    url = f"{runs_url}/r/pretrain"
    STAGES["pretrain"].run(small_config(), None, url)
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
