"""Log-probabilities of label tokens, in fp32, shared by every trainer.

`token_logps` never makes a full-vocabulary fp32 copy of the logits: it takes the log-softmax
of the labels' tokens chunk by chunk (a selective log-softmax), in forward and in backward. The
usual `cross_entropy(logits.float(), ...)` keeps an fp32 copy and its fp32 log-softmax for
backward: 8 extra bytes per position and vocabulary entry, which at a 150k vocabulary is most
of a DPO step's memory."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 24  # fp32 elements of logits handled at once (64 MiB)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Align labels with logits: position t scores token t+1; the last position scores nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


class SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(logits / T)[label] for rows [N, V], 0 where label is −100. Saves only the
    logits (which exist anyway) and two floats per row (max and log-sum-exp); the gradient,
    (onehot − softmax) / T times the incoming one, is rebuilt chunk by chunk in fp32 and written
    in the logits' dtype."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
        n = logits.shape[0]
        ignored = labels == IGNORE_INDEX
        safe = labels.masked_fill(ignored, 0)
        out = torch.empty(n, dtype=torch.float32, device=logits.device)
        peaks = torch.empty(n, dtype=torch.float32, device=logits.device)
        log_sums = torch.empty(n, dtype=torch.float32, device=logits.device)
        step = _rows_per_chunk(logits.shape[1])
        for s in range(0, n, step):
            x = logits[s:s + step].float() / temperature
            # In log_softmax's order of operations, so the values match cross_entropy's bit for bit
            # or nearly: (x - max) - log(sum(exp(x - max))).
            peak = x.amax(dim=-1, keepdim=True)
            shifted = x - peak
            log_sum = shifted.exp().sum(-1).log()
            out[s:s + step] = shifted.gather(1, safe[s:s + step, None])[:, 0] - log_sum
            peaks[s:s + step], log_sums[s:s + step] = peak[:, 0], log_sum
        out.masked_fill_(ignored, 0.0)
        ctx.save_for_backward(logits, safe, ignored, peaks, log_sums)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, safe, ignored, peaks, log_sums = ctx.saved_tensors
        g = grad_out.float().masked_fill(ignored, 0.0)
        grad = torch.empty_like(logits)
        step = _rows_per_chunk(logits.shape[1])
        for s in range(0, logits.shape[0], step):
            x = logits[s:s + step].float() / ctx.temperature
            chunk = (x - peaks[s:s + step, None]).sub_(log_sums[s:s + step, None]).exp_().mul_(-g[s:s + step, None])
            chunk.scatter_add_(1, safe[s:s + step, None], g[s:s + step, None])
            grad[s:s + step] = chunk.div_(ctx.temperature)
        return grad, None, None


def token_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(label_t) per position [B, L] for *already shifted* labels, in fp32; 0 where the
    label is −100."""
    flat = SelectiveLogSoftmax.apply(logits.flatten(0, 1), labels.flatten(), float(temperature))
    return flat.view(labels.shape)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of each position's next-token distribution [B, T], in nats (no gradient), a
    chunk of positions at a time."""
    flat = logits.detach().flatten(0, 1)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    step = _rows_per_chunk(flat.shape[1])
    for s in range(0, flat.shape[0], step):
        logp = torch.log_softmax(flat[s:s + step].float() / temperature, dim=-1)
        out[s:s + step] = -(logp.exp() * logp).sum(-1)
    return out.view(logits.shape[:-1])


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of completion-token log-probs, completion length) per sequence, for labels in the
    input's own positions (−100 on prompt and padding)."""
    targets = shift_labels(labels)
    return token_logps(logits, targets).sum(-1), (targets != IGNORE_INDEX).sum(-1)
