"""LoRA stages (models/lora.py): only the adapter trains, the hand-off is the merged model plus
adapter/, and DPO's reference is the policy with its adapter switched off (no second copy)."""
import copy
import json
import math
import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import SequenceDataset, loader, small_model
from alignflow.models.lora import add_adapter, merge
from alignflow.trainers import DPOTrainer, SFTTrainer, configure_optimizer
from alignflow.trainers.dpo import collate_pairs, concatenated_logps
from alignflow.trainers.reference import AdapterDisabled


def base_model(kind, hf_model_dir):
    if kind == "builtin":
        return small_model(seed=0)
    model = AutoModelForCausalLM.from_pretrained(hf_model_dir("llama3"), dtype=torch.float32)
    model.config.use_cache = False
    return model


def vocab(model) -> int:
    return model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else \
        model.model.embed_tokens.num_embeddings


@pytest.mark.parametrize("kind", ["builtin", "hf"])
def test_lora_sft_trains_only_the_adapter_learns_and_merges_to_base_plus_scaled_ba(kind, hf_model_dir, tmp_path):
    parent = base_model(kind, hf_model_dir)
    original = {k: v.clone() for k, v in parent.state_dict().items()}
    model = add_adapter(parent, r=4, alpha=8.0)
    optimizer = configure_optimizer(model, lr=3e-2)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in in_optimizer}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names), sorted(names)[:4]
    assert names == {name for name, p in model.named_parameters() if p.requires_grad}

    data = SequenceDataset(8, min_len=12, max_len=12, seed=1, vocab=vocab(parent))  # memorisable
    trainer = SFTTrainer(model=model, optimizer=optimizer, train_loader=loader(data, 8), device="cpu",
                         max_steps=40, log_interval=1, progress_bar=False, save_dir=tmp_path / "run")
    trainer.train()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses  # a clear fall, not noise

    layers = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    scaling = 8.0 / 4
    expected = {}
    for name, m in layers.items():
        key = name.removeprefix("base_model.model.") + ".weight"
        expected[key] = original[key] + (m.lora_B["default"].weight @ m.lora_A["default"].weight) * scaling
    assert len(expected) == 7 * 2  # q k v o gate up down, in each of the 2 layers
    merged = merge(model)
    assert type(merged) is type(parent)
    state = merged.state_dict()
    assert set(state) == set(original)
    for key, value in state.items():
        assert torch.equal(value, expected.get(key, original[key])), key  # exactly, in fp32

    # The merged model is a plain model directory that transformers loads.
    from alignflow.models import save_model

    save_model(merged, str(tmp_path / "merged"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = torch.randint(3, vocab(parent), (2, 12))
    with torch.no_grad():
        logits = merged(input_ids=ids)
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
        assert torch.allclose(reloaded(input_ids=ids).logits, logits, atol=1e-5)


def pairs(n: int, vocab_size: int, seed: int = 0) -> list[dict]:
    g = random.Random(seed)
    items = []
    for _ in range(n):
        prompt = [g.randrange(3, vocab_size) for _ in range(g.randint(3, 6))]
        sides = {}
        for side in ("chosen", "rejected"):
            completion = [g.randrange(3, vocab_size) for _ in range(g.randint(2, 6))]
            sides[f"{side}_input_ids"] = prompt + completion
            sides[f"{side}_labels"] = [-100] * len(prompt) + completion
        items.append(sides)
    return items


@pytest.mark.parametrize("kind", ["builtin", "hf"])
def test_the_lora_reference_is_the_parent_and_holds_no_second_copy(kind, hf_model_dir):
    parent = base_model(kind, hf_model_dir)
    separately_loaded = copy.deepcopy(parent).eval()
    policy = add_adapter(parent, r=4, alpha=8.0, dropout=0.1)
    with torch.no_grad():  # move the adapter away from zero: policy and parent now differ
        for name, p in policy.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    batches = torch.utils.data.DataLoader(pairs(8, vocab(parent)), batch_size=4, collate_fn=collate_pairs)
    trainer = DPOTrainer(policy, AdapterDisabled(policy), configure_optimizer(policy, lr=1e-3), batches,
                         device="cpu", max_steps=2, precompute_ref_log_probs=False, progress_bar=False)
    reference = trainer.reference.model()
    assert list(reference.parameters()) == []  # the view owns nothing
    base_storages = {t.data_ptr() for t in reference.weights().values()}
    assert base_storages <= {p.data_ptr() for p in policy.parameters()} | {b.data_ptr() for b in policy.buffers()}
    assert all(p.requires_grad for n, p in policy.named_parameters() if ".lora_" in n)  # not frozen by it

    policy.train()
    batch = next(iter(batches))
    with torch.no_grad():
        ref = concatenated_logps(reference, batch)
        want = concatenated_logps(separately_loaded, batch)
        live = concatenated_logps(policy, batch)
    assert policy.training  # the view restored the policy's mode
    for got, expected in zip(ref[:2], want[:2]):
        assert torch.allclose(got, expected, atol=1e-6, rtol=0), (got - expected).abs().max()
    assert (live[0] - want[0]).abs().max() > 1e-3  # the policy's own adapter does change its numbers


def test_a_lora_sft_then_lora_dpo_and_grpo_hand_on_merged_models_against_the_parent(hf_model_dir, tmp_path,
                                                                                     small_config, monkeypatch):
    """Stage by stage (train_stage, as torchrun or a Prefect task runs them)."""
    from peft import PeftModel

    from alignflow.stages import handoff
    from alignflow.stages.run import train_stage
    from test_hf_pipeline import FAST, preference_file

    base = hf_model_dir("llama3")
    config = small_config(**FAST, model=str(base), start="sft", runs_dir=str(tmp_path / "runs"),
                          **{"sft.lora": {"r": 8, "alpha": 16}, "dpo.lora": {"r": 8, "alpha": 16},
                             "dpo.data.source": preference_file(tmp_path / "pairs.jsonl"), "dpo.rpo_alpha": None,
                             "dpo.data.val_fraction": 0.2, "dpo.train.max_steps": 16, "dpo.train.lr": 3e-3,
                             "dpo.train.log_interval": 1, "grpo.lora": {"r": 8, "alpha": 16},
                             "grpo.train.max_steps": 3, "grpo.train.lr": 3e-2, "grpo.train.log_interval": 1,
                             "grpo.max_completion_length": 8, "grpo.num_generations": 4,
                             "grpo.reward_funcs": ["digits"]})  # test_hf_pipeline's: a random model climbs it
    sft_dir, dpo_dir = tmp_path / "runs" / "sft", tmp_path / "runs" / "dpo"
    train_stage("sft", config, base, sft_dir)
    manifest = handoff.verify(sft_dir)
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(manifest["sha256"])
    assert json.loads((sft_dir / "adapter" / "adapter_config.json").read_text())["r"] == 8

    # The merged directory and the adapter on its parent are the same model.
    merged = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32)
    parent = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    parent.resize_token_embeddings(merged.config.vocab_size)  # alignflow gave it a padding token
    adapted = PeftModel.from_pretrained(parent, sft_dir / "adapter")
    ids = torch.randint(3, 200, (2, 10))
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)

    train_stage("dpo", config, sft_dir, dpo_dir)
    rows = [json.loads(line) for line in (dpo_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    # Policy = merged SFT + a zero update = the reference: DPO (without the tiny preset's RPO
    # term) starts at exactly log 2.
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert sum(losses[-4:]) / 4 < math.log(2) - 0.05, losses
    assert handoff.verify(dpo_dir)["parent"]["content_hash"] == manifest["content_hash"]

    # GRPO loads its parent once (the reference is the policy without its adapter), and the KL to
    # that reference is 0 before the first update and grows after: the reference stays the parent.
    loads = []
    load_stage = handoff.load_stage
    monkeypatch.setattr(handoff, "load_stage", lambda *a, **k: loads.append(a[0]) or load_stage(*a, **k))
    train_stage("grpo", config, sft_dir, tmp_path / "runs" / "grpo")
    assert len(loads) == 1
    kl = [json.loads(line)["kl"] for line in (tmp_path / "runs" / "grpo" / "metrics.jsonl").read_text().splitlines()
          if "kl" in json.loads(line)]
    assert kl[0] == 0.0 and kl[-1] > 1e-6, kl


@pytest.mark.parametrize("overrides, says", [
    ({"pretrain.lora": {"r": 8}}, "pretrain.lora: the built-in model 'tiny' is trained from scratch"),
    ({"dpo.lora": {"r": 8, "quantize": "4bit"}}, "dpo.lora.quantize: 4bit quantizes a transformers model"),
    ({"model": "/models/x", "start": "sft", "sft.lora": {"quantize": "4bit"}, "sft.train.strategy": "fsdp"},
     "lora.quantize: 4bit with train.strategy: fsdp is not supported"),
    ({"sft.lora": {"rank": 8}}, "rank"),
])
def test_unsupported_lora_settings_are_refused_by_name(overrides, says):
    from alignflow.stages.config import load_config

    with pytest.raises(ValueError, match="(?s)" + re.escape(says)):
        load_config("tiny", overrides=overrides)



def test_qlora_trains_on_a_4bit_base_and_hands_on_the_parent_plus_its_adapter(tmp_path, small_config, monkeypatch):
    """bitsandbytes quantizes on the CPU too (its pure-torch backend), so QLoRA runs here."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    from hf_fixtures import build_model_dir
    from alignflow.stages import handoff, run
    from alignflow.stages.run import train_stage
    from test_hf_pipeline import FAST, preference_file

    base = build_model_dir("llama3", tmp_path / "base", hidden_size=64)  # 4-bit blocks of 64
    qlora = {"r": 8, "alpha": 16, "quantize": "4bit"}
    config = small_config(**FAST, model=str(base), start="sft", runs_dir=str(tmp_path / "runs"),
                          **{"sft.lora": qlora, "dpo.lora": qlora, "dpo.train.max_steps": 6, "dpo.rpo_alpha": None,
                             "dpo.data.source": preference_file(tmp_path / "pairs.jsonl"), "dpo.train.log_interval": 1})
    lines = []
    monkeypatch.setattr(run.log, "info", lambda message, *a: lines.append(message))
    train_stage("sft", config, base, tmp_path / "runs" / "sft")
    assert any("QLoRA (4-bit base) r=8 alpha=16" in line for line in lines), lines

    # The output is the parent's own fp32 weights plus the scaled B·A: the 4-bit copy only trained.
    parent = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "sft", dtype=torch.float32).state_dict()
    adapter = load_file(tmp_path / "runs" / "sft" / "adapter" / "adapter_model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    a, b = adapter[f"base_model.model.{q}.lora_A.weight"], adapter[f"base_model.model.{q}.lora_B.weight"]
    assert b.abs().max() > 0
    assert torch.equal(merged[f"{q}.weight"], parent[f"{q}.weight"] + (b @ a) * 2.0)
    assert torch.equal(merged["model.layers.0.input_layernorm.weight"], parent["model.layers.0.input_layernorm.weight"])

    # QLoRA DPO on it: policy and reference are the same 4-bit model at step 0, so loss log 2.
    train_stage("dpo", config, tmp_path / "runs" / "sft", tmp_path / "runs" / "dpo")
    rows = [json.loads(line) for line in (tmp_path / "runs" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r][0] == pytest.approx(math.log(2), abs=1e-6)
    assert handoff.verify(tmp_path / "runs" / "dpo")["stage"] == "dpo"


def test_qlora_gradients_equal_lora_on_the_dequantized_weights(tmp_path):
    """The 4-bit base computes as its dequantized weights would, gradients included, also after
    an evaluation pass (which, unchecked, makes bitsandbytes repack the weights on AVX512-BF16
    CPUs into a form autograd cannot differentiate)."""
    bnb = pytest.importorskip("bitsandbytes")
    from hf_fixtures import build_model_dir
    from alignflow.models import load_model

    base = str(build_model_dir("llama3", tmp_path, hidden_size=64))
    quantized = add_adapter(load_model(base, quantize="4bit"), r=4, alpha=8.0)
    plain = load_model(base)
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            plain.get_submodule(name.removeprefix("base_model.model.").removesuffix(".base_layer")).weight.data = weight
    plain = add_adapter(plain, r=4, alpha=8.0)
    g = torch.Generator().manual_seed(0)
    for model in (quantized, plain):  # the same non-zero B in both, so A gets gradients too
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1
    ids = torch.randint(3, 200, (2, 12), generator=g)
    with torch.no_grad():
        quantized.eval()(input_ids=ids)  # an evaluation pass first
    grads = []
    for model in (quantized, plain):
        model.train()
        model(input_ids=ids).logits.float().square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("family, modules_to_save", [("llama3", None), ("chatml", None), ("llama3", ["lm_head"])])
def test_merged_state_is_the_merged_model_s_state_dict_and_leaves_the_adapter_in_place(family, modules_to_save,
                                                                                       hf_model_dir):
    """What an inference engine is given while an adapter trains (models.lora.merged_state): the
    state dict merge_and_unload would give, tied embeddings (chatml) and a trained copy of the
    head included, with the adapter still attached and its base weights untouched."""
    from alignflow.models.lora import merged_state

    model = AutoModelForCausalLM.from_pretrained(hf_model_dir(family), dtype=torch.float32)
    adapted = add_adapter(model, r=4, alpha=8, modules_to_save=modules_to_save, seed=3)
    with torch.no_grad():  # B starts at zero: move every trained tensor so the merge is not the base
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    got = merged_state(adapted)
    want = copy.deepcopy(adapted).merge_and_unload().state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert all(torch.equal(v, adapted.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           model.model.layers[0].self_attn.q_proj.base_layer.weight)
