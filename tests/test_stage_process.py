"""Stages as processes: SIGKILL mid-training then retry, torchrun with two ranks (or two
loopback nodes) from a flow, and a failing rank's traceback in the flow's error."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter

from alignflow.flows.launch import StageProcessError, torchrun_command
from alignflow.flows.pipeline import run_stage
from conftest import task_logs
from alignflow.stages import handoff, storage
from alignflow.stages.run import train_stage


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, small_config):
    out = tmp_path_factory.mktemp("parent") / "pretrain"
    train_stage("pretrain", small_config(), None, out)
    return out


def weights(stage_dir):
    return load_file(stage_dir / "model.safetensors")


@pytest.fixture
def parent(request, pretrained, hf_model_dir):
    """The parent SFT starts from: our pretraining's output, or a Hugging Face model directory."""
    return pretrained if request.param == "builtin" else hf_model_dir("llama3")


@pytest.mark.parametrize("where, parent, lora", [("local", "builtin", None), ("bucket", "builtin", None),
                                                 ("local", "hf", None), ("local", "hf", {"r": 4, "dropout": 0.1})],
                         indirect=["parent"], ids=["local-builtin", "bucket-builtin", "local-hf", "local-hf-lora"])
def test_sigkilled_stage_resumes_to_the_same_weights(where, tmp_path, parent, lora, small_config, monkeypatch):
    """local: the retry finds the stage's own state/. bucket: the stage publishes to a URL and
    the retry runs elsewhere (an empty cache), resuming from the checkpoints it mirrored there.
    hf: the same with a Hugging Face model as the parent; lora: a LoRA stage, whose checkpoints
    hold the adapter alone, and whose merged output must match."""
    pretrained = parent
    config = small_config(**{"sft.lora": lora})
    train_stage("sft", config, pretrained, tmp_path / "straight")

    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    out, state = (tmp_path / "killed", tmp_path / "killed" / "state") if where == "local" else \
        (f"file://{tmp_path}/bucket/killed", tmp_path / "bucket" / "killed" / "state")
    proc = subprocess.Popen([sys.executable, "-m", "alignflow.stages", "sft", "--config", str(cfg_file),
                             "--parent", str(pretrained), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "ALIGNFLOW_CACHE_DIR": str(tmp_path / "first-pod")})
    deadline = time.time() + 240
    try:
        while time.time() < deadline and not list(state.glob("step-000000[01]*/trainer_state.json")):
            assert proc.poll() is None, "the stage finished before it could be killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (state.parent / handoff.MANIFEST).exists()  # an interrupted stage never looks complete

    monkeypatch.setenv("ALIGNFLOW_CACHE_DIR", str(tmp_path / "second-pod"))
    result = train_stage("sft", config, pretrained, out)  # what the flow's retry does
    assert result["metrics"]["resumed_from_step"] >= 4
    # Not bitwise, unlike the trainer's own SIGKILL test (test_resume.py): here the straight run is
    # this process and the killed one `python -m stages`, and in some full-suite runs the fresh
    # subprocess's loss differed from this process's by one float32 ulp at step 2 or 3, before
    # any checkpoint existed (seen twice with the logged losses of both; cause not found). Adam
    # turns such an ulp in a near-zero gradient into a step-sized move of that one weight: with the
    # LM head run at labelled positions only, two full-suite runs missed 1e-5 by one element of
    # a tensor (up to 4e-5), while this test alone stayed bitwise. A resume that went wrong
    # (another data position, a fresh optimizer) moves weights by ~1e-3.
    straight, resumed = weights(tmp_path / "straight"), weights(storage.localize(out))
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("parent, strategy, lora", [("builtin", "ddp", None), ("hf", "ddp", None),
                                                   ("hf", "fsdp", None), ("hf", "fsdp", {"r": 4})],
                         indirect=["parent"], ids=["builtin-ddp", "hf-ddp", "hf-fsdp", "hf-fsdp-lora"])
def test_two_ranks_through_torchrun_equal_one_process(tmp_path, parent, strategy, lora, small_config,
                                                      prefect_harness):
    pretrained = parent
    # SGD: its update is proportional to the gradient, which is what DDP reduces (see test_ddp.py).
    common = {"runs_dir": str(tmp_path), "sft.train.optimizer": "sgd", "sft.train.lr": 0.05,
              "sft.train.max_steps": 3, "sft.train.max_grad_norm": None, "sft.lora": lora}
    one = small_config(**common, **{"sft.train.batch_size": 8})
    two = small_config(**common, **{"sft.train.batch_size": 4, "sft.train.nproc_per_node": 2,
                                    "sft.train.strategy": strategy})
    a = run_stage(stage="sft", config=one, parent=str(pretrained), run_id="one")
    state = run_stage(stage="sft", config=two, parent=str(pretrained), run_id="two", return_state=True)
    b = state.result()
    # Rank 0's progress reaches the task's log a line per record: no progress bar redraws, no
    # record holding two ranks' output.
    logs = task_logs(state.state_details.flow_run_id, "sft")
    assert any(re.fullmatch(r"\[default0\]:step 3/3 · loss \S+ · lr .*", m) for m in logs), "\n".join(logs)
    assert any(re.match(rf"\[default0\]:sft: .* training rows used.* world size 2 \({strategy}\)", m)
               for m in logs), logs
    assert not any("\r" in m or "it/s" in m or m.count("[default") > 1 for m in logs), logs
    wa, wb = weights(tmp_path / "one" / "sft"), weights(tmp_path / "two" / "sft")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-5, rtol=0, msg=name)
    assert storage.read_manifest(b["stages"]["sft"]["path"])["world_size"] == 2
    assert a["stages"]["sft"]["metrics"]["step"] == b["stages"]["sft"]["metrics"]["step"] == 3
    if strategy == "fsdp":  # sharded training state, one plain Hugging Face directory out
        from transformers import AutoModelForCausalLM

        assert (tmp_path / "two" / "sft" / "state" / "step-00000003" / ".metadata").exists()
        assert (tmp_path / "two" / "sft" / "adapter").is_dir() == bool(lora)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "sft").state_dict()
        for name, tensor in wb.items():
            assert torch.equal(loaded[name], tensor), name


def test_a_failing_rank_s_traceback_reaches_the_flow(tmp_path, pretrained, small_config, prefect_harness):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "What is 1 plus 1?", "completion": "2"}\n{"prompt": "What is 2 plus 2?"}\n')
    config = small_config(**{"runs_dir": str(tmp_path), "retries": 2, "sft.train.nproc_per_node": 2,
                             "sft.data.source": str(data)})
    state = run_stage(stage="sft", config=config, parent=str(pretrained), run_id="bad", return_state=True)
    assert state.is_failed()
    with pytest.raises(StageProcessError) as failure:
        state.result()
    message = str(failure.value)
    assert message.startswith("stage sft failed: torchrun exited with code 1. DataError: ")
    # A DataError fails the same way every time: not retried, though retries=2.
    assert failure.value.permanent
    with get_client(sync_client=True) as client:
        (task_run,) = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [state.state_details.flow_run_id]}))
    assert task_run.run_count == 1
    # The first rank to fail shows its whole traceback, ending in the DataError that names the
    # file, row and column (the other rank may be stopped by torchrun before it prints one).
    blocks = message.split("\nLast lines:")[0].split("\nlocal rank ")[1:]
    assert blocks, message
    error = f"alignflow.stages.data_files.DataError: {data}: row 1 (line 2): column 'completion'"
    assert any(b.split(":\n", 1)[1].startswith("Traceback") and error in b for b in blocks), message
    assert not (tmp_path / "bad" / "sft" / handoff.MANIFEST).exists()


def test_two_nodes_join_one_rendezvous_as_the_multi_node_job_does(tmp_path, pretrained, small_config,
                                                                    prefect_harness, monkeypatch):
    """nnodes=2: the flow's torchrun is one node, and a second torchrun with the same command
    (what deploy/README.md's Indexed Job runs on the other machines) joins it through the c10d
    rendezvous at ALIGNFLOW_RDZV_ENDPOINT. Two loopback "nodes" give one process's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("ALIGNFLOW_RDZV_ENDPOINT", f"127.0.0.1:{s.getsockname()[1]}")
    common = {"runs_dir": str(tmp_path), "sft.train.optimizer": "sgd", "sft.train.lr": 0.05,
              "sft.train.max_steps": 3, "sft.train.max_grad_norm": None}
    out = tmp_path / "nodes" / "sft"
    config = small_config(**common, **{"sft.train.batch_size": 4, "sft.train.nnodes": 2})
    node_config = tmp_path / "node-config.json"  # every node resolves the same config
    node_config.write_text(config.model_dump_json())
    other_node = torchrun_command("sft", node_config, str(pretrained), str(out), nproc=1, nnodes=2,
                                  run_id="nodes", preset="tiny", log_dir=tmp_path / "other-node-logs")
    node = subprocess.Popen(other_node, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        two = run_stage(stage="sft", config=config, parent=str(pretrained), run_id="nodes")
        assert node.wait(timeout=120) == 0
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=30)
    run_stage(stage="sft", config=small_config(**common, **{"sft.train.batch_size": 8}), parent=str(pretrained),
              run_id="single")
    single, nodes = weights(tmp_path / "single" / "sft"), weights(out)
    for name in single:
        torch.testing.assert_close(nodes[name], single[name], atol=1e-5, rtol=0, msg=name)
    assert storage.read_manifest(two["stages"]["sft"]["path"])["world_size"] == 2


def test_a_stage_left_with_no_training_rows_fails_before_training(tmp_path, pretrained, small_config):
    """Every row longer than data.max_length: with max_steps set this used to spin forever at
    step 0; now it is a DataError naming the file and why, and nothing is written."""
    data = tmp_path / "long.jsonl"
    data.write_text('{"prompt": "What is two plus two, in many words?", "completion": "Four, said at length."}\n' * 5)
    config = small_config(**{"sft.data.source": str(data), "sft.data.max_length": 10, "sft.train.max_steps": 3})
    with pytest.raises(ValueError, match=r"long\.jsonl: no training examples left \(4 rows longer than "
                                         r"data\.max_length=10 dropped, 0 bad rows skipped\)"):
        train_stage("sft", config, pretrained, tmp_path / "sft")
    assert not (tmp_path / "sft" / handoff.MANIFEST).exists()


def test_python_m_stages_refuses_a_parent_of_the_wrong_stage(tmp_path, pretrained, small_config):
    """DPO on a pretrain checkpoint is refused by the stage itself, as `alignflow stage` refuses it."""
    with pytest.raises(ValueError, match=f"dpo trains on a sft checkpoint, but {pretrained} holds a pretrain stage"):
        train_stage("dpo", small_config(), pretrained, tmp_path / "dpo")
    assert not (tmp_path / "dpo").exists()
