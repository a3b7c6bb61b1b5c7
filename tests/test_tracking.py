"""MLflow tracking: a pipeline run is one MLflow run with a nested run per stage, read back
through MLflow's own client from a store in the test's directory (offline)."""
import json

import pytest

from alignflow.flows.pipeline import alignment_pipeline
from alignflow.stages import storage
from alignflow.stages.config import load_config

from conftest import SMALL_PIPELINE


@pytest.fixture(autouse=True)
def no_telemetry(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def test_a_pipeline_is_one_mlflow_run_with_a_nested_run_per_stage(tmp_path, prefect_harness):
    from mlflow.tracking import MlflowClient

    config = load_config("tiny", overrides={**SMALL_PIPELINE, "runs_dir": str(tmp_path), "run_id": "tracked",
                                            "tracking": "mlflow", "tracking_experiment": "test",
                                            "pretrain.train.log_interval": 2, "dpo.train.log_interval": 1})
    out = alignment_pipeline(config=config, align="dpo")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name == "tracked · pretrain→sft→dpo"
    assert parents[0].info.status == "FINISHED" and parents[0].data.params["model"] == "tiny"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == {"pretrain", "sft", "dpo"}
    for stage, run in children.items():
        path = out["stages"][stage]["path"]
        records = [json.loads(line) for line in open(f"{path}/metrics.jsonl")]
        # Every logged step metric, at its step; the stage's config section as params.
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in records if "loss" in r]
        assert run.data.params["train.max_steps"] == str(config.stage(stage).train.max_steps)
        assert run.data.tags["alignflow.status"] == "trained"
        assert {f.path for f in client.list_artifacts(run.info.run_id)} == {"curves.png", "manifest.json"}
        manifest = json.loads(open(client.download_artifacts(run.info.run_id, "manifest.json", str(tmp_path))).read())
        assert manifest == storage.read_manifest(path)
    assert children["sft"].data.metrics["task_accuracy"] == out["stages"]["sft"]["metrics"]["task_accuracy"]
    assert "val_rewards/accuracies" in children["dpo"].data.metrics
