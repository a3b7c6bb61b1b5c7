"""trainers.tutorial: the from-scratch optimizers match torch.optim, and the
from-scratch trainer really trains the built-in Llama."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

from alignflow.models import LlamaForCausalLM, get_preset

from alignflow.trainers.tutorial import AdamWFromScratch, SGDFromScratch, TrainerFromScratch

VOCAB = 97
SEQ = 16


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These models are tiny: intra-op threads only add synchronisation overhead
    (10x slower on a busy 2-core machine), so run this module single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = get_preset(
        "tiny",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Usual split: decay matrices, not 1-D params (norm gains, biases)."""
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def random_batches(n: int, batch_size: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch_size, SEQ), generator=g) for _ in range(n)]


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def train_steps(model, optimizer, batches, scheduler=None) -> None:
    for tokens in batches:
        optimizer.zero_grad(set_to_none=True)
        lm_loss(model, tokens).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-6) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def assert_moved(model: torch.nn.Module, initial: torch.nn.Module) -> None:
    """Guard against a vacuous parity test in which nothing was updated."""
    moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), initial.parameters()))
    assert moved > 1e-3


# --------------------------------------------------------------------- optimizers


def test_adamw_matches_torch_with_param_groups_and_lambdalr():
    base = make_model()
    mine, ref = copy.deepcopy(base), copy.deepcopy(base)
    hp = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    opt_mine = AdamWFromScratch(param_groups(mine, 0.1), **hp, weight_decay=0.1)
    opt_ref = torch.optim.AdamW(param_groups(ref, 0.1), **hp, weight_decay=0.1, foreach=False)
    warmup = lambda step: min(1.0, (step + 1) / 10)  # noqa: E731
    sched_mine = torch.optim.lr_scheduler.LambdaLR(opt_mine, warmup)
    sched_ref = torch.optim.lr_scheduler.LambdaLR(opt_ref, warmup)
    assert opt_mine.param_groups[0]["lr"] == pytest.approx(1e-4)  # scheduler set it

    batches = random_batches(50)
    train_steps(mine, opt_mine, batches, sched_mine)
    train_steps(ref, opt_ref, batches, sched_ref)

    assert_same_params(mine, ref, atol=1e-6)
    assert_moved(mine, base)
    assert [g["lr"] for g in opt_mine.param_groups] == [g["lr"] for g in opt_ref.param_groups] == [1e-3, 1e-3]
    # Moments agree too, not only the weights.
    for p_m, p_r in zip(mine.parameters(), ref.parameters()):
        s_m, s_r = opt_mine.state[p_m], opt_ref.state[p_r]
        assert s_m["step"] == int(s_r["step"]) == 50
        torch.testing.assert_close(s_m["exp_avg"], s_r["exp_avg"], atol=1e-6, rtol=0)
        torch.testing.assert_close(s_m["exp_avg_sq"], s_r["exp_avg_sq"], atol=1e-6, rtol=0)


