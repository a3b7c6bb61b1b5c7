"""`train.launcher: ray`: stages trained by Ray Train workers on a real two-node Ray cluster
(tests/ray_cluster.py: a head and a second `ray start` node on loopback), from the flow.
Two workers on two nodes equal one process (SFT under DDP, LoRA under FSDP on a Hugging Face
model, DPO into a runs_dir at a file:// URL); a SIGKILLed worker is resumed, by Prefect's retry
or by Ray Train's restart, to the uninterrupted run's weights; a Ctrl-C of the CLI leaves no
worker on the cluster; no Ray, or nobody at the address, is one line at once."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from alignflow.flows.launch import StageProcessError
from alignflow.flows.pipeline import run_stage
from alignflow.stages import handoff, storage
from alignflow.stages.run import train_stage
from conftest import SMALL_PIPELINE, task_logs

ray = pytest.importorskip("ray", reason="the Ray launcher's tests need alignflow[ray]")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the cluster's processes in /proc")]

WORKER = "ray::RayTrainWorker"  # the process title of a Ray Train worker


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    return ray_cluster


@pytest.fixture(scope="module")
def sft_parent(tmp_path_factory, small_config):
    """pretrain, then SFT on it: the parents of the SFT and DPO stages here."""
    root = tmp_path_factory.mktemp("parents")
    train_stage("pretrain", small_config(), None, root / "pretrain")
    train_stage("sft", small_config(**{"sft.train.max_steps": 4}), root / "pretrain", root / "sft")
    return root


def on_ray(cluster, stage: str, **extra) -> dict:
    return {f"{stage}.train.launcher": "ray", f"{stage}.train.nnodes": 2, "ray.address": cluster.address,
            f"{stage}.train.batch_size": 4, **extra}


def weights(stage_dir):
    return load_file(stage_dir / "model.safetensors")


def assert_weights_close(a, b, atol=1e-5):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("stage, strategy, lora",
                         [("sft", "ddp", None), ("sft", "fsdp", {"r": 4}), ("dpo", "ddp", None)],
                         ids=["sft-ddp", "sft-fsdp-lora-hf", "dpo-ddp-url"])
def test_two_workers_on_two_ray_nodes_equal_one_process(stage, strategy, lora, cluster, sft_parent, hf_model_dir,
                                                        tmp_path, small_config, prefect_harness):
    """sft-fsdp-lora-hf: a LoRA adapter on a Hugging Face Llama, sharded by FSDP2 over the two
    nodes; dpo-ddp-url: the run directory at a file:// URL."""
    parent = sft_parent / "sft" if stage == "dpo" else hf_model_dir("llama3") if lora else sft_parent / "pretrain"
    # SGD, no clipping: its update is proportional to the gradient, which DDP reduces (test_ddp.py).
    common = {"runs_dir": str(tmp_path), f"{stage}.train.optimizer": "sgd", f"{stage}.train.lr": 0.05,
              f"{stage}.train.max_steps": 3, f"{stage}.train.max_grad_norm": None, f"{stage}.lora": lora}
    one = small_config(**common, **{f"{stage}.train.batch_size": 8})
    two = small_config(**common, **on_ray(cluster, stage, **{f"{stage}.train.strategy": strategy}))
    if stage == "dpo":  # runs at a URL: each rank's state/ published there, the stage's directory by rank 0
        two = two.model_copy(update={"runs_dir": f"file://{tmp_path}"})
    run_stage(stage=stage, config=one, parent=str(parent), run_id="one")
    state = run_stage(stage=stage, config=two, parent=str(parent), run_id="two", return_state=True)
    result = state.result()["stages"][stage]

    assert_weights_close(tmp_path / "one" / stage, tmp_path / "two" / stage)
    manifest = storage.read_manifest(result["path"])
    assert manifest["world_size"] == 2 and result["metrics"]["step"] == 3
    logs = task_logs(state.state_details.flow_run_id, stage)
    placed = [re.search(r"\[rank(\d)\]:rank \d of 2 on Ray node (\w+) \(([\d.]+)\)", m) for m in logs]
    placed = {int(m[1]): (m[2], m[3]) for m in placed if m}
    assert sorted(placed) == [0, 1], "\n".join(logs)
    assert placed[0][0] != placed[1][0], f"both workers on one Ray node: {placed}"
    assert {ip for _, ip in placed.values()} == {"127.0.0.1", "127.0.0.2"}, placed  # loopback only
    assert any(re.match(rf".*\[rank0\]:{stage}: .*world size 2 \({strategy}\)", m) for m in logs), logs
    assert any(re.match(r".*\[rank0\]:step 3/3 · ", m) for m in logs), logs
    assert cluster.processes(WORKER) == [], "a Ray Train worker outlived its stage"


