import pytest
import torch

from alignflow.models import PRESETS, KVCache, LlamaForCausalLM, ModelConfig, flops_per_token, get_preset

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def small_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(ModelConfig(**{**SMALL, **overrides})).eval()


def hf_keys(num_layers: int, tied: bool) -> set[str]:
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        keys |= {p + f"self_attn.{n}_proj.weight" for n in "qkvo"}
        keys |= {p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    return keys if tied else keys | {"lm_head.weight"}


def test_output_shape_and_dtype():
    model = small_model()
    logits = model(torch.randint(0, 97, (3, 11)))
    assert logits.shape == (3, 11, 97)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("tied", [True, False])
def test_state_dict_keys_are_hf_names(tied):
    model = small_model(tie_word_embeddings=tied)
    sd = model.state_dict()
    assert set(sd) == hf_keys(2, tied)
    # No shared storage: safetensors refuses aliased tensors and HF expects none.
    ptrs = [t.data_ptr() for t in sd.values()]
    assert len(set(ptrs)) == len(ptrs)
    assert model.num_parameters() == model.config.num_parameters()


def test_gqa_shapes():
    model = small_model(num_key_value_heads=2)
    sd = model.state_dict()
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # 2 kv heads * 16
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert model(torch.randint(0, 97, (2, 7))).shape == (2, 7, 97)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        ModelConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="divisible by num_key_value_heads"):
        ModelConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="valid presets: gpt2-small, tiny"):
        get_preset("huge")
    assert get_preset("tiny", vocab_size=500).vocab_size == 500
    assert PRESETS["tiny"].vocab_size == 2048  # overrides never leak into the preset


def test_hf_config_round_trip():
    cfg = ModelConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=False, eos_token_id=2)
    d = cfg.to_hf_dict()
    assert d["architectures"] == ["LlamaForCausalLM"] and d["model_type"] == "llama"
    assert d["head_dim"] == 16 and d["hidden_act"] == "silu" and d["attention_bias"] is False
    assert ModelConfig.from_hf_dict({**d, "some_future_key": 1}) == cfg


def test_init_scales_residual_projections():
    model = LlamaForCausalLM(ModelConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=8))
    sd = model.state_dict()
    assert sd["model.layers.0.self_attn.q_proj.weight"].std().item() == pytest.approx(0.02, rel=0.02)
    # 0.02 / sqrt(2 * 8 layers) = 0.005
    assert sd["model.layers.0.self_attn.o_proj.weight"].std().item() == pytest.approx(0.005, rel=0.02)
    assert sd["model.layers.0.mlp.down_proj.weight"].std().item() == pytest.approx(0.005, rel=0.02)
    assert torch.equal(sd["model.norm.weight"], torch.ones(256))


def test_causality():
    model = small_model()
    x = torch.randint(0, 97, (2, 16))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 97
    a, b = model(x), model(y)
    assert torch.equal(a[:, :9], b[:, :9])
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3


def test_right_padding_keeps_real_logits():
    model = small_model()
    lengths = [12, 7, 3]
    x = torch.randint(1, 97, (3, 12))
    mask = torch.zeros(3, 12, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        x[i, n:] = 0
    padded = model(x, attention_mask=mask)
    for i, n in enumerate(lengths):
        alone = model(x[i : i + 1, :n])
        torch.testing.assert_close(padded[i : i + 1, :n], alone, atol=1e-5, rtol=0)


def test_left_padding_no_nan_and_matches_unpadded():
    model = small_model()
    x = torch.randint(1, 97, (2, 10))
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    logits = model(x, attention_mask=mask)
    assert torch.isfinite(logits).all()
    # Positions restart at 0 after the padding, so the real suffix sees what it would alone.
    torch.testing.assert_close(logits[1:, 4:], model(x[1:, 4:]), atol=1e-5, rtol=0)


def test_kv_cache_matches_full_forward():
    model = small_model(num_key_value_heads=2)
    x = torch.randint(0, 97, (2, 12))
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    full = model(x, attention_mask=mask)
    cache = KVCache(model.config, max_len=12)
    parts = [model(x[:, :5], attention_mask=mask[:, :5], kv_cache=cache)]
    for t in range(5, 12):
        parts.append(model(x[:, t : t + 1], attention_mask=mask[:, : t + 1], kv_cache=cache))
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(parts, 1)[:, 3:], full[:, 3:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="overflow"):
        model(x[:, :1], attention_mask=torch.ones(2, 13), kv_cache=cache)


def test_preset_sizes():
    tiny = LlamaForCausalLM(PRESETS["tiny"])
    assert 0.9e6 < tiny.num_parameters() < 1.3e6
    with torch.device("meta"):
        gpt2 = LlamaForCausalLM(PRESETS["gpt2-small"])
    assert gpt2.num_parameters() == PRESETS["gpt2-small"].num_parameters()
    assert 115e6 < gpt2.num_parameters() < 135e6


def test_flops_per_token():
    cfg = PRESETS["gpt2-small"]
    # Tied: 6N over all params (embedding counted once, as the output projection) + attention.
    attn = 12 * 12 * 12 * 64 * 1024
    assert flops_per_token(cfg, 1024) == 6 * cfg.num_parameters() + attn
    untied = get_preset("gpt2-small", tie_word_embeddings=False)
    assert flops_per_token(untied, 1024) == flops_per_token(cfg, 1024)
