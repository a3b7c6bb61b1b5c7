"""strategy: fsdp (FSDP2 on gloo ranks) against one process and against itself resumed, and
activation checkpointing against plain backward; the built-in model and Hugging Face ones."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SequenceDataset, collate, small_model
from test_ddp import free_port
from alignflow.trainers import sharding

WORKER = Path(__file__).parent / "scripts" / "train_worker.py"


def launch(*args, ranks: int | None = None, expect_kill: bool = False):
    """The training worker alone, or under torchrun with `ranks` processes."""
    cmd = [sys.executable, str(WORKER), *args]
    if ranks is not None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *cmd[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if expect_kill:
        assert proc.returncode != 0, "the worker was not killed"
    else:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def grad_norms(save_dir: Path) -> list[float]:
    return [r["grad_norm"] for r in map(json.loads, (save_dir / "metrics.jsonl").read_text().splitlines())
            if "grad_norm" in r]


@pytest.mark.parametrize("family", ["builtin", "chatml"])
def test_two_fsdp_ranks_equal_one_process(tmp_path, family, hf_model_dir):
    """AdamW, accumulation 2, clipping at 0.05 (the logged pre-clip norms are all above it).
    Tolerance 5e-5: the two sides' gradients differ by float rounding (~1e-9, the reduction
    order), and Adam's first steps divide each gradient entry by its own magnitude, which
    turns a rounding difference in a near-zero entry into an update difference of up to
    lr * 1e-2. DDP shows the same 2.5e-5 against one process; FSDP equals DDP here bitwise for
    the built-in model."""
    model = [] if family == "builtin" else ["--hf", str(hf_model_dir(family))]
    common = [*model, "--global-batch", "8", "--accum", "2", "--num-seqs", "48", "--max-steps", "3",
              "--max-grad-norm", "0.05"]
    launch("--out", str(tmp_path / "one.st"), "--save-dir", str(tmp_path / "one"), *common)
    launch("--out", str(tmp_path / "fsdp.st"), "--save-dir", str(tmp_path / "fsdp"), "--strategy", "fsdp",
           *common, ranks=2)
    assert min(grad_norms(tmp_path / "fsdp")) > 0.05  # clipping was active on every step
    # The pre-clip norm is the global one: every rank's shards, equal to one process's.
    assert grad_norms(tmp_path / "fsdp") == pytest.approx(grad_norms(tmp_path / "one"), rel=1e-5)
    assert max_diff(tmp_path / "one.st", tmp_path / "fsdp.st") < 5e-5


@pytest.mark.parametrize("lora", [None, 4], ids=["full", "lora"])
def test_fsdp_sigkill_resume_is_bitwise_and_a_two_rank_checkpoint_continues_on_one(tmp_path, lora):
    """With LoRA the sharded checkpoint holds the adapter and its optimizer state only."""
    # SGD for the 2 -> 1 comparison: its update is proportional to the gradient, so one rank and
    # two agree to ~1e-9 (see test_two_fsdp_ranks_equal_one_process for Adam).
    common = ["--global-batch", "8", "--num-seqs", "48", "--max-steps", "6", "--save-interval", "2",
              "--strategy", "fsdp", "--optimizer", "sgd", *(("--lora", str(lora)) if lora else ())]
    launch("--out", str(tmp_path / "straight.st"), "--save-dir", str(tmp_path / "straight"), *common, ranks=2)
    killed = tmp_path / "killed"
    launch("--out", str(tmp_path / "never.st"), "--save-dir", str(killed), "--kill-at", "5", *common,
           ranks=2, expect_kill=True)
    state = killed / "state"
    assert sorted(p.name for p in state.iterdir()) == ["step-00000002", "step-00000004"]
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in (state / "step-00000004").iterdir()}
    if lora:
        from torch.distributed.checkpoint import FileSystemReader

        saved = FileSystemReader(state / "step-00000004").read_metadata().state_dict_metadata
        weights = [k for k in saved if k.startswith("model.")]
        assert weights and all("lora_" in k for k in weights), weights[:4]
    two_ranks = copy_run(killed, tmp_path / "on-two")
    launch("--out", str(tmp_path / "resumed.st"), "--save-dir", str(two_ranks), "--resume", *common, ranks=2)
    straight, resumed = load_file(tmp_path / "straight.st"), load_file(tmp_path / "resumed.st")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    # The same 2-rank checkpoint, resharded by DCP onto one rank with the whole batch.
    launch("--out", str(tmp_path / "one-rank.st"), "--save-dir", str(killed), "--resume", *common, ranks=1)
    assert max_diff(tmp_path / "straight.st", tmp_path / "one-rank.st") < 1e-6


def test_lora_under_fsdp_equals_one_process_and_saves_merged(tmp_path):
    """The model's 61-row vocabulary does not divide by 2 ranks: the gathered embedding is a view
    of FSDP's padded storage, which the saved model directory must not trip over."""
    common = ["--lora", "4", "--global-batch", "8", "--accum", "2", "--num-seqs", "48", "--max-steps", "3",
              "--optimizer", "sgd"]
    launch("--out", str(tmp_path / "one.st"), "--save-model", str(tmp_path / "one"), *common)
    launch("--out", str(tmp_path / "fsdp.st"), "--save-model", str(tmp_path / "fsdp"), "--strategy", "fsdp", *common,
           ranks=2)
    one = load_file(tmp_path / "one.st")
    assert max(one[k].abs().max().item() for k in one if ".lora_B." in k) > 1e-5  # the adapter moved
    assert max_diff(tmp_path / "one.st", tmp_path / "fsdp.st") < 1e-8
    assert max_diff(tmp_path / "one" / "model.safetensors", tmp_path / "fsdp" / "model.safetensors") < 1e-8


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def hf_model(directory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.config.use_cache = False
    return model


@pytest.mark.parametrize("family", ["builtin", "llama3"])
def test_activation_checkpointing_gives_the_same_gradients_and_stores_less(family, hf_model_dir):
    torch.manual_seed(0)
    plain = small_model() if family == "builtin" else hf_model(hf_model_dir(family))
    checkpointed = copy.deepcopy(plain)
    sharding.checkpoint_activations(checkpointed)
    vocab = plain.config.vocab_size
    batch = collate([SequenceDataset(4, seed=5, vocab=vocab)[i] for i in range(4)])

    def backward(model) -> tuple[dict, int]:
        stored = []

        def pack(t):  # what autograd keeps for backward outside the checkpointed layers
            stored.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = out if isinstance(out, torch.Tensor) else out.logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                     ignore_index=-100)
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}, sum(stored)

    expected, full = backward(plain)
    got, kept = backward(checkpointed)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)
    assert kept < full / 2, (kept, full)