KILLED_RUN = {"sft.train.max_steps": 12, "sft.train.save_interval": 2}


@pytest.fixture(scope="module")
def straight_on_ray(cluster, sft_parent, tmp_path_factory, small_config, prefect_harness):
    """The run the killed ones must end at: the same stage on Ray, uninterrupted."""
    runs = tmp_path_factory.mktemp("straight")
    config = small_config(**KILLED_RUN, **on_ray(cluster, "sft"), runs_dir=str(runs))
    run_stage(stage="sft", config=config, parent=str(sft_parent / "pretrain"), run_id="straight")
    return runs / "straight" / "sft"


@pytest.mark.parametrize("recovery", ["prefect-retry", "ray-restart"])
def test_a_sigkilled_worker_is_resumed_to_the_uninterrupted_weights(recovery, cluster, sft_parent, straight_on_ray,
                                                                     tmp_path, small_config, prefect_harness):
    """prefect-retry: the stage fails, naming the dead rank's node and process, and Prefect's retry
    resumes it. ray-restart (ray.max_failures: 1): Ray Train restarts the worker group within the
    same try, and the new workers resume. Either way the final weights are the uninterrupted
    run's, bit for bit."""
    recover = {"retries": 1} if recovery == "prefect-retry" else {"retries": 0, "ray.max_failures": 1}
    config = small_config(**KILLED_RUN, **on_ray(cluster, "sft"), **recover, runs_dir=str(tmp_path))
    out = tmp_path / "killed" / "sft"
    finished = {}
    flow = threading.Thread(target=lambda: finished.update(
        state=run_stage(stage="sft", config=config, parent=str(sft_parent / "pretrain"), run_id="killed",
                        return_state=True)))
    flow.start()
    deadline = time.monotonic() + 240
    while not list(out.glob("state/step-0000000[2-9]/trainer_state.json")):
        assert flow.is_alive() and time.monotonic() < deadline, "the stage ended before a worker could be killed"
        time.sleep(0.05)
    workers = cluster.processes(WORKER)
    assert len(workers) == 2, workers
    killed = workers[-1]
    os.kill(killed, signal.SIGKILL)
    flow.join(timeout=300)
    assert not flow.is_alive()
    state = finished["state"]
    result = state.result()["stages"]["sft"]
    logs = task_logs(state.state_details.flow_run_id, "sft")
    died = [m for m in logs if "stage sft failed: the Ray driver exited with code 1. sft failed on Ray: rank " in m]
    if recovery == "prefect-retry":
        # The first try's error names the killed rank's node and process, then what the other one saw.
        assert len(died) == 1, "\n".join(logs[-40:])
        assert re.search(rf"rank [01] died on node 127\.0\.0\.[12] \(pid {killed}\): its process was killed",
                         died[0]), died[0]
    else:
        assert died == [], died
        assert sum("[rank0]:rank 0 of 2 on Ray node" in m for m in logs) == 2, "no second worker group"
    assert result["metrics"]["resumed_from_step"] >= 2
    assert weights(out).keys() == weights(straight_on_ray).keys()
    for name, tensor in weights(straight_on_ray).items():
        assert torch.equal(weights(out)[name], tensor), name
    assert (out / handoff.MANIFEST).exists()
    assert cluster.processes(WORKER) == []


