"""`alignflow deploy`: work pools and deployments on the Prefect server at PREFECT_API_URL.

The deployments are declared in deploy/prefect.yaml and created by Prefect's own
`prefect deploy`. This module creates the two work pools they name (idempotently: an existing
pool gets our job template again), sets the environment variables the YAML reads, and renders a
pool's job template the way a worker does, to preview the Kubernetes job before any cluster
sees it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
DEPLOY_DIR = PROJECT_DIR / "deploy"
PREFECT_FILE = DEPLOY_DIR / "prefect.yaml"
PROCESS_POOL, K8S_POOL = "alignflow-process", "alignflow-k8s"


def pool_definitions() -> dict[str, tuple[str, dict]]:
    """name -> (worker type, base job template)."""
    from prefect.workers.process import ProcessWorker

    k8s = json.loads((DEPLOY_DIR / "k8s-job-template.json").read_text())
    return {PROCESS_POOL: ("process", ProcessWorker.get_default_base_job_template()), K8S_POOL: ("kubernetes", k8s)}


def ensure_pools() -> list[str]:
    """Create the pools, or give existing ones our template again; one line per pool."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    done = []
    with get_client(sync_client=True) as client:
        for name, (kind, template) in pool_definitions().items():
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type=kind, base_job_template=template))
                done.append(f"created work pool {name} ({kind})")
            except ObjectAlreadyExists:
                client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
                done.append(f"updated work pool {name} ({kind})")
    return done


def deploy_env(runs_dir: str | None, schedules_active: bool, image: str | None) -> dict[str, str]:
    """The environment of `prefect deploy`: the server this process talks to, and the variables
    deploy/prefect.yaml reads (exported values win over our defaults, arguments over both)."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise RuntimeError("deployments live on a running Prefect server: start one (prefect server start) "
                           "and set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    env.setdefault("ALIGNFLOW_PROJECT_DIR", str(PROJECT_DIR))
    env.setdefault("ALIGNFLOW_RUNS_DIR", str(PROJECT_DIR / "runs"))
    env.setdefault("ALIGNFLOW_SCHEDULES_ACTIVE", "false")
    env.setdefault("ALIGNFLOW_IMAGE", "alignflow:latest")
    if runs_dir:
        env["ALIGNFLOW_RUNS_DIR"] = runs_dir
    if schedules_active:
        env["ALIGNFLOW_SCHEDULES_ACTIVE"] = "true"
    if image:
        env["ALIGNFLOW_IMAGE"] = image
    return env


def prefect_deploy(env: dict[str, str], names: list[str] | None = None, timeout: float = 300) -> None:
    """Run `prefect deploy` on deploy/prefect.yaml from the project root (its paths are relative
    to it); all deployments, or the named ones."""
    if not PREFECT_FILE.exists():
        raise FileNotFoundError(f"{PREFECT_FILE} is missing: deploy from a source checkout of alignflow")
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or shutil.which("prefect")
    selection = [arg for name in names for arg in ("--name", name)] if names else ["--all"]
    cmd = [prefect, "--no-prompt", "deploy", *selection, "--prefect-file", str(PREFECT_FILE)]
    proc = subprocess.run(cmd, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"prefect deploy failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def render_job(worker_type: str, base_job_template: dict, job_variables: dict) -> dict:
    """The job configuration a worker of this type builds: the pool's variable defaults,
    overridden by the deployment's or flow run's job variables, substituted into the template
    and, when the worker's package is installed (prefect-kubernetes for "kubernetes"), validated
    by the worker's own configuration class. The worker later adds the flow-run command and its
    environment."""
    from prefect.utilities.asyncutils import run_coro_as_sync
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseWorker

    worker = BaseWorker.get_worker_class_from_type(worker_type)
    if worker is not None:
        configuration = worker.job_configuration.from_template_and_values(base_job_template, job_variables)
        return run_coro_as_sync(configuration).model_dump(mode="json")
    properties = base_job_template.get("variables", {}).get("properties", {})
    values = {k: spec["default"] for k, spec in properties.items() if "default" in spec}
    return apply_values(base_job_template["job_configuration"], {**values, **job_variables})


def preview_job(pool: str, job_variables: dict) -> dict:
    """`render_job` for a work pool as the server holds it."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        work_pool = client.read_work_pool(pool)
    return render_job(work_pool.type, work_pool.base_job_template, job_variables)
