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
from pathlib import Path

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
    assert err[-1] == (f"alignflow stage: error: [Errno 30] writing the stage's model directory "
                       f"{tmp_path / 'ro' / 'sft'} failed: Read-only file system: "
                       f"{tmp_path / 'ro' / 'sft' / 'model.safetensors'}; the training is kept in "
                       f"{tmp_path / 'ro' / 'sft' / 'state'} (its last checkpoint): make it writable and re-run the "
                       "same command, which writes the directory from there without training again")
    assert len(attempts) == 1


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, small_config):
    """A finished pretrain stage, trained in this process (no flow)."""
    out = tmp_path_factory.mktemp("parent") / "pretrain"
    train_stage("pretrain", small_config(), None, out)
    return out


def stages_cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m alignflow.stages ARGS`, as a user runs it (not under the flow: no failure dir)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("ALIGNFLOW_DEBUG", "ALIGNFLOW_FAILURE_DIR")}
    return subprocess.run([sys.executable, "-m", "alignflow.stages", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env={**clean, **(env or {})})


SMALL_SETS = [arg for key, value in SMALL_PIPELINE.items() for arg in ("--set", f"{key}={value}")]
TAG = '!!python/object/apply:os.system ["echo pwned"]'
# stage, extra arguments (parent, data), the error after "python -m alignflow.stages <stage>: error: "
REFUSALS = {
    "bad setting": ("pretrain", lambda tmp, parent: ["--set", "pretrain.train.lr=abc"],
                    "pretrain.train.lr: Input should be a valid number, unable to parse string as a number (got 'abc')"),
    "yaml tag in --set": ("pretrain", lambda tmp, parent: ["--set", f"x={TAG}"],
                          f"--set x: the value '{TAG}' is not plain YAML (could not determine a constructor for the "
                          "tag 'tag:yaml.org,2002:python/object/apply:os.system'); give a number, true/false, text, "
                          "a [list] or a {{mapping}}, quoted for the shell"),
    "wrong parent stage": ("dpo", lambda tmp, parent: ["--parent", parent],
                           "dpo trains on a sft checkpoint, but {parent} holds a pretrain stage"),
    "zero rows": ("sft", lambda tmp, parent: ["--parent", parent, "--set", f"sft.data.source={tmp / 'empty.jsonl'}"],
                  "{tmp}/empty.jsonl: empty, no rows"),
}


@pytest.mark.parametrize("probe", list(REFUSALS))
def test_python_m_stages_refuses_bad_input_in_one_line(probe, tmp_path, pretrained):
    stage, extra, message = REFUSALS[probe]
    (tmp_path / "empty.jsonl").write_text("")
    proc = stages_cli(stage, *SMALL_SETS, *extra(tmp_path, pretrained), "--out", tmp_path / "out")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [f"python -m alignflow.stages {stage}: error: "
                                        + message.format(tmp=tmp_path, parent=pretrained)], proc.stderr
    assert "pwned" not in proc.stdout
    assert not (tmp_path / "out" / handoff.MANIFEST).exists()


def test_python_m_stages_shows_the_traceback_with_debug(tmp_path):
    for how, env in ((["--debug"], None), ([], {"ALIGNFLOW_DEBUG": "1"})):
        proc = stages_cli("pretrain", *how, "--set", "pretrain.train.lr=abc", "--out", tmp_path / "out", env=env)
        assert proc.returncode == 1
        assert proc.stderr.startswith("Traceback (most recent call last):"), proc.stderr
        assert "pretrain.train.lr" in proc.stderr.splitlines()[-3]


class SafetensorError(Exception):
    """What safetensors raises on a full disk: not an OSError, the errno only in its message."""


@pytest.mark.parametrize("raised", [OSError(28, "No space left on device"),
                                    SafetensorError("Error while serializing: I/O error: No space left on device "
                                                    "(os error 28)")], ids=["OSError", "safetensors"])
def test_a_full_disk_at_the_final_save_is_one_line_naming_the_directory_and_loses_nothing(
        raised, tmp_path, pretrained, small_config, monkeypatch):
    import errno

    config = small_config(**{"sft.train.max_steps": 4, "sft.train.save_interval": 2})
    out = tmp_path / "sft"
    with monkeypatch.context() as m:
        def full(model, directory, **kwargs):
            (Path(directory) / "model.safetensors").write_bytes(b"half")  # what a full disk leaves
            raise raised

        m.setattr(handoff, "save_model", full)
        with pytest.raises(OSError) as failure:
            train_stage("sft", config, pretrained, out)
    assert failure.value.errno == errno.ENOSPC
    assert str(failure.value) == (
        f"[Errno 28] writing the stage's model directory {out} failed: No space left on device; the training is kept "
        f"in {out / 'state'} (its last checkpoint): free space and re-run the same command, which writes the "
        "directory from there without training again")
    assert not (out / handoff.MANIFEST).exists()
    assert (out / "state" / "step-00000004").is_dir()
    # Space freed: the re-run writes the directory from the last checkpoint, training nothing again.
    result = train_stage("sft", config, pretrained, out)
    manifest = handoff.verify(result["path"])
    assert manifest["restored_from_step"] == 4 and manifest["metrics"]["step"] == 4
