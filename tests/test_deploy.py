"""Deployments on a real `prefect server` (127.0.0.1, its own PREFECT_HOME) with a real process
worker: deploy/prefect.yaml through `alignflow deploy`, a triggered pipeline run, a single-stage
run on its SFT checkpoint, schedules, and the Kubernetes pool's rendered job. Every wait is
bounded; the server and workers are stopped by the PIDs we started.

Offline, with no cluster: deploy/raycluster.yaml (KubeRay) checked against the Kubernetes
client's pod models and KubeRay's own rules, and the Ray deployment that trains on it."""
import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from prefect import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.workers.base import BaseWorker

from conftest import SMALL_PIPELINE
from alignflow.flows.cli import main as cli
from alignflow.stages import handoff, storage
from alignflow.stages.config import load_config

BIN = Path(sys.executable).parent
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


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


def start_worker(server, log, *args: str, env: dict | None = None) -> subprocess.Popen:
    """A process worker of the pool, in a session of its own, logging to `log`."""
    return subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "alignflow-process", *args],
                            env={**server["env"], **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def run_with_worker(server, name: str, parameters: dict, timeout: float = 480):
    """Create a flow run of a deployment, let one `--run-once` worker execute it, return the run."""
    flow_run = run_deployment(name, parameters=parameters, timeout=0)
    with open(server["home"] / f"worker-{flow_run.id}.log", "w") as log:
        worker = start_worker(server, log, "--run-once")
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


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the Ray cluster's processes in /proc")
def test_cancelling_a_flow_run_stops_its_ray_stage_s_workers_on_the_cluster(deployed, pipeline_run, ray_cluster):
    """A stage with launcher: ray, run by a real process worker; the flow run cancelled through the
    API while it trains. The worker ends the flow's process, the flow's task ends the Ray driver,
    and Ray then stops the Ray Train workers on both nodes: within seconds none is left."""
    pytest.importorskip("ray", reason="needs alignflow[ray]")
    from prefect.states import Cancelling

    worker_title = "ray::RayTrainWorker"
    out = Path(deployed["runs"]) / "ray-cancelled" / "sft"
    from ray_cluster import DRIVER_ENV

    parent = Path(deployed["runs"]) / "nightly-1" / "pretrain"
    params = {"stage": "sft", "parent": str(parent), "run_id": "ray-cancelled",
              "overrides": small(runs_dir=deployed["runs"], **{
                  "sft.train.launcher": "ray", "sft.train.nnodes": 2, "sft.train.batch_size": 4,
                  "sft.train.max_steps": 2000, "ray.address": ray_cluster.address})}
    flow_run = run_deployment("run-stage/stage", parameters=params, timeout=0)
    with open(deployed["home"] / f"worker-{flow_run.id}.log", "w") as log:
        # Not --run-once: a worker that stays watches its runs for cancellation.
        worker = start_worker(deployed, log, env=DRIVER_ENV)
        try:
            deadline = time.monotonic() + 240
            while not (list(out.glob("state/step-*/trainer_state.json"))
                       and len(ray_cluster.processes(worker_title)) == 2):
                assert worker.poll() is None and time.monotonic() < deadline, \
                    (deployed["home"] / f"worker-{flow_run.id}.log").read_text()[-3000:]
                time.sleep(0.2)
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
                cancelled = time.monotonic()
                while ray_cluster.processes(worker_title) and time.monotonic() < cancelled + 60:
                    time.sleep(0.2)
                seconds = time.monotonic() - cancelled
                assert ray_cluster.processes(worker_title) == [], "Ray Train workers outlived the cancelled flow run"
                while not client.read_flow_run(flow_run.id).state.is_final() and time.monotonic() < cancelled + 60:
                    time.sleep(0.5)
                state = client.read_flow_run(flow_run.id).state
        finally:
            stop(worker)
    assert state.is_cancelled(), state
    assert seconds < 30, f"the workers were stopped {seconds:.1f} s after the cancellation"
    assert not (out / handoff.MANIFEST).exists()


def test_deploy_without_a_server_says_so_and_creates_nothing(capsys):
    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert cli(["deploy"]) == 1
    assert "PREFECT_API_URL" in capsys.readouterr().err


# deploy/raycluster.yaml, the KubeRay cluster of `train.launcher: ray`: offline, no cluster.

@pytest.fixture(scope="module")
def raycluster() -> dict:
    return yaml.safe_load((DEPLOY / "raycluster.yaml").read_text())


@pytest.fixture(scope="module")
def job_template() -> dict:
    return json.loads((DEPLOY / "k8s-job-template.json").read_text())


def ray_groups(cluster: dict) -> list[tuple[str, dict]]:
    """(container name KubeRay's conventions give it, group spec): the head, then each worker group."""
    spec = cluster["spec"]
    return [("ray-head", spec["headGroupSpec"])] + [("ray-worker", group) for group in spec["workerGroupSpecs"]]


def kubernetes_model(data: dict, klass: str):
    """`data` deserialized by the Kubernetes Python client into its model `klass` (which checks
    required fields and types), and that model serialized back."""
    def both(api):
        model = api.deserialize(types.SimpleNamespace(data=json.dumps(data)), klass)
        return model, api.sanitize_for_serialization(model)

    try:
        from kubernetes.client import ApiClient
    except ImportError:  # prefect-kubernetes brings the asyncio client, whose ApiClient wants a loop
        k8s = pytest.importorskip("kubernetes_asyncio.client")

        async def in_loop():
            async with k8s.ApiClient() as api:
                return both(api)

        return asyncio.run(in_loop())
    return both(ApiClient())


def dropped_keys(given, kept, where: str = "") -> list[str]:
    """Keys of `given` that the model round trip lost: no field of that name (a misspelling,
    which the client's deserializer, like the API server, drops without a word)."""
    if isinstance(given, dict):
        if not isinstance(kept, dict):
            return [where or "."]
        return [k for key, value in given.items()
                for k in ([f"{where}.{key}"] if key not in kept else dropped_keys(value, kept[key], f"{where}.{key}"))]
    if isinstance(given, list):
        if not isinstance(kept, list) or len(kept) != len(given):
            return [where]
        return [k for i, (g, h) in enumerate(zip(given, kept)) for k in dropped_keys(g, h, f"{where}[{i}]")]
    return []


def to_bytes(quantity) -> int:
    """A Kubernetes memory quantity in bytes (the suffixes used here)."""
    number, unit = re.fullmatch(r"(\d+)([KMGT]i?)?", str(quantity)).groups()
    scale = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[unit]
    return int(number) * scale


def test_raycluster_is_a_kuberay_cluster_of_the_alignflow_image(raycluster, job_template):
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    name = raycluster["metadata"]["name"]
    # KubeRay names the head Service <name>-head-svc, a DNS label: at most 63 characters.
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(f"{name}-head-svc") <= 63
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M)[1] == raycluster["spec"]["rayVersion"]
    install = next(line for line in dockerfile.splitlines() if line.startswith("RUN pip install"))
    assert ".[kubernetes,ray]" in install and "ray[default" in install  # the dashboard KubeRay's probes ask
    image = job_template["variables"]["properties"]["image"]["default"]
    for _, group in ray_groups(raycluster):
        assert [c["image"] for c in group["template"]["spec"]["containers"]] == [image]


