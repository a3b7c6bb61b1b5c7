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
        assert {f.path for f in client.list_artifacts(run.info.run_id)} == {"curves.png", "manifest.json", "eval.json"}
        manifest = json.loads(open(client.download_artifacts(run.info.run_id, "manifest.json", str(tmp_path))).read())
        assert manifest == storage.read_manifest(path)
    demo = out["stages"]["sft"]["evaluation"]["sets"]["demo"]
    assert children["sft"].data.metrics["eval/demo/accuracy"] == pytest.approx(demo["accuracy"])
    assert children["sft"].data.metrics["eval/demo/sampled_reward"] == pytest.approx(demo["sampled_reward"])
    assert "val_rewards/accuracies" in children["dpo"].data.metrics


def unwritable_store(kind: str, tmp_path) -> tuple[str, str]:
    """(tracking_uri, the reason in the message) for a store this process cannot write; as root
    (these tests' usual user), a chmod-ed directory stays writable, so: a path that is a directory,
    a directory that is a file, and MLflow 3's refused file store."""
    if kind == "database is a directory":
        (tmp_path / "mlflow.db").mkdir()
        return f"sqlite:///{tmp_path / 'mlflow.db'}", f"cannot write the MLflow database {tmp_path / 'mlflow.db'} " \
                                                       "(Is a directory)"
    if kind == "directory is a file":
        (tmp_path / "runs").write_text("")
        return f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", \
            f"cannot write the MLflow database {tmp_path / 'runs' / 'mlflow.db'} ({tmp_path / 'runs'} is a file, " \
            "not a directory)"
    return f"file://{tmp_path / 'mlruns'}", f"MLflow store file://{tmp_path / 'mlruns'}: The filesystem tracking " \
                                            "backend (e.g., './mlruns') is in maintenance mode"


@pytest.mark.parametrize("kind", ["database is a directory", "directory is a file", "file store"])
def test_an_unwritable_mlflow_store_fails_at_once_in_one_line(kind, tmp_path, monkeypatch):
    """MLflow retries an SQLite store it cannot open for about two minutes, a warning each time."""
    import types

    import mlflow.store.db.utils as db_utils

    from alignflow.flows import tracking

    monkeypatch.setattr(db_utils, "time", types.SimpleNamespace(
        sleep=lambda seconds: pytest.fail(f"MLflow retried opening the store (sleeping {seconds} s)")))
    uri, reason = unwritable_store(kind, tmp_path)
    config = load_config("tiny", overrides={"runs_dir": str(tmp_path), "tracking": "mlflow", "tracking_uri": uri})
    with pytest.raises(ValueError) as failure:
        tracking.tracker(config, str(tmp_path / "run"), "run", {})
    message = str(failure.value)
    assert message.startswith(f"tracking: {reason}") and "\n" not in message, message
    if kind != "file store":
        assert message.endswith("; set tracking_uri to a writable sqlite:///path/mlflow.db or your MLflow server, "
                                "or tracking: none")