def test_adamw_decay_is_decoupled():
    """With a zero gradient, AdamW only shrinks the weights by (1 - lr * wd):
    the decay never enters the moments (Adam's L2 version would)."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = AdamWFromScratch([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.95, -1.9]))
    assert opt.state[p]["exp_avg"].abs().sum() == 0
    assert opt.state[p]["exp_avg_sq"].abs().sum() == 0


@pytest.mark.parametrize(
    "hp",
    [
        dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.01),
        dict(momentum=0.9, nesterov=True, weight_decay=0.0),
        dict(momentum=0.9, dampening=0.1),
        dict(momentum=0.0),
    ],
    ids=["momentum-wd", "nesterov", "dampening", "plain"],
)
def test_sgd_matches_torch(hp):
    base = make_model()
    mine, ref = copy.deepcopy(base), copy.deepcopy(base)
    wd = hp.pop("weight_decay", 0.0)
    opt_mine = SGDFromScratch(param_groups(mine, wd), lr=0.1, **hp)
    opt_ref = torch.optim.SGD(param_groups(ref, wd), lr=0.1, **hp, foreach=False)

    batches = random_batches(50)
    train_steps(mine, opt_mine, batches)
    train_steps(ref, opt_ref, batches)

    assert_same_params(mine, ref, atol=1e-6)
    assert_moved(mine, base)


def test_sgd_first_momentum_step_is_undamped():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = SGDFromScratch([p], lr=1.0, momentum=0.9, dampening=0.5)
    p.grad = torch.ones(1)
    opt.step()  # buffer = g (not (1 - dampening) * g)
    assert opt.state[p]["momentum_buffer"].item() == 1.0
    opt.step()  # buffer = 0.9 * 1 + 0.5 * 1
    assert opt.state[p]["momentum_buffer"].item() == pytest.approx(1.4)
    assert p.item() == pytest.approx(-2.4)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_optimizer_state_dict_round_trip_is_bitwise(kind):
    def make_opt(model):
        if kind == "adamw":
            return AdamWFromScratch(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))
        return SGDFromScratch(param_groups(model, 0.01), lr=0.1, momentum=0.9, nesterov=True)

    batches = random_batches(20)
    # Uninterrupted: 20 steps.
    straight = make_model()
    opt = make_opt(straight)
    train_steps(straight, opt, batches)

    # Interrupted: 10 steps, serialise model + optimizer, fresh objects, 10 more.
    first = make_model()
    opt = make_opt(first)
    train_steps(first, opt, batches[:10])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    resumed = make_model(seed=123)  # different init: everything must come from the file
    resumed.load_state_dict(saved["model"])
    opt = make_opt(resumed)
    opt.load_state_dict(saved["optimizer"])
    train_steps(resumed, opt, batches[10:])

    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "make",
    [
        lambda p: AdamWFromScratch(p, lr=-1e-3),
        lambda p: AdamWFromScratch(p, eps=-1e-8),
        lambda p: AdamWFromScratch(p, betas=(1.0, 0.999)),
        lambda p: AdamWFromScratch(p, betas=(0.9, -0.1)),
        lambda p: AdamWFromScratch(p, weight_decay=-0.1),
        lambda p: SGDFromScratch(p, lr=-0.1),
        lambda p: SGDFromScratch(p, lr=0.1, momentum=-0.9),
        lambda p: SGDFromScratch(p, lr=0.1, weight_decay=-0.1),
        lambda p: SGDFromScratch(p, lr=0.1, momentum=0.0, nesterov=True),
        lambda p: SGDFromScratch(p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
    ],
)
def test_invalid_hyperparameters_raise(make):
    with pytest.raises(ValueError):
        make([torch.nn.Parameter(torch.zeros(2))])


# ------------------------------------------------------------------------ trainer


def arithmetic_sequences(n: int, seed: int = 0) -> torch.Tensor:
    """x[t] = (start + stride * t) mod VOCAB, stride in {1, 2, 3}: after two
    tokens every next token is predictable, so a tiny model can learn it."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    return (start + stride * torch.arange(SEQ)) % VOCAB


