"""MLflow tracking, an optional extra (`pip install 'alignflow[mlflow]'`, `tracking: mlflow`): one
MLflow run per pipeline run, and a nested run per stage.

The flow logs a stage when it has finished, from what the stage wrote: every record of its
metrics.jsonl as step metrics, its evaluation (eval.json: `eval/<set>/<metric>`,
`lm_eval/<task>/<metric>`) at the last step, its config section as params, its curves.png,
manifest.json and eval.json as artifacts. So ranks under torchrun never talk to
MLflow, and a stage that crashed and resumed is logged once, whole. Live progress while a stage
trains is in Prefect's log (and TensorBoard, `train.tensorboard`)."""
from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

from alignflow.stages import storage
from alignflow.stages.config import PipelineConfig
from alignflow.stages.settings import SHARED_KEYS

from alignflow.trainers.numbers import is_number

from .report import read_metrics

BATCH = 1000  # MLflow's limit on metrics in one log_batch call
PARAMS_PER_CALL = 100  # and on params


class Tracker:
    """No tracking (`tracking: none`)."""

    def stage(self, stage: str, config: PipelineConfig, result: dict) -> None:
        pass

    def finish(self, outcome: str) -> None:
        pass


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys (the CLI's --set names), values as text."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def evaluation_metrics(record: dict | None) -> dict[str, float]:
    """A stage's evaluation as MLflow metrics: `eval/<set>/<metric>`, `lm_eval/<task>/<metric>`."""
    record = record or {}
    out = {f"eval/{name}/{k}": float(v) for name, got in (record.get("sets") or {}).items()
           for k, v in got.items() if is_number(v)}
    out.update({f"lm_eval/{task}/{k}": float(v) for task, got in (record.get("lm_eval") or {}).items()
                for k, v in got.items() if is_number(v)})
    # MLflow's names: letters, digits, _ - . / and spaces.
    return {re.sub(r"[^\w\-./ ]", "_", k): v for k, v in out.items()}


def default_uri(runs_dir: str) -> str:
    """A SQLite database in the runs directory: works offline, and `mlflow ui --backend-store-uri`
    opens it. (MLflow 3 refuses its old ./mlruns file store unless told to allow it.)"""
    if storage.is_url(runs_dir):
        raise ValueError(f"tracking: runs_dir {runs_dir} is not a local directory, so there is no default MLflow "
                         "store; set tracking_uri (your MLflow server, or sqlite:///path/mlflow.db)")
    return f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


def check_sqlite_store(uri: str) -> None:
    """Refuse, in one line, a SQLite store this process cannot write. MLflow would retry opening
    it for about two minutes (its engine's retry loop, a warning each time) before failing with
    sqlalchemy's error: a read-only directory, or a path that is a directory, does not heal
    meanwhile. SQLite writes a journal beside the database, so its directory must take a file."""
    if not uri.startswith("sqlite:///"):
        return  # a server, or another database: MLflow reports those itself
    name = uri[len("sqlite:///"):].split("?", 1)[0]
    if not name or name == ":memory:":
        return
    path = Path(name)
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # as MLflow does
        except FileExistsError as e:
            raise OSError(e.errno, f"{e.filename} is a file, not a directory") from None
        if path.exists():
            path.open("r+b").close()
        try:
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".alignflow-probe-"):
                pass
        except OSError as e:
            raise OSError(e.errno, f"its directory takes no new file: {e.strerror}") from None
    except OSError as e:
        raise ValueError(f"tracking: cannot write the MLflow database {path} ({e.strerror or e}); set tracking_uri "
                         "to a writable sqlite:///path/mlflow.db or your MLflow server, or tracking: none") from None


class MlflowTracker(Tracker):
    def __init__(self, config: PipelineConfig, title: str, tags: dict[str, str]):
        try:
            from mlflow.exceptions import MlflowException
        except ImportError as e:
            raise ValueError("tracking: mlflow needs MLflow: pip install 'alignflow[mlflow]'") from e

        uri = config.tracking_uri or default_uri(config.runs_dir)
        check_sqlite_store(uri)
        try:
            self._start(config, uri, title, tags)
        except MlflowException as e:  # e.g. a file: store MLflow 3 refuses; its message is the reason
            raise ValueError(f"tracking: MLflow store {uri}: {e.message.strip().splitlines()[0]}") from e

    def _start(self, config: PipelineConfig, uri: str, title: str, tags: dict[str, str]) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(config.tracking_experiment)
        if experiment is None:
            # Beside the database when it is ours; a server keeps its own artifact store.
            location = None if config.tracking_uri else (Path(config.runs_dir).resolve() / "mlartifacts").as_uri()
            try:
                # The kind MLflow's UI opens fine-tuning experiments as (runs and charts, not traces).
                self.experiment_id = self.client.create_experiment(config.tracking_experiment, location,
                                                                   tags={"mlflow.experimentKind": "finetuning"})
            except MlflowException:  # another run created it first
                self.experiment_id = self.client.get_experiment_by_name(config.tracking_experiment).experiment_id
        else:
            self.experiment_id = experiment.experiment_id
        self.run_id = self.client.create_run(self.experiment_id, run_name=title, tags=tags).info.run_id
        dumped = config.model_dump(mode="json")
        self._params(self.run_id, flatten({k: v for k, v in dumped.items() if not isinstance(v, dict) or k in (*SHARED_KEYS, "eval")}))

    def _params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), PARAMS_PER_CALL):
            self.client.log_batch(run_id, params=items[start:start + PARAMS_PER_CALL])

    def stage(self, stage: str, config: PipelineConfig, result: dict) -> None:
        from mlflow.entities import Metric

        status = "skipped" if result.get("skipped") else "trained"
        run = self.client.create_run(self.experiment_id, run_name=stage, tags={
            "mlflow.parentRunId": self.run_id, "alignflow.stage": stage, "alignflow.status": status,
            "alignflow.checkpoint": result["path"]})
        run_id = run.info.run_id
        self._params(run_id, flatten(config.model_dump(mode="json")[stage]))
        local = storage.local_dir(result["path"])
        now = int(time.time() * 1000)
        metrics, last_step = [], 0
        for record in read_metrics(local):
            step = int(record.get("step", 0))
            last_step = max(last_step, step)
            metrics += [Metric(k, float(v), now, step) for k, v in record.items()
                        if k != "step" and is_number(v)]
        # The final evaluation (task accuracy, held-out reward...), at the stage's last step.
        logged = {m.key for m in metrics}
        metrics += [Metric(k, float(v), now, last_step) for k, v in result["metrics"].items()
                    if k not in logged and is_number(v)]
        metrics += [Metric(k, v, now, last_step) for k, v in evaluation_metrics(result.get("evaluation")).items()]
        for start in range(0, len(metrics), BATCH):
            self.client.log_batch(run_id, metrics=metrics[start:start + BATCH])
        for name in ("curves.png", "manifest.json", "eval.json"):
            if (local / name).exists():
                self.client.log_artifact(run_id, str(local / name))
        self.client.set_terminated(run_id, "FINISHED")

    def finish(self, outcome: str) -> None:
        """outcome: FINISHED, FAILED or KILLED (MLflow's run statuses)."""
        self.client.set_terminated(self.run_id, outcome)


def tracker(config: PipelineConfig, run_dir: str, title: str, tags: dict[str, str]) -> Tracker:
    if config.tracking == "mlflow":
        return MlflowTracker(config, title, {**tags, "alignflow.run_dir": run_dir})
    return Tracker()