def test_decoder_layers_are_found_in_each_model_kind(hf_model_dir):
    assert [type(m).__name__ for m in sharding.decoder_layers(small_model())] == ["DecoderLayer"] * 2
    for family, name in (("llama3", "LlamaDecoderLayer"), ("chatml", "Qwen2DecoderLayer"), ("neox", "GPTNeoXLayer")):
        layers = sharding.decoder_layers(hf_model(hf_model_dir(family)))
        assert {type(m).__name__ for m in layers} == {name} and len(layers) >= 2
    with pytest.raises(ValueError, match="found no repeated decoder layers"):
        sharding.decoder_layers(torch.nn.Linear(2, 2))


def test_fsdp_without_a_process_group_says_to_use_torchrun():
    from alignflow.trainers import SFTTrainer, configure_optimizer

    model = small_model()
    with pytest.raises(ValueError, match="strategy fsdp needs a process group: launch with torchrun"):
        SFTTrainer(model=model, optimizer=configure_optimizer(model), train_loader=[], device="cpu",
                   strategy="fsdp", max_steps=1)


def test_dpo_under_fsdp_equals_ddp_with_a_precomputed_and_a_live_sharded_reference(tmp_path):
    dpo = Path(__file__).parent / "scripts" / "dpo_worker.py"

    def run(name, *extra):
        out = tmp_path / f"{name}.st"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(dpo), "--out", str(out), "--accum", "2", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return out

    ddp = run("ddp", "--cache-dir", str(tmp_path / "ddp-cache"))
    fsdp = run("fsdp", "--strategy", "fsdp", "--cache-dir", str(tmp_path / "fsdp-cache"))
    live = run("live", "--strategy", "fsdp", "--live-reference")
    assert max_diff(ddp, fsdp) <= 1e-5 and max_diff(ddp, live) <= 1e-5
    # The sharded reference's cache key hashes the same whole weights as DDP's.
    assert [p.name for p in (tmp_path / "ddp-cache").iterdir()] == [p.name for p in (tmp_path / "fsdp-cache").iterdir()]


def test_grpo_under_fsdp_equals_ddp_though_each_rank_generates_its_own_lengths(tmp_path):
    """Each rank's completions end at different lengths (row-seeded EOS), so the ranks run
    different numbers of decoding forwards: generation runs on the gathered policy."""
    grpo = Path(__file__).parent / "scripts" / "grpo_worker.py"
    for strategy in ("ddp", "fsdp"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(grpo), "--out", str(tmp_path / strategy), "--strategy", strategy]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert max_diff(tmp_path / "ddp.safetensors", tmp_path / "fsdp.safetensors") <= 1e-5
    ddp, fsdp = (json.loads((tmp_path / f"{s}.json").read_text()) for s in ("ddp", "fsdp"))
    for key in ("loss", "reward", "kl", "completion_length/mean"):
        assert fsdp[key] == pytest.approx(ddp[key], abs=1e-6), key


def test_an_fp16_overflow_on_one_rank_skips_the_step_on_every_rank_as_under_ddp(tmp_path):
    common = ["--global-batch", "8", "--num-seqs", "48", "--max-steps", "4", "--optimizer", "sgd",
              "--precision", "fp16", "--poison-at", "2"]
    for strategy in ("ddp", "fsdp"):
        launch("--out", str(tmp_path / f"{strategy}.st"), "--save-dir", str(tmp_path / strategy),
               "--strategy", strategy, *common, ranks=2)
        records = [r for r in map(json.loads, (tmp_path / strategy / "metrics.jsonl").read_text().splitlines())
                   if "loss" in r]
        assert [r["skipped_step"] for r in records] == [0.0, 1.0, 0.0, 0.0], strategy
        assert records[2]["loss_scale"] == records[0]["loss_scale"] / 2, strategy
    assert max_diff(tmp_path / "ddp.st", tmp_path / "fsdp.st") <= 1e-6
