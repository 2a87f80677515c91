"""`BlockedLinear`: nn.Linear with a faster CPU path for few rows and wide outputs.

MKL's fp32 matmul is slow for a few rows against a very wide weight: on this project's machine
(2-core AMD EPYC, torch 2.13 CPU) x [8, 1024] @ W^T [1024, 65024] takes 53 ms, and the same
product computed 2048 output columns at a time takes 33 ms; x [8, 4096] against 16384 outputs 47
vs 36 ms. Batched decoding (rows = batch size), the fused loss head (chunks of 64-129 rows) and
evaluation hit these shapes. One row (a matrix-vector product), large row counts (training
activations), outputs of 4096 or fewer (measured 0.9-1.1x) and bf16 matmuls (oneDNN) gain
nothing, so they keep nn.Linear's forward.
`python scripts/bench_quant.py` times the blocked path against nn.Linear in the same run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_COLUMNS = 2048
MIN_BLOCKED_OUTPUTS = 2 * BLOCK_COLUMNS + 1  # narrower layers measured neutral to 0.9x
MAX_BLOCKED_ROWS = 256


class BlockedLinear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) whose forward, on the CPU in fp32 when no
    gradient is being recorded, for 2 to 256 rows and more than 4096 outputs, computes 2048
    output columns at a time. Every output element is the same dot product as nn.Linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._blocked(x):
            return super().forward(x)
        rows = x.reshape(-1, self.in_features)
        out = rows.new_empty(rows.shape[0], self.out_features)
        for start in range(0, self.out_features, BLOCK_COLUMNS):
            stop = start + BLOCK_COLUMNS
            bias = None if self.bias is None else self.bias[start:stop]
            out[:, start:stop] = F.linear(rows, self.weight[start:stop], bias)
        return out.view(*x.shape[:-1], self.out_features)

    def _blocked(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and self.out_features >= MIN_BLOCKED_OUTPUTS
            and 1 < x.numel() // self.in_features <= MAX_BLOCKED_ROWS  # one row: a matrix-vector product, no gain
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        )