def test_ctrl_c_of_the_cli_leaves_no_worker_on_the_cluster(cluster, sft_parent, tmp_path):
    from test_interrupt import as_a_foreground_job

    sets = [arg for k, v in {**SMALL_PIPELINE, **on_ray(cluster, "sft"), "sft.train.max_steps": 400}.items()
            for arg in ("--set", f"{k}={v}")]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    proc = subprocess.Popen([sys.executable, "-m", "alignflow.flows.cli", "stage", "sft", "--parent",
                             str(sft_parent / "pretrain"), "--runs-dir", str(tmp_path / "runs"), "--run-id", "r",
                             *sets],
                            env=env, start_new_session=True, preexec_fn=as_a_foreground_job,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while not list((tmp_path / "runs" / "r" / "sft").glob("state/step-*/trainer_state.json")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.1)
        assert len(cluster.processes(WORKER)) == 2
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    gone = time.monotonic() + 15
    while cluster.processes(WORKER) and time.monotonic() < gone:
        time.sleep(0.2)
    assert cluster.processes(WORKER) == [], "Ray Train workers outlived the interrupted CLI"


def test_nobody_at_the_address_is_one_line_without_a_hang(tmp_path, sft_parent, small_config, prefect_harness):
    from ray_cluster import free_port

    config = small_config(**{"runs_dir": str(tmp_path), "sft.train.launcher": "ray", "sft.train.nnodes": 2,
                             "ray.address": f"127.0.0.1:{free_port()}", "ray.connect_timeout_s": 2, "retries": 0})
    t0 = time.monotonic()
    state = run_stage(stage="sft", config=config, parent=str(sft_parent / "pretrain"), run_id="nobody",
                      return_state=True)
    assert time.monotonic() - t0 < 60
    with pytest.raises(StageProcessError) as failure:
        state.result()
    message = str(failure.value)
    assert message.startswith(f"stage sft failed: the Ray driver exited with code 1. no Ray cluster answers at "
                              f"{config.ray.address} (ray.address) after 2 s: Connection refused"), message
    assert not failure.value.permanent  # the cluster may be starting: retried


def test_without_ray_installed_the_config_says_what_to_install(small_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(ValueError, match=r"launcher: ray needs Ray Train, which is not installed here: "
                                         r"pip install 'alignflow\[ray\]'"):
        small_config(**{"sft.train.launcher": "ray"})
    small_config(**{"sft.train.launcher": "torchrun"})  # the others need nothing more


def test_the_launcher_is_not_part_of_the_stage_s_hash(small_config):
    plain = small_config(**{"sft.train.nproc_per_node": 2})
    assert plain.stage_hash("sft") == small_config(**{"sft.train.nproc_per_node": 2,
                                                      "sft.train.launcher": "ray"}).stage_hash("sft")
    assert plain.stage_hash("sft") != small_config().stage_hash("sft")  # nproc_per_node is: the global batch
    with pytest.raises(ValueError, match="launcher: local runs one process"):
        small_config(**{"sft.train.nproc_per_node": 2, "sft.train.launcher": "local"})


def test_a_worker_s_bad_data_fails_once_with_its_row(cluster, sft_parent, tmp_path, small_config, prefect_harness):
    """A DataError on a worker is permanent (not retried, though retries=2), and the flow's error
    names the rank, the file and the row, as under torchrun."""
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "What is 1 plus 1?", "completion": "2"}\n{"prompt": "What is 2 plus 2?"}\n')
    config = small_config(**{"runs_dir": str(tmp_path), "retries": 2, "sft.data.source": str(data),
                             **on_ray(cluster, "sft")})
    state = run_stage(stage="sft", config=config, parent=str(sft_parent / "pretrain"), run_id="bad",
                      return_state=True)
    with pytest.raises(StageProcessError) as failure:
        state.result()
    assert failure.value.permanent
    first = str(failure.value).splitlines()[0]
    assert re.match(rf"stage sft failed: the Ray driver exited with code 1\. sft failed on Ray: rank 0: DataError: "
                    rf"{re.escape(str(data))}: row 1 \(line 2\): column 'completion'", first), first
    assert cluster.processes(WORKER) == []


def test_a_connection_that_never_returns_ends_the_driver_with_its_line(tmp_path):
    """ray.init retries for minutes, inside Ray's C++ code, where a machine cannot join as a driver;
    the driver's watchdog ends it after ray.connect_timeout_s with one line, marked permanent."""
    code = ("import time\nfrom alignflow.stages.ray_job import watchdog\n"
            "with watchdog(0.5, 'cannot join the cluster'):\n    time.sleep(60)\n")
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ALIGNFLOW_FAILURE_DIR": str(tmp_path)})
    assert time.monotonic() - t0 < 30
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == "python -m alignflow.stages.ray_job: error: cannot join the cluster"
    assert (tmp_path / "failure-summary.txt").read_text() == "cannot join the cluster\n"
    assert "NotANode: cannot join the cluster" in (tmp_path / "permanent-failure-rank0.txt").read_text()