def lm_batches(tokens: torch.Tensor, batch_size: int) -> list[dict]:
    return [
        {"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t.clone()}
        for t in tokens.split(batch_size)
    ]


def test_trainer_learns_with_dataloader_and_validation(capsys):
    """The seed documents' example usage, on a real DataLoader."""
    data = arithmetic_sequences(64)
    examples = [{"input_ids": t, "labels": t.clone()} for t in data]
    train_loader = torch.utils.data.DataLoader(examples, batch_size=8, shuffle=False)
    val_loader = torch.utils.data.DataLoader(examples[:16], batch_size=8)

    model = make_model()
    optimizer = AdamWFromScratch(params=model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    trainer = TrainerFromScratch(
        model=model, optimizer=optimizer, train_loader=train_loader, val_loader=val_loader,
        device="cpu", max_epochs=10, warmup_steps=5, log_interval=20,
    )
    initial_val = trainer.evaluate()
    metrics = trainer.train()

    assert set(metrics) == {"train_loss", "val_loss", "step"}
    assert metrics["step"] == trainer.step == 80 and trainer.epoch == 10
    first = trainer.history[0]["loss"]
    assert first == pytest.approx(math.log(VOCAB), abs=0.3)  # untrained: ~uniform
    assert metrics["train_loss"] < 0.5 * first
    assert metrics["val_loss"] < 0.5 * initial_val
    # LR schedule: warmup from lr/5, peak lr, cosine down towards 0.1 * lr.
    lrs = [h["lr"] for h in trainer.history]
    assert lrs[0] == pytest.approx(3e-3 / 5) and lrs[4] == pytest.approx(3e-3)
    assert lrs[-1] == pytest.approx(3e-4, rel=0.01)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert "step 20/80" in capsys.readouterr().out


def test_loss_ignores_minus_100_and_shifts():
    model = make_model()
    trainer = TrainerFromScratch(model, SGDFromScratch(model.parameters(), lr=0.1), [None])
    tokens = arithmetic_sequences(4)
    labels = tokens.clone()
    labels[:, : SEQ // 2] = -100  # e.g. the prompt in SFT
    loss, n_tokens = trainer.compute_loss({"input_ids": tokens, "labels": labels})
    logits = model(tokens)
    expected = F.cross_entropy(logits[:, SEQ // 2 - 1 : -1].reshape(-1, VOCAB), tokens[:, SEQ // 2 :].reshape(-1))
    torch.testing.assert_close(loss, expected)
    assert n_tokens == 4 * (SEQ // 2)


def test_grad_accumulation_matches_big_batch():
    """2 x 4 accumulated == 1 x 8 when all sequences have the same length."""
    data = arithmetic_sequences(32)
    base = make_model()
    runs = {}
    for accum, bs in [(1, 8), (2, 4)]:
        model = copy.deepcopy(base)
        opt = AdamWFromScratch(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))
        trainer = TrainerFromScratch(
            model, opt, lm_batches(data, bs), grad_accum_steps=accum, max_epochs=2,
            max_grad_norm=1.0, warmup_steps=2, log_interval=0,
        )
        metrics = trainer.train()
        assert metrics["step"] == 8
        runs[accum] = (model, trainer.history)
    assert_same_params(runs[1][0], runs[2][0], atol=1e-5)
    assert_moved(runs[1][0], base)
    for h1, h2 in zip(runs[1][1], runs[2][1]):
        assert h1["loss"] == pytest.approx(h2["loss"], abs=1e-5)
        assert h1["grad_norm"] == pytest.approx(h2["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_precision_trains(amp_dtype):
    data = arithmetic_sequences(32)
    model = make_model()
    opt = AdamWFromScratch(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    trainer = TrainerFromScratch(
        model, opt, lm_batches(data, 8), max_steps=60, use_amp=True, amp_dtype=amp_dtype,
        warmup_steps=5, log_interval=0,
    )
    assert (trainer.scaler is not None) == (amp_dtype == torch.float16)  # fp16 only
    metrics = trainer.train()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert math.isfinite(metrics["train_loss"])
    assert metrics["train_loss"] < 0.5 * trainer.history[0]["loss"]


class CrashingLoader:
    """Yields its batches once, then raises: a run that dies in epoch 2."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.passes += 1
        if self.passes > 1:
            raise RuntimeError("simulated crash")
        return iter(self.batches)


def test_checkpoint_round_trip_and_resume(tmp_path):
    batches = lm_batches(arithmetic_sequences(24), 8)  # 3 steps per epoch
    kwargs = dict(max_steps=6, warmup_steps=2, log_interval=0)

    def make_trainer(seed, loader, **extra):
        model = make_model(seed)
        opt = AdamWFromScratch(param_groups(model, 0.1), lr=3e-3, betas=(0.9, 0.95))
        return TrainerFromScratch(model, opt, loader, **kwargs, **extra)

    straight = make_trainer(0, batches)
    straight.train()

    # Dies at the start of epoch 2, after saving last.pt at the end of epoch 1.
    crashed = make_trainer(0, CrashingLoader(batches), save_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    assert crashed.step == 3 and (tmp_path / "last.pt").exists()

    resumed = make_trainer(7, batches)  # different init: weights must come from the file
    resumed.load_checkpoint(str(tmp_path / "last.pt"))
    assert resumed.step == 3 and resumed.epoch == 1
    assert_same_params(resumed.model, crashed.model, atol=0)
    for p_r, p_c in zip(resumed.model.parameters(), crashed.model.parameters()):
        assert torch.equal(resumed.optimizer.state[p_r]["exp_avg_sq"], crashed.optimizer.state[p_c]["exp_avg_sq"])
    assert resumed.optimizer.param_groups[0]["lr"] == crashed.optimizer.param_groups[0]["lr"]

    # Epoch 2 sees the same batches either way, so resuming reproduces the
    # uninterrupted run exactly.
    assert resumed.train()["step"] == 6
    assert_same_params(resumed.model, straight.model, atol=0)


def test_trainer_rejects_bad_arguments():
    model = make_model()
    opt = SGDFromScratch(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        TrainerFromScratch(model, opt, [None], grad_accum_steps=0)
    with pytest.raises(ValueError, match="max_steps"):
        TrainerFromScratch(model, opt, iter([]))  # no len(), no max_steps
    with pytest.raises(ValueError, match="no full step"):
        TrainerFromScratch(model, opt, [None], grad_accum_steps=2)
