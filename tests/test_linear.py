"""BlockedLinear: nn.Linear's results and state dict, computed in column blocks where that is faster."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chatglm_ptuning.linear import BLOCK_COLUMNS, MAX_BLOCKED_ROWS, MIN_BLOCKED_OUTPUTS, BlockedLinear


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 8, MAX_BLOCKED_ROWS, MAX_BLOCKED_ROWS + 1])  # 1 and the last: nn.Linear's path
def test_matches_nn_linear(bias, rows):
    torch.manual_seed(0)
    plain = nn.Linear(64, 2 * BLOCK_COLUMNS + 5, bias=bias)  # two full blocks and a ragged one
    blocked = BlockedLinear(64, 2 * BLOCK_COLUMNS + 5, bias=bias)
    assert blocked.out_features >= MIN_BLOCKED_OUTPUTS
    blocked.load_state_dict(plain.state_dict())
    assert blocked.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(1, rows, 64)
    with torch.no_grad():
        assert blocked._blocked(x) == (1 < rows <= MAX_BLOCKED_ROWS)
        out = blocked(x)
        assert out.shape == (1, rows, 2 * BLOCK_COLUMNS + 5)
        torch.testing.assert_close(out, plain(x), atol=1e-5, rtol=1e-5)


def test_narrow_layers_autograd_and_half_precision_keep_nn_linear_forward():
    assert not BlockedLinear(16, MIN_BLOCKED_OUTPUTS - 1)._blocked(torch.randn(2, 16))
    layer = BlockedLinear(16, 3 * BLOCK_COLUMNS)
    x = torch.randn(2, 16, requires_grad=True)
    assert not layer._blocked(x)
    layer(x).sum().backward()  # nn.Linear's path: its gradients
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(2, -1), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert layer._blocked(x)
        assert not layer.to(torch.bfloat16)._blocked(x.to(torch.bfloat16))
