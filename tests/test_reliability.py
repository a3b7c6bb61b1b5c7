"""Nothing lost or silently overwritten, nothing retried that cannot succeed: run ids that never
collide, one writer per directory, a damaged finished stage rebuilt with its numbers and a
warning, manifests that must vouch for every file, and deterministic failures failing once."""
import json
import os
import logging
import shutil
import socket
import subprocess
import sys
import threading

import pytest

from conftest import SMALL_PIPELINE
from alignflow.flows.cli import main as cli
from alignflow.flows.pipeline import alignment_pipeline, new_run_id
from alignflow.stages import handoff, storage
from alignflow.stages.run import train_stage
from alignflow.stages.lock import LOCK_FILE, DirLock, LockError


@pytest.fixture(scope="module")
def finished(tmp_path_factory, small_config, prefect_harness):
    """pretrain -> sft, complete, through the flow."""
    runs = tmp_path_factory.mktemp("runs")
    config = small_config(runs_dir=str(runs), run_id="done")
    return config, alignment_pipeline(config=config, align="none")


def test_one_stage_re_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    ids: list[str] = []
    threads = [threading.Thread(target=lambda: ids.append(new_run_id(str(tmp_path), {"run_id": "tiny"}, "dpo")))
               for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(ids)
    assert all(i.startswith("tiny-dpo-") for i in ids)


def write_lock(directory, pid: int, host: str | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK_FILE).write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid,
                                                   "what": "alignment-pipeline other", "since": "2026-11-24 10:00:00"}))


def exited_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_on_a_held_run_directory_fails_at_once_naming_the_holder(finished, tmp_path):
    config, _ = finished
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(tmp_path / "held", holder.pid)
        before = sorted(p.name for p in (tmp_path / "held").iterdir())
        with pytest.raises(LockError, match=rf"is in use by alignment-pipeline other \(pid {holder.pid} on "
                                            rf"{socket.gethostname()}, since 2026-11-24 10:00:00\)"):
            alignment_pipeline(config=config.model_copy(update={"runs_dir": str(tmp_path), "run_id": "held"}),
                               align="none")
        assert sorted(p.name for p in (tmp_path / "held").iterdir()) == before  # nothing trained into it
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over_and_released(finished, tmp_path):
    config, _ = finished
    write_lock(tmp_path / "r", exited_pid())
    out = alignment_pipeline(config=config.model_copy(update={"runs_dir": str(tmp_path), "run_id": "r"}), align="none")
    assert handoff.verify(out["stages"]["sft"]["path"])
    assert not (tmp_path / "r" / LOCK_FILE).exists()


def test_a_stage_refuses_an_out_dir_another_live_process_writes(finished, tmp_path):
    """What `python -m stages` does when two of it write one --out (another host's lock is obeyed too)."""
    config, result = finished
    for pid, host in ((os.getpid(), None), (exited_pid(), "other-host")):
        write_lock(tmp_path / "sft", pid, host)
        with pytest.raises(LockError, match=f"pid {pid}"):
            train_stage("sft", config, result["stages"]["pretrain"]["path"], tmp_path / "sft")
        assert sorted(p.name for p in (tmp_path / "sft").iterdir()) == [LOCK_FILE]
    with DirLock(tmp_path / "free", "test"):
        assert (tmp_path / "free" / LOCK_FILE).exists()
    assert not (tmp_path / "free" / LOCK_FILE).exists()


def test_a_damaged_finished_stage_is_rebuilt_with_a_warning_and_its_training_numbers(finished, caplog):
    config, result = finished
    sft = result["stages"]["sft"]
    original = storage.read_manifest(sft["path"])
    with open(f"{sft['path']}/model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with caplog.at_level(logging.WARNING):
        again = alignment_pipeline(config=config, align="none")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("model.safetensors is corrupt" in w and "rebuilding sft from its last checkpoint" in w
               for w in warnings), warnings
    rebuilt = handoff.verify(again["stages"]["sft"]["path"])
    assert rebuilt["restored_from_step"] == original["metrics"]["step"] == 24
    for key in ("loss", "grad_norm", "lr", "val_loss", "tokens", "step"):
        assert rebuilt["metrics"][key] == original["metrics"][key], key
    # Seconds of the training that made the weights (recorded in the checkpoint), not of the rebuild.
    assert rebuilt["timings"]["tokens_per_second"] == pytest.approx(original["timings"]["tokens_per_second"], rel=0.2)
    assert rebuilt["content_hash"] == original["content_hash"]  # the same weights, bit for bit


def test_a_manifest_must_list_every_file_the_stage_needs(finished, tmp_path, capsys):
    _, result = finished
    stage = tmp_path / "sft"
    shutil.copytree(result["stages"]["sft"]["path"], stage)
    manifest = json.loads((stage / handoff.MANIFEST).read_text())
    del manifest["sha256"]["model.safetensors"]
    (stage / handoff.MANIFEST).write_text(json.dumps(manifest))
    (stage / "model.safetensors").write_bytes(b"not weights")
    assert cli(["eval", str(stage)]) == 1
    assert f"{stage / handoff.MANIFEST} does not list model.safetensors in sha256" in capsys.readouterr().err
    del manifest["sha256"]
    (stage / handoff.MANIFEST).write_text(json.dumps(manifest))
    assert cli(["generate", str(stage), "--prompt", "hi"]) == 1
    assert f"{stage / handoff.MANIFEST} records no sha256 digests" in capsys.readouterr().err


def test_only_failures_a_retry_can_fix_are_retried(finished, tmp_path, monkeypatch):
    """A DataError fails once with retries=2; a lost connection is retried and the stage resumes."""
    from alignflow.flows import pipeline

    config, result = finished
    calls, lost = [], [ConnectionResetError("storage went away")]

    def flaky(stage, *args):
        if stage == "sft":
            calls.append(args)
            if lost:
                raise lost.pop()
        return train_stage(stage, *args)

    monkeypatch.setattr(pipeline, "train_stage", flaky)
    config = config.model_copy(update={"runs_dir": str(tmp_path), "retries": 2})
    assert handoff.verify(alignment_pipeline(config=config, align="none")["stages"]["sft"]["path"])
    assert len(calls) == 2

    calls.clear()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = config.model_copy(update={"run_id": "bad", "sft": config.sft.model_copy(update={
        "data": config.sft.data.model_copy(update={"source": str(empty)})})})
    with pytest.raises(ValueError, match="empty.jsonl: empty, no rows"):
        alignment_pipeline(config=bad, align="none")
    assert len(calls) == 1


def test_a_read_only_stage_directory_is_one_line_naming_the_path_and_not_retried(finished, tmp_path, monkeypatch,
                                                                                   capsys):
    """What `alignflow stage` prints when the runs directory turns read-only under it (simulated:
    the tests run as root, for whom chmod does not make a directory read-only)."""
    import errno

    config, result = finished
    attempts = []

    def read_only(out_dir, *args, **kwargs):
        attempts.append(out_dir)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(out_dir / "model.safetensors"))

    monkeypatch.setattr(handoff, "save_stage", read_only)
    sets = [arg for key, value in {**SMALL_PIPELINE, "retries": 2}.items() for arg in ("--set", f"{key}={value}")]
    assert cli(["stage", "sft", "--parent", result["stages"]["pretrain"]["path"], "--runs-dir", str(tmp_path),
                "--run-id", "ro", *sets]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"alignflow stage: error: [Errno 30] Read-only file system: "
                       f"'{tmp_path / 'ro' / 'sft' / 'model.safetensors'}'")
    assert len(attempts) == 1
