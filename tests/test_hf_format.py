import json
import os

import pytest
import torch

from alignflow.models import LlamaForCausalLM, ModelConfig, load_pretrained, save_pretrained

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
VARIANTS = {
    "tied": {},
    "untied": dict(tie_word_embeddings=False),
    "gqa": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "gqa-tied": dict(num_key_value_heads=1),
}


def saved_model(tmp_path, **overrides) -> tuple[LlamaForCausalLM, str]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**{**SMALL, **overrides})).eval()
    directory = str(tmp_path / "ckpt")
    save_pretrained(model, directory)
    return model, directory


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    mask[2, 15:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_bitwise(tmp_path, variant):
    model, directory = saved_model(tmp_path, **VARIANTS[variant])
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"]  # no temp files left
    loaded = load_pretrained(directory)
    assert loaded.config == ModelConfig.from_hf_dict(model.config.to_hf_dict())
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask), model(ids, attention_mask=mask))


def test_save_returns_paths_and_hf_config(tmp_path):
    model, _ = saved_model(tmp_path)
    paths = save_pretrained(model, str(tmp_path / "again"))
    assert [os.path.basename(p) for p in paths] == ["model.safetensors", "config.json"]
    assert all(os.path.isabs(p) and os.path.exists(p) for p in paths)
    with open(paths[1]) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float32"


def test_load_dtype(tmp_path):
    _, directory = saved_model(tmp_path)
    loaded = load_pretrained(directory, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_truncated_weights_name_the_file(tmp_path):
    _, directory = saved_model(tmp_path)
    path = os.path.abspath(os.path.join(directory, "model.safetensors"))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises((ValueError, RuntimeError)) as err:
        load_pretrained(directory)
    assert path in str(err.value)


def test_corrupt_header_names_the_file(tmp_path):
    _, directory = saved_model(tmp_path)
    path = os.path.abspath(os.path.join(directory, "model.safetensors"))
    with open(path, "r+b") as f:
        f.seek(8)  # the JSON header follows an 8-byte length prefix
        f.write(b"#garbage#")
    with pytest.raises((ValueError, RuntimeError)) as err:
        load_pretrained(directory)
    assert path in str(err.value)


def test_shape_mismatch_names_the_file(tmp_path):
    _, directory = saved_model(tmp_path)
    cfg_path = os.path.join(directory, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["vocab_size"] = 98
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises((ValueError, RuntimeError), match="size mismatch") as err:
        load_pretrained(directory)
    assert os.path.abspath(os.path.join(directory, "model.safetensors")) in str(err.value)


def test_missing_keys_name_the_file(tmp_path):
    # Weights saved tied, config claims untied: lm_head.weight is missing.
    _, directory = saved_model(tmp_path)
    cfg_path = os.path.join(directory, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["tie_word_embeddings"] = False
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises((ValueError, RuntimeError), match="lm_head.weight") as err:
        load_pretrained(directory)
    assert os.path.abspath(os.path.join(directory, "model.safetensors")) in str(err.value)


@pytest.mark.parametrize("content", [None, "{not json", '{"hidden_size": 30, "num_attention_heads": 4}'])
def test_bad_config_names_the_file(tmp_path, content):
    _, directory = saved_model(tmp_path)
    cfg_path = os.path.abspath(os.path.join(directory, "config.json"))
    os.remove(cfg_path)
    if content is not None:
        with open(cfg_path, "w") as f:
            f.write(content)
    with pytest.raises((ValueError, RuntimeError)) as err:
        load_pretrained(directory)
    assert cfg_path in str(err.value)


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_loads_our_checkpoint(tmp_path, variant):
    transformers = pytest.importorskip("transformers")
    model, directory = saved_model(tmp_path, **VARIANTS[variant])
    hf = transformers.LlamaForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    assert hf.config.tie_word_embeddings == model.config.tie_word_embeddings
    ids, mask = batch()
    # HF's forward defaults to arange positions; its generate() derives them from the
    # mask the way our forward does, so pass those explicitly.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits.float()
    real = mask.bool()  # logits at padding positions are arbitrary in both
    assert (ours - theirs)[real].abs().max().item() < 1e-4
