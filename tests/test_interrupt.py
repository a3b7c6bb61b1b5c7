"""A real `alignflow run` interrupted the ways a person or a cluster does it: Ctrl-C (SIGINT to
its process group, as a terminal sends it; `kill -INT` to a run started as a background job,
which inherits SIGINT ignored), SIGTERM, SIGKILL. It exits quickly with one line
that says how to resume, leaves none of the processes it started (the embedded Prefect server,
torchrun and its ranks), and the re-run ends bitwise where an uninterrupted run ends."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import SMALL_PIPELINE
from alignflow.flows.pipeline import alignment_pipeline
from alignflow.stages.config import load_config
from alignflow.stages import lifeline
from alignflow.stages.lifeline import alive

# Enough SFT steps that the signal lands while SFT trains (a checkpoint every 4 steps).
SETTINGS = {**SMALL_PIPELINE, "sft.train.max_steps": 200}


def as_a_foreground_job() -> None:
    """Ctrl-C's default action, as a terminal's foreground job has it. A process inherits an
    ignored SIGINT, and a shell starts background jobs (`pytest ... &`) with SIGINT ignored:
    without this the CLI would ignore the test's Ctrl-C and train to the end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_run(runs_dir, env, **extra) -> subprocess.Popen:
    sets = [arg for key, value in {**SETTINGS, **extra}.items() for arg in ("--set", f"{key}={value}")]
    # A session of its own, like a shell's foreground job: killpg reaches what a terminal reaches.
    return subprocess.Popen([sys.executable, "-m", "alignflow.flows.cli", "run", "--runs-dir", str(runs_dir), "--run-id", "r",
                             *sets], env=env, start_new_session=True, preexec_fn=as_a_foreground_job,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc, stage_dir, timeout=300.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(stage_dir.glob("state/step-*/trainer_state.json")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no checkpoint in {stage_dir} after {timeout} s"
        time.sleep(0.05)


def descendants(pid: int) -> list[int]:
    """The process tree under `pid` (from /proc: no extra packages)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The CLI on a Prefect home of its own (its embedded server's database), as a new user has."""
    home = tmp_path_factory.mktemp("prefect-home")
    return {**os.environ, "PREFECT_HOME": str(home)}


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_ctrl_c_exits_at_once_leaves_nothing_and_the_rerun_resumes_bitwise(tmp_path, env, prefect_harness):
    runs = tmp_path / "runs"
    proc = cli_run(runs, env)
    wait_for_checkpoint(proc, runs / "r" / "sft")
    started = descendants(proc.pid)
    assert started, "the embedded server runs as a child of the CLI"
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    seconds = time.monotonic() - t0
    assert proc.returncode == 130, err[-3000:]
    assert seconds <= 15, f"took {seconds:.1f} s to exit"
    assert [pid for pid in started if alive(pid)] == []
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("alignflow run: interrupted. sft of run r was not finished; "
                                "Re-running the same command resumes it from step "), last_line
    step = int(last_line.split("from step ")[1].split()[0])

    again = cli_run(runs, env)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    sft_manifest = (runs / "r" / "sft" / "manifest.json").read_text()
    assert f'"resumed_from_step": {step}' in sft_manifest

    straight = alignment_pipeline(config=load_config("tiny", overrides={
        **SETTINGS, "runs_dir": str(tmp_path / "straight"), "run_id": "r"}), align="dpo")
    for stage in ("sft", "dpo"):
        resumed = (runs / "r" / stage / "model.safetensors").read_bytes()
        assert resumed == (tmp_path / "straight" / "r" / stage / "model.safetensors").read_bytes(), stage
    assert straight["stages"]["dpo"]["content_hash"] in (runs / "r" / "dpo" / "manifest.json").read_text()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_process_outlives_a_terminated_or_killed_cli(sig, tmp_path, env):
    """SFT through torchrun with two ranks: the CLI, the server, torchrun and both ranks. After
    SIGTERM everything is gone when the CLI exits; after SIGKILL (no cleanup possible) the
    server and the ranks notice within seconds (stages.lifeline) and exit."""
    proc = cli_run(tmp_path / "runs", env, **{"sft.train.nproc_per_node": 2})
    wait_for_checkpoint(proc, tmp_path / "runs" / "r" / "sft")
    launched = torchrun_logs(tmp_path)
    assert launched, "the flow keeps torchrun's logs in a directory of its own while the ranks run"
    started = descendants(proc.pid)
    assert len(started) >= 4, "server, torchrun, two ranks"
    os.kill(proc.pid, sig)
    proc.communicate(timeout=60)
    assert proc.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL)
    deadline = time.monotonic() + (0 if sig == signal.SIGTERM else 60)
    while (left := [pid for pid in started if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == []
    if sig == signal.SIGTERM:  # SIGKILL leaves it: no process of ours runs any more to remove it
        assert [d for d in launched if d.exists()] == [], "torchrun's log directory outlived the CLI"


def torchrun_logs(tmp_path) -> list[Path]:
    """The log directories of torchrun launches (flows/launch.py) of runs under `tmp_path`."""
    return [d for d in Path(tempfile.gettempdir()).glob("alignflow-launch-*")
            if (d / "config.json").exists() and str(tmp_path) in (d / "config.json").read_text(errors="replace")]


# ---- SIGINT inherited ignored, at each point of a run ----

SIGINT_AT = Path(__file__).parent / "scripts" / "sigint_at.py"
# SFT long enough that a `kill -INT` sent after its first checkpoint lands while it trains.
STEPS = {**SMALL_PIPELINE, "sft.train.max_steps": 40}


def as_a_background_job() -> None:
    """What a non-interactive shell does to `alignflow run &` (a script, a CI step): SIGINT
    ignored. Python then installs no handler of its own, so a `kill -INT` was lost."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def background_run(runs_dir, env, point: str) -> subprocess.Popen:
    """`alignflow run` started as a background job; it sends itself SIGINT at `point`
    (tests/scripts/sigint_at.py), or waits for the test's."""
    sets = [arg for key, value in STEPS.items() for arg in ("--set", f"{key}={value}")]
    return subprocess.Popen([sys.executable, str(SIGINT_AT), point, "run", "--runs-dir", str(runs_dir),
                             "--run-id", "r", *sets], env=env, start_new_session=True,
                            preexec_fn=as_a_background_job, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def interrupted_line(proc: subprocess.Popen, sent: float | None = None, timeout: float = 300) -> str:
    """The run's exit: status 130 within 15 s of the SIGINT (sent at `sent`, or when
    sigint_at.py says it sent it), and its last stderr line, asserted to be the interruption's."""
    _, err = proc.communicate(timeout=timeout)
    ended = time.monotonic()
    assert proc.returncode == 130, err[-3000:]
    if sent is None:
        sent = float(err.split("sigint_at: SIGINT at ")[1].split()[0])
    assert ended - sent <= 15, f"exited {ended - sent:.1f} s after the SIGINT"
    last = err.strip().splitlines()[-1]
    assert last.startswith("alignflow run: interrupted. "), err[-3000:]
    return last


def lifeline_of(pid: int) -> list[int]:
    """The running processes the CLI `pid` started with its PID as their lifeline (the embedded
    server, torchrun, ranks): they carry it in their environment, found after the CLI is gone."""
    mark = f"{lifeline.ENV}={pid}".encode()
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if mark in f.read().split(b"\0") and alive(int(entry)):
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def manifest(runs, stage) -> dict:
    return json.loads((runs / "r" / stage / "manifest.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_sigint_stops_a_background_run_at_every_point_and_nothing_is_lost(tmp_path, env, prefect_harness):
    """Five runs of one run directory, each started with SIGINT ignored (as `alignflow run &` in
    a script is) and each interrupted at another point; each ends within seconds with status 130
    and one line, and each next run goes on from where the last one stopped. Before SIGINT was
    handled explicitly, every one of them ignored it and trained to the end."""
    from prefect.settings import PREFECT_API_URL

    runs = tmp_path / "runs"

    # While the embedded Prefect server starts: the CLI stops it and says nothing was trained.
    proc = background_run(runs, env, "server-start")
    last = interrupted_line(proc)
    assert last.endswith("pretrain of run r was not finished; Re-running the same command resumes it from the "
                         "start (no checkpoint yet)."), last
    assert lifeline_of(proc.pid) == [], "the embedded server outlived the CLI"

    # The other runs use the session's Prefect server (no server start each).
    served = {**env, "PREFECT_API_URL": PREFECT_API_URL.value()}

    # During SFT's training, by `kill -INT <pid>` from outside, as in the report.
    proc = background_run(runs, served, "none")
    wait_for_checkpoint(proc, runs / "r" / "sft")
    os.kill(proc.pid, signal.SIGINT)
    last = interrupted_line(proc, sent=time.monotonic())
    step = int(last.split("resumes it from step ")[1].split()[0])
    assert 2 <= step < 16
    pretrain = manifest(runs, "pretrain")["content_hash"]

    # In the middle of a checkpoint's save: the half-written one is removed, the last whole one
    # is where the next run starts.
    proc = background_run(runs, served, "checkpoint-save")
    last = interrupted_line(proc)
    assert last.endswith(f"resumes it from step {step} (its last checkpoint)."), last
    assert list((runs / "r" / "sft" / "state").glob("*.tmp")) == []

    # While SFT's output is written, after its last checkpoint: the next run rebuilds it from there.
    proc = background_run(runs, served, "stage-output")
    last = interrupted_line(proc)
    assert last.endswith("sft of run r was not finished; Re-running the same command resumes it from step 40 "
                         "(its last checkpoint)."), last
    assert not (runs / "r" / "sft" / "manifest.json").exists()

    # After the flow run is final: Prefect's engine swallows the KeyboardInterrupt there, and the
    # command still ends as interrupted (every stage was finished, and stays so).
    proc = background_run(runs, served, "flow-final")
    last = interrupted_line(proc)
    assert last == "alignflow run: interrupted. Every stage of r is complete.", last
    assert manifest(runs, "pretrain")["content_hash"] == pretrain  # trained once, skipped since
    assert manifest(runs, "sft")["metrics"]["resumed_from_step"] == 40  # rebuilt, not trained again
    assert manifest(runs, "dpo")["metrics"]["step"] == STEPS["dpo.train.max_steps"]
    assert (runs / "r" / "report.md").exists()


def test_sigint_stops_a_background_stage_process_and_it_resumes(tmp_path):
    """`python -m alignflow.stages` (a stage without Prefect, and what torchrun starts) started
    with SIGINT ignored: `kill -INT` ends it within seconds with 130 and one line, and the same
    command resumes from the step that line names."""
    out = tmp_path / "pretrain"
    settings = {"vocab_size": 300, "demo.pretrain_docs": 300, "eval.max_prompts": 4, "eval.reward_samples": 0,
                "pretrain.data.max_length": 32, "pretrain.train.max_steps": 16, "pretrain.train.batch_size": 4,
                "pretrain.train.save_interval": 2}
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    command = [sys.executable, "-m", "alignflow.stages", "pretrain", "--preset", "tiny", "--out", str(out), *sets]
    proc = subprocess.Popen(command, preexec_fn=as_a_background_job, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_checkpoint(proc, out)
    os.kill(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert time.monotonic() - sent <= 15
    last = err.strip().splitlines()[-1]
    assert last.startswith("python -m alignflow.stages pretrain: interrupted. Re-running the same command resumes "
                           "it from step "), err[-3000:]
    step = int(last.split("from step ")[1].split()[0])
    assert 2 <= step < 16

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["metrics"]["resumed_from_step"] == step
