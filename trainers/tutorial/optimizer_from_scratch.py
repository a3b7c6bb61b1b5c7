"""Optimizers written from the maths (手搓优化器): AdamW and SGD with momentum.

Both classes reproduce ``torch.optim.AdamW`` / ``torch.optim.SGD`` (single-tensor
code path, ``foreach=False``) *exactly*, down to the order of floating point
operations, so you can check your understanding against the real thing
(``tests/test_tutorial.py`` does so to 1e-6 over 50 steps on a real model).

They subclass ``torch.optim.Optimizer``.  That base class gives us, for free:

* ``param_groups``: a list of dicts, each holding some parameters plus *their*
  hyperparameters (``lr``, ``weight_decay``...).  A typical use is one group
  with weight decay for matrices and one without for biases / norm weights.
* ``self.state``: a per-parameter dict where we keep running statistics
  (momentum buffers, moments, step counts).
* ``state_dict()`` / ``load_state_dict()`` for checkpointing, and
  compatibility with ``torch.optim.lr_scheduler`` (schedulers simply rewrite
  ``group["lr"]`` before each step, and we read ``group["lr"]`` every step).

What we write ourselves is ``__init__`` (defaults + validation) and ``step()``:
a plain loop over parameters using ordinary tensor operations.  The real torch
optimizers also have "foreach" / "fused" versions that batch all parameters
into a few big kernels; those are faster but compute the same thing.

Not supported here (kept out for readability): ``amsgrad``, ``maximize``,
sparse gradients, complex parameters, tensor-valued learning rates.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

__all__ = ["AdamWFromScratch", "SGDFromScratch"]


def run_closure(closure):
    """The loss a `step(closure)` caller asks to recompute (autograd on, since `step` runs
    under no_grad), or None without a closure."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class AdamWFromScratch(Optimizer):
    r"""AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization").

    For every parameter ``p`` with gradient ``g`` at step ``t = 1, 2, ...``::

        p   <- p - lr * wd * p                       # decoupled weight decay (解耦权重衰减)
        m   <- beta1 * m + (1 - beta1) * g           # first moment  (一阶矩)
        v   <- beta2 * v + (1 - beta2) * g * g       # second moment (二阶矩)
        m^  =  m / (1 - beta1 ** t)                  # bias correction (偏差修正)
        v^  =  v / (1 - beta2 ** t)
        p   <- p - lr * m^ / (sqrt(v^) + eps)        # the update

    Args:
        params: iterable of parameters, or of dicts defining parameter groups.
        lr: learning rate (step size).
        betas: decay rates of the first and second moment running averages.
        eps: added to the denominator, so we never divide by ~0.
        weight_decay: decoupled weight decay coefficient.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        # Validate up front, with the same messages torch uses: a typo such as
        # lr=-1e-3 or betas=(0.9, 1.0) would otherwise train silently badly.
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        # `defaults` fill in any hyperparameter a param group does not set itself.
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    # Optimizer updates must not be recorded by autograd: they are not part of
    # the model's computation, and in-place edits of leaf tensors that require
    # grad are an error otherwise.
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step. ``closure`` (optional) re-computes the loss."""
        loss = run_closure(closure)

        for group in self.param_groups:
            # Read hyperparameters from the *group* every step: an LR scheduler
            # (or our TrainerFromScratch) changes group["lr"] between steps.
            lr = group["lr"]
            beta1, beta2 = group["betas"]
            eps = group["eps"]
            weight_decay = group["weight_decay"]

            for p in group["params"]:
                if p.grad is None:  # frozen, or unused in this forward pass
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("AdamWFromScratch does not support sparse gradients")

                # Lazy state initialisation: both moments start at zero.
                # (Same key names as torch.optim.AdamW.)
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

                state["step"] += 1
                step = state["step"]

                # ---- 1. Decoupled weight decay ---------------------------------
                # AdamW shrinks the weights directly:  p <- p * (1 - lr * wd).
                #
                # Why not just add wd * p to the gradient (classic L2 regularisation,
                # which is what torch.optim.Adam(weight_decay=...) does)?  Because in
                # Adam the gradient is later divided by sqrt(v^).  An L2 term added
                # to g would be divided too, so parameters with large, noisy
                # gradients (big v) would barely be decayed, and parameters with tiny
                # gradients would be decayed hugely.  The L2 term would also leak
                # into the momentum m and variance v.  "Decoupling" keeps the decay a
                # plain, uniform shrink of every weight, with strength lr * wd,
                # independent of the gradient statistics.  Empirically this
                # regularises better and makes wd easier to tune.
                #
                # Order of operations: like torch, decay is applied first (before
                # the moment update), with the current lr, so that
                #     p_new = p * (1 - lr * wd) - lr * m^ / (sqrt(v^) + eps).
                # Decaying *after* the Adam update would also shrink the update by
                # (1 - lr * wd): a tiny second-order difference, but enough to break
                # exact parity with torch.optim.AdamW.
                if weight_decay != 0:
                    p.mul_(1 - lr * weight_decay)

                # ---- 2. First moment: an exponential moving average of gradients.
                # m <- beta1 * m + (1 - beta1) * g
                # This is "momentum": it averages out noise across mini-batches and
                # keeps moving in directions the gradient agrees on.  With
                # beta1 = 0.9 it averages over roughly the last 1 / (1 - 0.9) = 10 steps.
                # lerp_(g, w) computes m + w * (g - m), which is the same formula
                # rearranged; torch uses it, so we do too (bit-identical results).
                exp_avg.lerp_(grad, 1 - beta1)

                # ---- 3. Second moment: an EMA of *squared* gradients.
                # v <- beta2 * v + (1 - beta2) * g^2
                # This is the uncentred variance (we do not subtract the mean) - a
                # per-coordinate estimate of the gradient's typical magnitude.
                # Dividing by sqrt(v) later gives every coordinate a step of about
                # lr, whatever the scale of its gradient: the "adaptive" part of Adam.
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

                # ---- 4. Bias correction.
                # m and v start at 0, so early on they are biased towards 0: after
                # one step m = (1 - beta1) * g = 0.1 * g and v = (1 - beta2) * g^2 =
                # 0.001 * g^2 (default betas).  In general E[m_t] = (1 - beta1^t) * E[g]
                # (for a stationary gradient), so dividing by (1 - beta1^t) removes the
                # bias; likewise for v.  The two biases do NOT cancel in m / sqrt(v):
                # uncorrected, the very first step would be 0.1 / sqrt(0.001) ~ 3.2x lr
                # per coordinate - too large exactly when the model is most fragile.
                # Corrected, it is ~lr * sign(g).  As t grows, beta^t -> 0 and both
                # corrections fade to 1 (for v with beta2 = 0.999: a few thousand steps).
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step

                # ---- 5. The update:  p <- p - lr * m^ / (sqrt(v^) + eps)
                # with m^ = m / bc1 and sqrt(v^) = sqrt(v) / sqrt(bc2).
                # Folding 1 / bc1 into the scalar step size saves a full-tensor
                # division; eps is added *after* the bias-corrected sqrt (as in the
                # paper and in torch), it only matters when v is ~0.
                step_size = lr / bias_correction1
                bias_correction2_sqrt = bias_correction2**0.5
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-step_size)

        return loss


