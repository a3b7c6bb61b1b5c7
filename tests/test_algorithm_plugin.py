"""A new algorithm from outside alignflow: one module (tests/plugin_slic.py: settings, loss,
trainer, data kind with demo rows, recipe) plus a preset block, installed the way a package
installs it (a dist-info whose entry point names its declaration), then trained through the
CLI's `stage` and `run --align` in fresh processes, on the test's Prefect server. No file of
alignflow is edited for it. The registry's refusals are checked in this process."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import SMALL_PIPELINE
from alignflow.stages import Algorithm, algorithms, register_algorithm
from alignflow.stages.formats import PAIRS
from alignflow.stages.settings import StageConfig
from alignflow.trainers import SFTTrainer

HERE = Path(__file__).parent
# The algorithm's preset block, in the user's own config file: SMALL_PIPELINE's sizes for it.
PRESET_BLOCK = {"slic": {"lam": 0.05, "data": {"max_length": 128},
                         "train": {"max_steps": 24, "batch_size": 8, "lr": 1e-3, "log_interval": 1,
                                   "eval_interval": 8, "schedule": "constant"}}}
SETTINGS = {**SMALL_PIPELINE, "demo.preference_pairs": 320}  # 32 held-out triples


def install_plugin(root: Path) -> Path:
    """slic_demo.py and its dist-info, as `pip install` of a package declaring
    [project.entry-points."alignflow.algorithms"] slic = "slic_demo:ALGORITHM" would leave them."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "plugin_slic.py", root / "slic_demo.py")
    info = root / "slic_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: slic-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[alignflow.algorithms]\nslic = slic_demo:ALGORITHM\n")
    return root


@pytest.fixture(scope="module")
def setup(prefect_harness, tmp_path_factory):
    """A completed pretrain -> sft run (in this process, which has no plugin), the plugin
    installed beside it, and the environment of a process that sees both."""
    from prefect.settings import PREFECT_API_URL

    from alignflow.flows.pipeline import alignment_pipeline
    from alignflow.stages.config import load_config

    root = tmp_path_factory.mktemp("plugin")
    runs = root / "runs"
    config = load_config("tiny", overrides={**SETTINGS, "runs_dir": str(runs), "run_id": "base"})
    sft = alignment_pipeline(config=config, align="none")["stages"]["sft"]["path"]
    block = root / "slic.yaml"
    block.write_text(yaml.safe_dump(PRESET_BLOCK))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(install_plugin(root / "site")), str(HERE)]),
           "PREFECT_API_URL": PREFECT_API_URL.value(), "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}
    overrides = [arg for key, value in SETTINGS.items() for arg in ("--set", f"{key}={value}")]
    return {"runs": runs, "sft": sft, "env": env, "args": ["--config", str(block), *overrides]}


def alignflow(setup, *args, timeout: float = 600) -> str:
    proc = subprocess.run([sys.executable, "-m", "alignflow", *args, *setup["args"]], env=setup["env"],
                          cwd=setup["runs"].parent, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def metrics(stage_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(stage_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_plugin_algorithm_runs_as_a_stage_on_an_sft_checkpoint_and_learns(setup):
    card = alignflow(setup, "stage", "slic", "--parent", setup["sft"], "--runs-dir", str(setup["runs"]),
                     "--run-id", "rerun")
    assert "| | slic |" in card
    assert re.search(r"\n\| SLiC val accuracy \| \d+\.\d% \(\d+/\d+\) \|\n", card), card
    assert re.search(r"\n\| demo: accuracy \| \d+\.\d% \(\d+/\d+\) \|\n", card), card  # evaluation's rows too
    out = setup["runs"] / "rerun" / "slic"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "slic" and manifest["parent"]["stage"] == "sft"
    assert manifest["data"]["train"]["origin"] == "demo:slic/train"  # its own data kind's demo rows
    assert manifest["config"]["slic"]["lam"] == 0.05  # the preset block reached the section
    records = metrics(out)
    first, last = records[0], [r for r in records if "val_margin" in r][-1]
    # The parent gives the answer that stops short more mass; SLiC turns that round, on
    # held-out questions too.
    assert first["step"] == 1 and first["margin"] < 0 and first["accuracy"] < 0.5, first
    assert last["step"] == 24 and last["val_margin"] > 1.0 and last["val_accuracy"] >= 0.9, last
    assert (out / "curves.png").exists()


def test_the_pipeline_aligns_with_the_plugin_after_the_stages_it_builds_on(setup):
    card = alignflow(setup, "run", "--align", "slic", "--runs-dir", str(setup["runs"]), "--run-id", "base")
    assert "| | pretrain | sft | slic |" in card
    assert "| status | skipped (already complete) | skipped (already complete) | trained |" in card
    assert re.search(r"\n\| SLiC val accuracy \| +\| +\| \d+\.\d% \(\d+/\d+\) \|\n", card), card
    assert "![slic curves](slic/curves.png)" in card


def test_without_the_plugin_installed_the_stage_is_unknown(setup, capsys):
    from alignflow.flows.cli import main as cli

    assert "slic" not in algorithms()
    with pytest.raises(SystemExit):
        cli(["stage", "slic", "--parent", setup["sft"]])
    assert "invalid choice: 'slic'" in capsys.readouterr().err


def test_a_broken_plugin_is_one_line_naming_it(tmp_path):
    site = tmp_path / "site"
    (site / "broken-0.1.dist-info").mkdir(parents=True)
    (site / "broken-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (site / "broken-0.1.dist-info" / "entry_points.txt").write_text("[alignflow.algorithms]\nbroken = no_such:ALGO\n")
    proc = subprocess.run([sys.executable, "-m", "alignflow", "run", "--align", "dpo"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(site)}, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("alignflow: error: entry point broken = no_such:ALGO (alignflow.algorithms) "
                                   "failed to load: ModuleNotFoundError: No module named 'no_such' (fix or "
                                   "uninstall that package)"), proc.stderr


def test_declarations_that_cannot_work_are_refused_and_late_ones_too():
    import alignflow.stages.config  # noqa: F401  (the configuration is built: the registry is closed)

    def declared(**changes) -> Algorithm:
        fields = dict(name="late", settings=StageConfig, trainer=SFTTrainer, data=PAIRS, recipe=print)
        return Algorithm(**{**fields, **changes})

    with pytest.raises(ValueError, match="algorithm name 'eval': it names a config section"):
        register_algorithm(declared(name="eval"))
    with pytest.raises(TypeError, match="trainer must be a BaseTrainer subclass"):
        register_algorithm(declared(trainer=object))
    with pytest.raises(TypeError, match="settings must be a StageConfig subclass"):
        register_algorithm(declared(settings=dict))
    with pytest.raises(RuntimeError, match=r"registered after the pipeline configuration .* was built .* entry point"):
        register_algorithm(declared())
    assert "late" not in algorithms()