def test_raycluster_pod_templates_are_kubernetes_pod_templates(raycluster):
    for container_name, group in ray_groups(raycluster):
        model, kept = kubernetes_model(group["template"], "V1PodTemplateSpec")
        assert dropped_keys(group["template"], kept) == [], container_name
        # KubeRay runs Ray in the first container; ray-head / ray-worker by its conventions.
        assert model.spec.containers[0].name == container_name


def test_raycluster_follows_kuberays_rules_and_alignflows_needs(raycluster, job_template):
    job_pod = job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    job_runs = next(v for v in job_pod["volumes"] if v.get("persistentVolumeClaim"))
    job_runs_mount = next(m for m in job_pod["containers"][0]["volumeMounts"] if m["name"] == job_runs["name"])
    runs_claim = job_template["variables"]["properties"]["runs_pvc"]["default"]
    head = raycluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no training worker on the head
    assert head["rayStartParams"].get("include-dashboard", "true") == "true"
    groups = raycluster["spec"]["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups) and all(g["groupName"] for g in groups)
    for container_name, group in ray_groups(raycluster):
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), params  # the CRD takes strings only
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        # the runs volume of the pool's jobs, by the same name and claim, at the same path
        assert mounts[job_runs_mount["mountPath"]] == job_runs["name"] and job_runs_mount["mountPath"] == "/runs"
        assert volumes[job_runs["name"]]["persistentVolumeClaim"]["claimName"] == runs_claim
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory"
        if "object-store-memory" in params:  # Ray falls back to a slow /tmp when /dev/shm cannot hold it
            assert int(params["object-store-memory"]) < to_bytes(shm["sizeLimit"])
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["HF_HUB_OFFLINE"] == "1"
        limits = container["resources"]["limits"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        assert gpus == int(params.get("num-gpus", 0)), container_name
        if "nvidia.com/gpu" in container["resources"].get("requests", {}):
            assert int(container["resources"]["requests"]["nvidia.com/gpu"]) == gpus
        if container_name == "ray-head":
            assert gpus == 0
            assert {p["name"]: p["containerPort"] for p in container["ports"]}["gcs-server"] == 6379
        else:
            assert gpus > 0
            assert isinstance(group["replicas"], int)
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_ray_deployment_trains_on_the_rayclusters_gpu_workers(deployed, raycluster):
    """grpo-ray as `prefect deploy` stored it: a valid alignflow config whose stages train on
    the cluster's workers, from a driver pod without GPUs that joins the cluster first."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("alignment-pipeline/grpo-ray")
        pool = client.read_work_pool("alignflow-k8s")
    assert deployment.work_pool_name == "alignflow-k8s"
    config = load_config(deployment.parameters["preset"], overrides=deployment.parameters["overrides"])
    assert config.runs_dir == "/runs"
    on_ray = [s for s in ("pretrain", "sft", "grpo") if config.stage(s).train.resolved_launcher == "ray"]
    assert on_ray == ["pretrain", "sft", "grpo"]
    workers = [g for g in raycluster["spec"]["workerGroupSpecs"] if int(g["rayStartParams"].get("num-gpus", 0))]
    nodes = sum(g["replicas"] for g in workers)
    for stage in on_ray:
        train = config.stage(stage).train
        assert train.nnodes == 2 == nodes
        # PACK placement fills each node with nproc_per_node workers, one GPU each
        assert all(int(g["rayStartParams"]["num-gpus"]) == train.nproc_per_node for g in workers)
    # the head's Service, as KubeRay names it, in the namespace the pool's jobs run in
    host, port = config.ray.address.rsplit(":", 1)
    namespace = pool.base_job_template["variables"]["properties"]["namespace"]["default"]
    assert host == f"{raycluster['metadata']['name']}-head-svc.{namespace}.svc.cluster.local" and port == "6379"

    # The flow's job as the Kubernetes worker would submit it.
    assert deployment.job_variables["gpu_count"] == 0
    worker = BaseWorker.get_worker_class_from_type("kubernetes")
    job = run_coro_as_sync(worker.job_configuration.from_template_and_values(pool.base_job_template,
                                                                              deployment.job_variables))
    job.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="grpo-ray-preview"))
    container = job.job_manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 0
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RAY_ADDRESS"] == config.ray.address and env["PREFECT__FLOW_RUN_ID"]
    # A Ray driver needs a raylet on its own node: the pod joins as a node nothing is scheduled
    # on, then becomes the flow run.
    assert container["args"][:2] == ["bash", "-c"] and len(container["args"]) == 3
    script = container["args"][2]
    subprocess.run(["bash", "-n", "-c", script], check=True)
    words = shlex.split(script)
    assert words[:4] == ["timeout", "300", "ray", "start"]  # bounded: it waits for an absent cluster forever
    assert {"--address=$RAY_ADDRESS", "--num-cpus=0", "--num-gpus=0"} <= set(words)
    assert words[words.index("&&"):] == ["&&", "exec", "prefect", "flow-run", "execute"]
    shm = next(v for v in job.job_manifest["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm")
    store = next(w for w in words if w.startswith("--object-store-memory="))
    assert int(store.split("=")[1]) < to_bytes(shm["emptyDir"]["sizeLimit"])
