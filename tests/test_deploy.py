"""Deployments on a real `prefect server` (127.0.0.1, its own PREFECT_HOME) with a real process
worker: deploy/prefect.yaml through `alignflow deploy`, a triggered pipeline run, a single-stage
run on its SFT checkpoint, schedules, and the Kubernetes pool's rendered job. Every wait is
bounded; the server and workers are stopped by the PIDs we started."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterId
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.workers.base import BaseWorker

from conftest import SMALL_PIPELINE
from alignflow.flows.cli import main as cli
from alignflow.stages import handoff, storage
from alignflow.stages.config import load_config

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url, "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}
    log = open(home / "server.log", "w")
    port = url.split(":")[2].split("/")[0]
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "prefect server did not answer within 180 s"
                time.sleep(0.5)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield {"env": env, "runs": str(tmp_path_factory.mktemp("runs")), "home": home}
    finally:
        stop(proc)
        log.close()


@pytest.fixture(scope="module")
def deployed(server):
    assert cli(["deploy", "--runs-dir", server["runs"]]) == 0
    assert cli(["deploy", "--runs-dir", server["runs"]]) == 0  # idempotent
    return server


def run_with_worker(server, name: str, parameters: dict, timeout: float = 480):
    """Create a flow run of a deployment, let one `--run-once` worker execute it, return the run."""
    flow_run = run_deployment(name, parameters=parameters, timeout=0)
    with open(server["home"] / f"worker-{flow_run.id}.log", "w") as log:
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "alignflow-process", "--run-once"],
            env=server["env"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            worker.wait(timeout=timeout)
        finally:
            stop(worker)
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run.id)


def small(**extra) -> dict:
    return {**SMALL_PIPELINE, **extra}


@pytest.fixture(scope="module")
def pipeline_run(deployed):
    params = {"align": "dpo", "overrides": small(runs_dir=deployed["runs"], run_id="nightly-1")}
    return run_with_worker(deployed, "alignment-pipeline/nightly", params)


def test_pipeline_deployment_runs_on_a_process_worker(deployed, pipeline_run):
    assert pipeline_run.state.is_completed(), pipeline_run.state
    run_dir = Path(deployed["runs"]) / "nightly-1"
    for stage in ("pretrain", "sft", "dpo"):
        handoff.verify(run_dir / stage)
    assert (run_dir / "report.md").exists()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[pipeline_run.id])))
    keys = {a.key for a in artifacts}
    assert {"nightly-1-report", "nightly-1-dpo", "nightly-1-sft"} <= keys, keys


def test_stage_deployment_trains_dpo_on_the_earlier_sft(deployed, pipeline_run):
    sft = Path(deployed["runs"]) / "nightly-1" / "sft"
    params = {"stage": "dpo", "parent": str(sft), "run_id": "beta-0.3",
              "overrides": small(runs_dir=deployed["runs"], **{"dpo.beta": 0.3})}
    flow_run = run_with_worker(deployed, "run-stage/stage", params)
    assert flow_run.state.is_completed(), flow_run.state
    manifest = handoff.verify(Path(deployed["runs"]) / "beta-0.3" / "dpo")
    assert manifest["parent"] == {"path": str(sft), "content_hash": storage.read_manifest(sft)["content_hash"],
                                  "stage": "sft"}
    assert manifest["config"]["dpo"]["beta"] == 0.3


def scheduled_runs(deployment_id) -> list:
    with get_client(sync_client=True) as client:
        return [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(
            any_=[deployment_id]))) if r.state and r.state.is_scheduled()]


def test_schedules_are_off_until_switched_on_then_the_server_schedules_runs(deployed):
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("alignment-pipeline/nightly")
    assert [s.active for s in deployment.schedules] == [False]
    time.sleep(6)  # three scheduler loops
    assert scheduled_runs(deployment.id) == []

    assert cli(["deploy", "--runs-dir", deployed["runs"], "--schedules-active",
                "--name", "alignment-pipeline/nightly"]) == 0
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("alignment-pipeline/nightly")
    assert [s.active for s in deployment.schedules] == [True]
    deadline = time.monotonic() + 90
    while not (runs := scheduled_runs(deployment.id)):
        assert time.monotonic() < deadline, "the scheduler created no runs within 90 s"
        time.sleep(1)
    assert all(r.expected_start_time.hour == 2 and r.expected_start_time.minute == 0 for r in runs)
    assert cli(["deploy", "--runs-dir", deployed["runs"], "--name", "alignment-pipeline/nightly"]) == 0  # off again


def test_kubernetes_pool_renders_a_gpu_job_with_its_volumes(deployed, capsys):
    # With prefect-kubernetes (the test extra) the preview goes through the Kubernetes worker's
    # own job configuration class, which rejects a template it could not submit.
    assert BaseWorker.get_worker_class_from_type("kubernetes") is not None
    capsys.readouterr()
    assert cli(["job-preview", "--pool", "alignflow-k8s", "--var", "gpu_count=8"]) == 0
    job = json.loads(capsys.readouterr().out)["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 8
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["runs"]["persistentVolumeClaim"]["claimName"] == "alignflow-runs"
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/dev/shm", "/runs"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    with get_client(sync_client=True) as client:
        gpu = client.read_deployment_by_name("alignment-pipeline/grpo-gpu")
    assert gpu.work_pool_name == "alignflow-k8s" and gpu.job_variables["gpu_count"] == 8
    with get_client(sync_client=True) as client:
        fsdp = client.read_deployment_by_name("alignment-pipeline/grpo-fsdp")
    assert fsdp.job_variables["gpu_count"] == 8
    config = load_config(fsdp.parameters["preset"], overrides=fsdp.parameters["overrides"])
    assert all(config.stage(s).train.strategy == "fsdp" and config.stage(s).train.nproc_per_node == 8
               for s in ("pretrain", "sft", "grpo"))


def test_deploy_without_a_server_says_so_and_creates_nothing(capsys):
    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert cli(["deploy"]) == 1
    assert "PREFECT_API_URL" in capsys.readouterr().err
