"""Soft-prompt encoders: one place for every soft-prompt method.

P-tuning v2 (and Prefix-Tuning) learn `pre_seq_len` virtual positions whose keys and values
enter the attention of every layer. The official parameter names are kept
(`transformer.prefix_encoder.embedding.weight`, `...trans.0.*`, `...trans.2.*`) so official
prefix checkpoints load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration import ARCH_GLM1, ChatGLMConfig

PREFIX_DROPOUT = 0.1  # the official prefix dropout; active in training only
PREFIX_KEY_PREFIX = "transformer.prefix_encoder."  # official state-dict prefix of the prefix encoder


class PrefixEncoder(nn.Module):
    """Maps virtual-token ids to the flattened keys/values of every layer.

    Without projection: `Embedding(P, K)`. With projection (MLP reparameterisation):
    `Embedding(P, E) -> Linear(E, H) -> Tanh -> Linear(H, K)`, where E is the hidden size for
    ChatGLM-6B and K for ChatGLM2/3 (the official shapes). K = layers*2*kv_heads*head_dim.

    Input: ids [b, P] (long). Output: [b, P, K].
    """

    def __init__(self, pre_seq_len: int, kv_size: int, hidden_size: int, prefix_projection: bool, embedding_size: int):
        super().__init__()
        self.prefix_projection = prefix_projection
        if prefix_projection:
            self.embedding = nn.Embedding(pre_seq_len, embedding_size)
            self.trans = nn.Sequential(nn.Linear(embedding_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, kv_size))
        else:
            self.embedding = nn.Embedding(pre_seq_len, kv_size)
        for module in self.modules():
            # Marks the layers the model's weight init must give PyTorch's defaults (as the original).
            module.is_prompt_encoder_layer = module is not self

    @classmethod
    def from_config(cls, config: ChatGLMConfig) -> "PrefixEncoder":
        kv_size = config.prefix_kv_size
        # ChatGLM-6B projects from a hidden-size embedding; ChatGLM2/3 (code from 2023-07-05) from a K-size one.
        embedding_size = config.hidden_size if config.architecture == ARCH_GLM1 else kv_size
        return cls(config.pre_seq_len, kv_size, config.hidden_size, config.prefix_projection, embedding_size)

    def reset_parameters(self) -> None:
        """PyTorch's default initialisation, as the original module gets."""
        for module in self.modules():
            if getattr(module, "is_prompt_encoder_layer", False) and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(prefix)
        return self.trans(embedded) if self.prefix_projection else embedded

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's signature
        # The prefix is trained and kept in fp32 whatever dtype the backbone is cast to
        # (`model.half()`, `model.to(torch.bfloat16)`); device moves still apply.
        super()._apply(fn, recurse)
        for param in self.parameters():
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()
                if param.grad is not None:
                    param.grad = param.grad.float()
        return self


PrefixKeyValues = tuple[tuple[torch.Tensor, torch.Tensor], ...]


def prefix_key_values(
    encoder: PrefixEncoder,
    dropout: nn.Module,
    batch_size: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
) -> PrefixKeyValues:
    """Run the prefix encoder and split its output into per-layer (key, value) pairs.

    The flat index of one prefix position is ((layer*2 + kv)*N + head)*D + d (kv 0 = key, 1 =
    value), as in the original. Returns, per layer, key and value of shape [b, N, P, D], already
    cast to the activation dtype and passed through the prefix dropout.
    """
    weight = encoder.embedding.weight
    ids = torch.arange(weight.shape[0], device=weight.device)
    flat = encoder(ids).to(dtype)  # [P, K]; one encoder run shared by every row
    pre_seq_len = flat.shape[0]
    # [P, K] -> [b, P, 2L, N, D]; dropout draws a fresh mask per row, as the original's does
    kv = dropout(flat.view(1, pre_seq_len, 2 * num_layers, num_kv_heads, head_dim).expand(batch_size, -1, -1, -1, -1))
    kv = kv.permute(2, 0, 3, 1, 4)  # [2L, b, N, P, D]
    return tuple((kv[2 * layer], kv[2 * layer + 1]) for layer in range(num_layers))