class SGDFromScratch(Optimizer):
    r"""Stochastic gradient descent, optionally with momentum and Nesterov.

    Same semantics as ``torch.optim.SGD``.  For each parameter::

        g <- g + wd * p                               # coupled weight decay (L2)
        if momentum != 0:
            b <- g                                    # very first step
            b <- momentum * b + (1 - dampening) * g   # later steps
            g <- g + momentum * b   if nesterov else   b
        p <- p - lr * g

    Args:
        params: iterable of parameters, or of dicts defining parameter groups.
        lr: learning rate.
        momentum: momentum factor (0 = plain SGD).
        dampening: scales down the *new* gradient entering the momentum buffer.
        nesterov: use Nesterov momentum (needs momentum > 0 and dampening == 0).
        weight_decay: L2 penalty coefficient, added to the gradient.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0,
        dampening: float = 0,
        nesterov: bool = False,
        weight_decay: float = 0,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step. ``closure`` (optional) re-computes the loss."""
        loss = run_closure(closure)

        for group in self.param_groups:
            lr, momentum, dampening, nesterov, weight_decay = (
                group[k] for k in ("lr", "momentum", "dampening", "nesterov", "weight_decay"))

            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("SGDFromScratch does not support sparse gradients")

                # ---- 1. Coupled weight decay (L2 regularisation).
                # Minimising loss + wd/2 * ||p||^2 adds wd * p to the gradient.
                # For plain SGD this is *the same* as AdamW-style decoupled decay
                # (p <- p - lr * wd * p); the two only differ once the gradient
                # is transformed (momentum here, the 1/sqrt(v) scaling in Adam):
                # here the decay term flows through the momentum buffer.
                # Note `grad.add(...)` (not add_): never modify p.grad in place.
                if weight_decay != 0:
                    grad = grad.add(p, alpha=weight_decay)

                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")  # same key as torch.optim.SGD
                    # ---- 2. Momentum buffer: a running (un-normalised) sum of past
                    # gradients, each step decayed by `momentum`:
                    #     b <- momentum * b + (1 - dampening) * g
                    # With momentum 0.9 the buffer grows to ~10x a steady gradient,
                    # which is why SGD+momentum usually wants a smaller lr.
                    # `dampening` scales how much of the *new* gradient enters.
                    # First step: torch initialises the buffer to the gradient
                    # itself, *without* dampening (there is no history to damp).
                    if buf is None:
                        buf = grad.detach().clone()
                        state["momentum_buffer"] = buf
                    else:
                        buf.mul_(momentum).add_(grad, alpha=1 - dampening)

                    # ---- 3. Nesterov look-ahead.
                    # Classic momentum steps along b.  Nesterov instead uses
                    # g + momentum * b: roughly "the gradient evaluated where the
                    # momentum is about to carry us", which corrects overshoot
                    # earlier.  (This is the Sutskever et al. reformulation that
                    # needs no second gradient evaluation.)
                    if nesterov:
                        grad = grad.add(buf, alpha=momentum)
                    else:
                        grad = buf

                # ---- 4. The update: p <- p - lr * direction
                p.add_(grad, alpha=-lr)

        return loss
