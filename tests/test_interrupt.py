"""A real `alignflow run` interrupted the ways a person or a cluster does it: Ctrl-C (SIGINT to
its process group, as a terminal sends it), SIGTERM, SIGKILL. It exits quickly with one line
that says how to resume, leaves none of the processes it started (the embedded Prefect server,
torchrun and its ranks), and the re-run ends bitwise where an uninterrupted run ends."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import SMALL_PIPELINE
from alignflow.flows.pipeline import alignment_pipeline
from alignflow.stages.config import load_config
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
    started = descendants(proc.pid)
    assert len(started) >= 4, "server, torchrun, two ranks"
    os.kill(proc.pid, sig)
    proc.communicate(timeout=60)
    assert proc.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL)
    deadline = time.monotonic() + (0 if sig == signal.SIGTERM else 60)
    while (left := [pid for pid in started if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == []
