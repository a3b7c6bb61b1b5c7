"""Shared builders for the trainer tests: a small built-in model and variable-length data."""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # DDP tests talk over loopback only

VOCAB = 61

# A pipeline config that runs each stage in seconds: for tests of plumbing, not of learning.
SMALL_PIPELINE = {"vocab_size": 300, "demo.pretrain_docs": 300, "demo.sft_examples": 400, "demo.preference_pairs": 64,
                  "eval.max_prompts": 8, "eval.reward_samples": 2,
                  "pretrain.train.max_steps": 10, "pretrain.train.batch_size": 8,
                  "sft.train.max_steps": 24, "sft.train.save_interval": 4, "sft.train.batch_size": 8,
                  "sft.train.log_interval": 1, "dpo.train.max_steps": 4, "dpo.train.batch_size": 8}


@pytest.fixture(scope="session")
def small_config():
    """`small_config(**overrides)`: the tiny preset shrunk to SMALL_PIPELINE, plus overrides."""
    from alignflow.stages.config import load_config

    return lambda **extra: load_config("tiny", overrides={**SMALL_PIPELINE, **extra})


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): intra-op
    threads buy nothing there, and on a shared 2-core machine their spin-waiting made steps ~10x
    slower. torchrun's workers already default to one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_cluster():
    """A two-node Ray cluster on loopback addresses (tests/ray_cluster.py), for the module; the
    Ray drivers this process starts (the flow's, and a worker's flow runs') inherit the setting
    that keeps them on loopback too."""
    from ray_cluster import DRIVER_ENV, start_cluster

    saved = {k: os.environ.get(k) for k in DRIVER_ENV}
    running = start_cluster()
    os.environ.update(DRIVER_ENV)
    try:
        yield running
    finally:
        running.stop()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="session")
def prefect_harness():
    """One embedded Prefect server for every test that runs flows (its start takes 15-25 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def small_model(seed: int = 0, **overrides):
    """The built-in Llama, small enough for many CPU steps per second."""
    from alignflow.models import LlamaForCausalLM, get_preset

    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=64)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(get_preset("tiny", **cfg))


class SequenceDataset(Dataset):
    """Seeded sequences of varying length; the first `prompt_len` tokens carry no loss."""

    def __init__(self, n: int, min_len: int = 4, max_len: int = 20, prompt_len: int = 2, seed: int = 0,
                 vocab: int = VOCAB):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
        self.items = []
        for length in lengths:
            ids = torch.randint(3, vocab, (length,), generator=g)
            labels = ids.clone()
            labels[:prompt_len] = -100
            self.items.append((ids, labels))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(items, pad_id: int = 0) -> dict:
    """Right-pad to the longest sequence of the batch; padding gets mask 0 and label −100."""
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(items):
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = lab
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def loader(dataset, batch_size: int, shuffle: bool = False, sampler=None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, collate_fn=collate)


@pytest.fixture
def tmp_save_dir(tmp_path):
    return tmp_path / "run"


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """`hf_model_dir(family)`: a tiny Hugging Face model dir (tests/hf_fixtures.py), built once per session.

    Families: "llama3", "chatml", "neox". The directory is shared by every test of the session:
    treat it as read-only, and `shutil.copytree` it first to change anything in it."""
    from hf_fixtures import FAMILIES, build_model_dir

    built = {}

    def get(family: str):
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
        if family not in built:
            built[family] = build_model_dir(family, tmp_path_factory.mktemp(f"hf-{family}"))
        return built[family]

    return get


def task_logs(flow_run_id, task_name: str) -> list[str]:
    """The messages a flow run's task (by name) logged, as read back from the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, LogFilter, LogFilterTaskRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)  # logs are sent in batches: the last ones may still be queued
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
        ids = [r.id for r in runs if r.name == task_name]
        logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=ids)),
                                sort=LogSort.TIMESTAMP_ASC)
    return [log.message for log in logs]
