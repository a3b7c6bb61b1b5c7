"""alignflow installs as one import package: pyproject.toml names every subpackage under
`alignflow`, the wheel holds `alignflow/` and its dist-info only, nothing named flows, stages,
trainers or models is importable from outside the checkout, and a user's own `./models` (or
./stages, ...) folder cannot shadow alignflow's, not even in the processes the CLI starts there."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from conftest import SMALL_PIPELINE

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("flows", "stages", "trainers", "models")


def test_pyproject_lists_every_package_of_the_tree():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {"alignflow"}
    for name, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            on_disk.add(".".join([name, *init.parent.relative_to(ROOT / folder).parts]))
    assert sorted(setuptools["package-dir"]) == [f"alignflow.{layer}" for layer in sorted(LAYERS)]
    assert sorted(setuptools["packages"]) == sorted(on_disk)


def test_the_wheel_holds_alignflow_and_its_dist_info_only(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv*", "runs", "build", "*.egg-info",
                                                                "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("alignflow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"alignflow", f"{wheel.name.split('-py')[0]}.dist-info"}
    for path in ("alignflow/__init__.py", "alignflow/stages/presets/tiny.yaml", "alignflow/trainers/dpo/loss.py",
                 "alignflow/trainers/tutorial/trainer_from_scratch.py", "alignflow/flows/cli.py"):
        assert path in names, path


def test_only_alignflow_is_importable_from_outside_the_checkout(tmp_path):
    probe = ("import importlib.util, json, alignflow, alignflow.trainers.tutorial; "
             f"print(json.dumps([alignflow.__version__, [importlib.util.find_spec(n) for n in {LAYERS!r}]]))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    version, specs = json.loads(out.stdout)
    assert version and specs == [None] * len(LAYERS)


def test_a_run_from_a_folder_with_its_own_models_package(tmp_path):
    """The embedded Prefect server and torchrun's ranks start with the working directory first on
    sys.path: decoys there that raise on import must go unnoticed."""
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
        (tmp_path / layer / "__init__.py").write_text(f"raise ImportError('the user\\'s own {layer} was imported')\n")
    settings = {**SMALL_PIPELINE, "sft.train.nproc_per_node": 2}  # sft under torchrun, started from here
    overrides = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}  # our own embedded server
    proc = subprocess.run([str(Path(sys.executable).parent / "alignflow"), "run", "--align", "none", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "| | pretrain | sft |" in proc.stdout
    assert json.loads((tmp_path / "runs" / "tiny" / "sft" / "manifest.json").read_text())["world_size"] == 2
