"""Parameter groups and learning-rate schedules against hand-computed values."""
import math

import pytest
import torch
from torch import nn

from conftest import small_model
from alignflow.trainers import configure_optimizer, create_scheduler, get_parameter_groups


class WithBiases(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10, bias=False)
        self.scale = nn.Parameter(torch.ones(8))


def names_in(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_biases_norms_and_1d_params_get_no_weight_decay():
    model = WithBiases()
    decay, no_decay = get_parameter_groups(model, weight_decay=0.1)
    assert names_in(model, decay) == ["emb.weight", "head.weight", "lin.weight"]
    assert names_in(model, no_decay) == ["lin.bias", "ln.bias", "ln.weight", "scale"]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_builtin_model_groups():
    model = small_model()
    decay, no_decay = get_parameter_groups(model, 0.1)
    assert all(n.endswith("norm.weight") for n in names_in(model, no_decay))
    assert len(names_in(model, no_decay)) == 2 * 2 + 1  # two norms per layer + the final norm
    assert "model.embed_tokens.weight" in names_in(model, decay)


@pytest.mark.parametrize("kind,cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_configure_optimizer_kinds(kind, cls):
    opt = configure_optimizer(WithBiases(), kind, lr=0.01, weight_decay=0.2)
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    assert opt.param_groups[0]["lr"] == 0.01
    with pytest.raises(ValueError, match="optimizer_type"):
        configure_optimizer(WithBiases(), "lion")


def lrs(name, steps, **kw):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = create_scheduler(opt, name, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup_values():
    got = lrs("cosine", 12, warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    # warmup: (s+1)/2 of the peak; then 0.1 + 0.9 * 0.5 * (1 + cos(pi * (s-2)/8))
    expected = [1.0, 2.0] + [2.0 * (0.1 + 0.45 * (1 + math.cos(math.pi * (s - 2) / 8))) for s in range(2, 12)]
    expected[10:] = [0.2, 0.2]  # held at the floor after total_steps
    assert got == pytest.approx(expected)


def test_linear_constant_and_wsd_values():
    assert lrs("linear", 6, warmup_steps=1, total_steps=5, min_lr_ratio=0.0) == pytest.approx(
        [2.0, 2.0, 1.5, 1.0, 0.5, 0.0])
    assert lrs("constant", 5, warmup_steps=4, total_steps=5) == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0])
    # 10 steps, 1 warmup, last 20% (2 steps) decay linearly to 0.
    assert lrs("wsd", 11, warmup_steps=1, total_steps=10, min_lr_ratio=0.0) == pytest.approx(
        [2.0] * 8 + [2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="unknown schedule"):
        lrs("step", 1)
