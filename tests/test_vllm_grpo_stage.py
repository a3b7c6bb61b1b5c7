"""A GRPO stage whose rollouts a real vLLM server generates (`grpo.rollout.engine: vllm`), through
the `alignflow` CLI: Ctrl-C and SIGKILL leave no server behind, the stage resumes and learns a toy
reward; and it fails at once with one line when the interpreter it is given has no vLLM. The
server runs from vLLM's own venv (tests/vllm_env.py) on loopback."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SMALL_PIPELINE
from test_hf_pipeline import losses
from test_interrupt import as_a_foreground_job, descendants
from alignflow.flows.pipeline import run_stage
from alignflow.stages.lifeline import alive

NO_PHONING_HOME = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
GRPO = {"demo.grpo_prompts": 64, "eval.max_prompts": 4, "eval.reward_samples": 1, "eval.max_new_tokens": 8,
        "grpo.train.batch_size": 8, "grpo.num_generations": 8, "grpo.max_completion_length": 12,
        "grpo.beta": 0.0, "grpo.temperature": 1.0, "grpo.train.log_interval": 1, "grpo.train.warmup_steps": 0,
        "grpo.rollout.engine": "vllm", "grpo.rollout.vllm.max_model_len": 256}


@pytest.fixture(scope="module")
def vllm_python():
    from vllm_env import vllm_python as build

    return build()


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A tiny Qwen2-style Hugging Face model (head dimension 32, the smallest vLLM's CPU
    attention takes) as the stage's external parent."""
    from hf_fixtures import build_model_dir

    return build_model_dir("chatml", tmp_path_factory.mktemp("vllm-parent"), hidden_size=128)


@pytest.fixture
def quiet_env(monkeypatch):
    for k, v in NO_PHONING_HOME.items():
        monkeypatch.setenv(k, v)


def vllm_processes() -> list[int]:
    """PIDs of every vLLM server process our boot script started, and of its process group."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"vllm_boot.py" in cmdline:
                found.append(int(entry))
    groups = {os.getpgid(pid) for pid in found if alive(pid)}
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) in groups:
                    members.append(int(entry))
            except OSError:
                continue
    return members


# `alignflow` itself, after registering the toy reward (tests/toy_rewards.py) in its process.
CLI = "import sys, toy_rewards; from alignflow.flows.cli import main; sys.exit(main(sys.argv[1:]))"


def sync_dirs() -> list[Path]:
    """The weight directories of running vLLM servers (vllm_boot's --remove argument)."""
    found = []
    for pid in vllm_processes():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--remove" in args:
            found.append(Path(args[args.index(b"--remove") + 1].decode()))
    return sorted(set(found))


def cli_stage(runs: Path, parent: Path, vllm_python: str, env: dict) -> subprocess.Popen:
    sets = {**SMALL_PIPELINE, **GRPO, "grpo.reward_funcs": '["digit_share"]', "grpo.train.max_steps": 12,
            "grpo.train.lr": 3e-3, "grpo.train.save_interval": 2, "grpo.rollout.vllm.python": vllm_python}
    args = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    return subprocess.Popen([sys.executable, "-c", CLI, "stage", "grpo", "--parent", str(parent),
                             "--runs-dir", str(runs), "--run-id", "r", *args], env=env, start_new_session=True,
                            preexec_fn=as_a_foreground_job, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(proc: subprocess.Popen, stage: Path, step: int, timeout: float = 300.0) -> None:
    from alignflow.trainers.checkpoint import step_dir

    deadline = time.monotonic() + timeout
    while not (step_dir(stage, step) / "trainer_state.json").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no checkpoint of step {step} after {timeout} s"
        time.sleep(0.1)


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_ctrl_c_and_sigkill_leave_no_server_and_the_resumed_stage_learns(parent, vllm_python, tmp_path):
    """The CLI (its embedded Prefect server, the stage in its process, the vLLM server in a
    session of its own) gets Ctrl-C while the server starts, where a user waits longest: exit
    130, nothing left. The re-run is SIGKILLed after its step-2 checkpoint: nothing can clean up,
    and the server notices its stage is gone (vllm_boot's watch) and stops within seconds. The
    third run resumes from step 2, syncs the resumed weights before its first rollout, and over
    the 12 steps the reward climbs while the engine's log-probs stay the trainer's."""
    env = {**os.environ, **NO_PHONING_HOME, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    runs, stage = tmp_path / "runs", tmp_path / "runs" / "r" / "grpo"
    first = cli_stage(runs, parent, vllm_python, env)
    try:
        deadline = time.monotonic() + 120
        while not (servers := vllm_processes()):
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the stage started no vLLM server"
            time.sleep(0.05)
        started = descendants(first.pid)
        assert set(servers) <= set(started)
        os.killpg(first.pid, signal.SIGINT)
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 130, err[-3000:]
    assert wait_gone(started, 15) == [], "a process of the interrupted CLI outlived it"

    second = cli_stage(runs, parent, vllm_python, env)
    try:
        wait_for_step(second, stage, 2)
        started = descendants(second.pid)
        assert vllm_processes()
        weights = sync_dirs()
        assert len(weights) == 1 and (weights[0] / "model.safetensors").exists()
        os.kill(second.pid, signal.SIGKILL)  # no cleanup possible: the server's own watch must end it
        second.communicate(timeout=60)
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    assert wait_gone(started, 30) == [], "the vLLM server (or another process) outlived the killed CLI"
    assert not weights[0].exists(), "the killed stage's weights stayed in /dev/shm"

    third = cli_stage(runs, parent, vllm_python, env)
    _, err = third.communicate(timeout=600)
    assert third.returncode == 0, err[-3000:]
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["metrics"]["step"] == 12 and manifest["metrics"]["resumed_from_step"] == 2
    assert vllm_processes() == []
    rewards = losses(stage, "reward")  # steps 1-2 of the killed run, 3-12 of the resumed one
    assert len(rewards) == 12 and sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.05, rewards
    # The engine samples what the trainer would: its log-probs are the trainer's to float noise,
    # so the TIS weights stay at 1.
    gaps, weights = losses(stage, "engine/logp_gap"), losses(stage, "engine/tis_weight")
    assert len(gaps) == 12 and max(gaps) < 1e-3, gaps
    assert all(abs(w - 1) < 1e-2 for w in weights), weights


def test_an_interpreter_without_vllm_fails_the_stage_at_once_with_one_line(prefect_harness, small_config, parent,
                                                                           tmp_path, quiet_env):
    """alignflow's own interpreter has no vLLM: the server's boot script says so and exits; the
    stage fails within seconds, naming the interpreter and the setting, and is not retried."""
    config = small_config(**GRPO, runs_dir=str(tmp_path), retries=2, **{
        "grpo.train.max_steps": 2, "grpo.rollout.vllm.python": sys.executable})
    t0 = time.monotonic()
    state = run_stage(stage="grpo", config=config, parent=str(parent), run_id="novllm", return_state=True)
    seconds = time.monotonic() - t0
    with pytest.raises(Exception) as failure:
        state.result()
    message = str(failure.value)
    assert message.startswith(f"the vLLM server ({sys.executable}, grpo.rollout.vllm.python; port "), message
    assert f"vllm_boot: {sys.executable} cannot import vllm" in message
    assert getattr(failure.value, "permanent", False)
    assert seconds < 60, f"took {seconds:.0f} s"
    assert vllm_processes() == []
