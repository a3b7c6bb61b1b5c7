"""torchrun with two gloo ranks equals one process over the same global batch."""
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "scripts" / "train_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, timeout=240):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("lora", [None, 4], ids=["full", "lora"])
def test_ddp_two_ranks_equal_single_process(tmp_path, lora):
    # SGD with momentum: its update is proportional to the gradient, so this compares what DDP
    # changes (gradient reduction and normalisation). Adam's first steps divide g by |g| + eps and
    # amplify float rounding of near-zero gradient entries to ~1e-5 whatever the launcher.
    # LoRA: DDP reduces the adapter's gradients only (its base is frozen).
    common = ["--global-batch", "8", "--accum", "2", "--num-seqs", "48", "--max-steps", "3", "--optimizer", "sgd",
              *(("--lora", str(lora)) if lora else ())]
    run([sys.executable, str(WORKER), "--out", str(tmp_path / "single.safetensors"), *common])
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(WORKER), "--out", str(tmp_path / "ddp.safetensors"), *common])
    single = load_file(tmp_path / "single.safetensors")
    ddp = load_file(tmp_path / "ddp.safetensors")
    assert single.keys() == ddp.keys()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], atol=1e-5, rtol=0, msg=name)
