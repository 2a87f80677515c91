"""The language-model head and the original's loss, fused for training a frozen head.

The original computes fp32 logits at every position, [b, s, V] (V = 65024 or 130528), and keeps
them, their fp32 copy and the softmax alive until backward. When the head is frozen (every
soft-prompt method), a training step only needs the loss and the gradient that flows back into
the hidden states, and only at the positions that have a label. `fused_head_loss` computes
exactly those: it selects the labelled positions, runs head + fp32 cross-entropy on them chunk
by chunk, computes each chunk's gradient with respect to its hidden states right away (the
cross-entropy gradient, softmax - onehot, through the linear), and keeps only that gradient ([n, H])
for backward. Same operations and dtypes as the plain path, so the loss and the gradients match
it; the logits are never materialised whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .constants import IGNORE_INDEX
from .linear import BlockedLinear

CHUNK_LOGIT_ELEMENTS = 2**23  # one chunk's fp32 logits, 32 MiB: 129 rows of 65024, 64 of 130528


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts label t+1: labels [b, s] -> [b, s] with IGNORE_INDEX in the last column."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]


def can_fuse(head: nn.Module, hidden_states: torch.Tensor, targets: torch.Tensor) -> bool:
    """True for a training forward whose gradient reaches the hidden states through a frozen head,
    with at least one label (targets: the shifted labels).

    Not under DeepSpeed ZeRO-3, whose hooks gather partitioned weights around the module's own
    forward and backward only."""
    return (
        type(head) in (nn.Linear, BlockedLinear)  # a plain linear (its gradient is written out below), no bias
        and head.bias is None
        and head.training
        and torch.is_grad_enabled()
        and hidden_states.requires_grad
        and not any(p.requires_grad or hasattr(p, "ds_id") for p in head.parameters())
        and bool((targets != IGNORE_INDEX).any())
    )


class _ChunkedHeadLoss(torch.autograd.Function):
    """loss = sum over chunks of CE(head(h_chunk).float(), y_chunk, reduction="sum") / n, with each
    chunk's gradient taken as autograd would: d loss / d logits = (softmax - onehot) / n, cast to the
    activation dtype, times W. n is `count` (a 0-dim fp32 tensor, see `loss_divisor`)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, targets: torch.Tensor, head: nn.Linear, count: torch.Tensor) -> torch.Tensor:
        hidden = hidden.detach()  # a view of an input would still claim to need grad (module hooks check)
        rows = max(1, CHUNK_LOGIT_ELEMENTS // head.out_features)
        grad_hidden = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, targets.numel(), rows):
            piece, target = hidden[start : start + rows], targets[start : start + rows]
            log_probs = torch.log_softmax(head(piece).float(), dim=-1)
            total += F.nll_loss(log_probs, target, reduction="sum") / count
            grad_logits = log_probs.exp_()  # softmax, in place: one [rows, V] fp32 buffer per chunk
            grad_logits[torch.arange(len(target), device=target.device), target] -= 1.0
            grad_logits /= count
            grad_hidden[start : start + rows] = grad_logits.to(hidden.dtype) @ head.weight
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # autograd's signature
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None, None


def loss_divisor(targets: torch.Tensor, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
    """What the summed next-token loss is divided by, as a 0-dim fp32 tensor: `num_items_in_batch` (the
    label tokens of the whole optimizer step, all micro-batches and ranks, as the Trainer counts them)
    when given, else this batch's own label count (the original's per-batch mean).
    targets: shifted labels [b, s]."""
    if num_items_in_batch is None:
        return (targets != IGNORE_INDEX).sum().to(torch.float32)
    return torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=targets.device).reshape(())


def fused_head_loss(head: nn.Module, hidden_states: torch.Tensor, targets: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """The summed next-token loss (fp32, IGNORE_INDEX labels skipped) over `divisor`, from hidden states [b, s, H]
    and shifted labels [b, s], without the full logits (check `can_fuse` first)."""
    keep = targets != IGNORE_INDEX
    return _ChunkedHeadLoss.apply(hidden_states[keep], targets[keep], head, divisor).to(hidden_states.dtype)
