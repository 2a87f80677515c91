"""Soft-prompt encoders: one place for every soft-prompt method.

Every method learns `pre_seq_len` (P) virtual tokens; they differ in where the tokens enter
and how they are parameterised:

| method | where | encoder |
|---|---|---|
| `ptuning_v2` (Liu et al. 2022) | keys/values at every layer | `PrefixEncoder`, MLP projection optional (official) |
| `prefix_tuning` (Li & Liang 2021) | keys/values at every layer | `PrefixEncoder`, MLP projection always, its width a setting |
| `prompt_tuning` (Lester et al. 2021) | input embeddings | `PromptEmbedding`: a [P, H] table |
| `ptuning` (P-tuning v1, Liu et al. 2021) | input embeddings | `PromptEncoder`: [P, H] table -> biLSTM -> MLP, or -> MLP |

Layer-level encoders live under `transformer.prefix_encoder.*` (the official names
`embedding.weight`, `trans.0.*`, `trans.2.*`, so official prefix checkpoints load unchanged);
input-level ones under `transformer.prompt_encoder.*`. Every encoder keeps fp32 parameters
whatever the backbone's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .configuration import ARCH_GLM1, ChatGLMConfig

PREFIX_DROPOUT = 0.1  # the official prefix dropout; active in training only
PREFIX_KEY_PREFIX = "transformer.prefix_encoder."  # official state-dict prefix of the prefix encoder
PROMPT_KEY_PREFIX = "transformer.prompt_encoder."  # state-dict prefix of the input-level prompt encoders
SOFT_PROMPT_KEY_PREFIXES = (PREFIX_KEY_PREFIX, PROMPT_KEY_PREFIX)


@dataclass(frozen=True)
class Method:
    """One tuning method: its `--method` name, the name people know it by, where it acts, and what
    its checkpoint folder holds."""

    name: str
    display_name: str
    kind: str  # "kv_prefix" (keys/values at every layer), "input_prompt", "lora" or "full"
    checkpoint: str


# The method registry: every reader (flags, checkpoint settings, loading, serving) takes its names here.
_SOFT_PROMPT_CHECKPOINT = "model.safetensors (the soft prompt) + ptuning_config.json"
METHOD_REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ptuning_v2", "P-tuning v2", "kv_prefix", _SOFT_PROMPT_CHECKPOINT + ", or the official pytorch_model.bin"),
        Method("prefix_tuning", "Prefix-Tuning", "kv_prefix", _SOFT_PROMPT_CHECKPOINT),
        Method("prompt_tuning", "Prompt Tuning", "input_prompt", _SOFT_PROMPT_CHECKPOINT),
        Method("ptuning", "P-tuning", "input_prompt", _SOFT_PROMPT_CHECKPOINT),
        Method("lora", "LoRA", "lora", "PEFT's adapter files (+ ptuning_config.json)"),
        Method("full", "full fine-tuning", "full", "a whole model folder (official key names)"),
    )
}
METHODS = tuple(METHOD_REGISTRY)
KV_PREFIX_METHODS = tuple(n for n, m in METHOD_REGISTRY.items() if m.kind == "kv_prefix")  # virtual keys/values at every layer
INPUT_PROMPT_METHODS = tuple(n for n, m in METHOD_REGISTRY.items() if m.kind == "input_prompt")  # virtual tokens at the input
SOFT_PROMPT_METHODS = KV_PREFIX_METHODS + INPUT_PROMPT_METHODS
ENCODER_TYPES = ("lstm", "mlp")  # P-tuning (v1) prompt encoders
PREFIX_TUNING_HIDDEN_SIZE = 512  # Li & Liang's MLP width (their `mid_dim`), the prefix_tuning default


class SoftPromptModule(nn.Module):
    """Base of the prompt encoders: fp32 parameters under any model cast, PyTorch's default init.

    Call `_mark_layers()` at the end of `__init__`.
    """

    def _mark_layers(self) -> None:
        for module in self.modules():
            # Marks the layers the model's weight init must give PyTorch's defaults (as the original).
            module.is_prompt_encoder_layer = module is not self and hasattr(module, "reset_parameters")

    def reset_parameters(self) -> None:
        """PyTorch's default initialisation of every layer, as the original module gets."""
        for module in self.modules():
            if getattr(module, "is_prompt_encoder_layer", False):
                module.reset_parameters()

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's signature
        # The prompt is trained and kept in fp32 whatever dtype the backbone is cast to
        # (`model.half()`, `model.to(torch.bfloat16)`); device moves still apply.
        super()._apply(fn, recurse)
        converted = False
        for param in self.parameters():
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()
                converted = True
                if param.grad is not None:
                    param.grad = param.grad.float()
        if converted:
            for module in self.modules():
                if isinstance(module, nn.RNNBase):  # its fused weight buffer must be rebuilt after the cast
                    module.flatten_parameters()
        return self


class PrefixEncoder(SoftPromptModule):
    """The flattened keys/values of every layer for P virtual tokens.

    Without projection: `Embedding(P, K)`. With projection (MLP reparameterisation):
    `Embedding(P, E) -> Linear(E, H) -> Tanh -> Linear(H, K)`, where E is the hidden size for
    ChatGLM-6B and K for ChatGLM2/3 (the official shapes). K = layers*2*kv_heads*head_dim.

    Prefix-Tuning uses the projected form with an embedding of the hidden size H for both
    families and an MLP width of its own (`prompt_encoder_hidden_size`).

    forward() -> [P, K].
    """

    def __init__(self, pre_seq_len: int, kv_size: int, hidden_size: int, prefix_projection: bool, embedding_size: int):
        super().__init__()
        self.prefix_projection = prefix_projection
        if prefix_projection:
            self.embedding = nn.Embedding(pre_seq_len, embedding_size)
            self.trans = nn.Sequential(nn.Linear(embedding_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, kv_size))
        else:
            self.embedding = nn.Embedding(pre_seq_len, kv_size)
        self._mark_layers()

    @classmethod
    def from_config(cls, config: ChatGLMConfig) -> "PrefixEncoder":
        kv_size = config.prefix_kv_size
        if config.prompt_method == "prefix_tuning":
            width = config.prompt_encoder_hidden_size or PREFIX_TUNING_HIDDEN_SIZE
            return cls(config.pre_seq_len, kv_size, width, True, config.hidden_size)
        # ChatGLM-6B projects from a hidden-size embedding; ChatGLM2/3 (code from 2023-07-05) from a K-size one.
        embedding_size = config.hidden_size if config.architecture == ARCH_GLM1 else kv_size
        return cls(config.pre_seq_len, kv_size, config.hidden_size, config.prefix_projection, embedding_size)

    def forward(self) -> torch.Tensor:
        """The keys/values of all P positions: [P, K]. The original looked up `arange(P)` per row; the
        table is used as it is, so neither a copy ([P, K] is 117 MB for ChatGLM-6B) nor an embedding
        backward is made, and the batch rows share one encoder run."""
        table = self.embedding.weight
        return self.trans(table) if self.prefix_projection else table


class PromptEmbedding(SoftPromptModule):
    """Prompt Tuning (Lester et al. 2021): P trainable input embeddings, `embedding.weight` [P, H].

    forward() -> [P, H].
    """

    def __init__(self, num_virtual_tokens: int, hidden_size: int):
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, hidden_size)
        self._mark_layers()

    def forward(self) -> torch.Tensor:
        return self.embedding.weight

    @torch.no_grad()
    def init_from_vocabulary(self, word_embeddings: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Lester et al.'s best initialisation: copy the embeddings of P randomly drawn vocabulary
        tokens. Draws from the first 5000 ids, the most frequent pieces of a BPE vocabulary
        (the paper draws from the 5000 most common tokens). word_embeddings: [V, H]."""
        pool = min(word_embeddings.shape[0], 5000)
        ids = torch.randint(pool, (self.embedding.num_embeddings,), generator=generator)
        self.embedding.weight.copy_(word_embeddings[ids.to(word_embeddings.device)].float())


class PromptEncoder(SoftPromptModule):
    """P-tuning (v1, Liu et al. 2021): P trainable embeddings [P, H] reparameterised by a prompt encoder.

    `encoder_type` "lstm" (the paper's): a 2-layer bidirectional LSTM (h/2 per direction) then an MLP
    `Linear(h, h) -> ReLU -> Linear(h, H)`, as the original P-tuning code with h = H.
    `encoder_type` "mlp": the MLP alone, `Linear(H, h) -> ReLU -> Linear(h, H)`.
    h = `encoder_hidden_size`. forward() -> [P, H].
    """

    def __init__(self, num_virtual_tokens: int, hidden_size: int, encoder_type: str, encoder_hidden_size: int):
        super().__init__()
        if encoder_type not in ENCODER_TYPES:
            raise ValueError(f"prompt encoder_type must be one of {ENCODER_TYPES}, found {encoder_type!r}")
        if encoder_type == "lstm" and encoder_hidden_size % 2:
            raise ValueError(
                f"the LSTM prompt encoder splits its hidden size over two directions: it must be even, found {encoder_hidden_size}"
            )
        self.encoder_type = encoder_type
        self.embedding = nn.Embedding(num_virtual_tokens, hidden_size)
        mlp_input = hidden_size
        if encoder_type == "lstm":
            self.lstm = nn.LSTM(hidden_size, encoder_hidden_size // 2, num_layers=2, bidirectional=True, batch_first=True)
            mlp_input = encoder_hidden_size
        self.mlp = nn.Sequential(
            nn.Linear(mlp_input, encoder_hidden_size), nn.ReLU(), nn.Linear(encoder_hidden_size, hidden_size)
        )
        self._mark_layers()

    def forward(self) -> torch.Tensor:
        hidden = self.embedding.weight[None]  # [1, P, H]
        if self.encoder_type == "lstm":
            hidden = self.lstm(hidden)[0]  # [1, P, h]
        return self.mlp(hidden)[0]


def build_input_prompt_encoder(config: ChatGLMConfig) -> PromptEmbedding | PromptEncoder:
    """The input-level encoder of `config.prompt_method` (prompt_tuning or ptuning)."""
    if config.prompt_method == "prompt_tuning":
        return PromptEmbedding(config.pre_seq_len, config.hidden_size)
    return PromptEncoder(
        config.pre_seq_len,
        config.hidden_size,
        config.prompt_encoder_type,
        config.prompt_encoder_hidden_size or config.hidden_size,
    )


def input_prompt_embeddings(encoder: PromptEmbedding | PromptEncoder, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The virtual-token embeddings for a batch: [b, P, H] in the activation dtype (one encoder run)."""
    return encoder().to(dtype)[None].expand(batch_size, -1, -1)


PrefixKeyValues = tuple[tuple[torch.Tensor, torch.Tensor], ...]


def row_keys(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """One int64 key per row of input_ids [b, s], from its tokens other than `pad_token_id` and their
    order: the same row gets the same key however much padding its batch adds. Returns [b]."""
    real = input_ids != pad_token_id if pad_token_id is not None else torch.ones_like(input_ids, dtype=torch.bool)
    order = real.long().cumsum(-1)  # 1.. over the real tokens
    weight = (order * 0x9E3779B1 + 0x7F4A7C15) % 2_147_483_647  # a fixed pseudo-random weight per position
    return ((input_ids.long() + 1) * weight * real).sum(-1) % 2_147_483_647


class PrefixDropout(nn.Dropout):
    """The original's prefix dropout (p = 0.1, in training only), with masks that do not depend on the
    batch layout.

    While `step` is set (the trainer sets it to the optimizer step before each one), each row's mask
    comes from a generator seeded by (seed, step, the row's key), so a row gets the same mask whether
    it runs in a batch of 4, alone under gradient accumulation or on another rank: those layouts then
    compute the same update. With `step` None, or without keys, it is nn.Dropout."""

    def __init__(self, p: float):
        super().__init__(p)
        self.step: int | None = None
        self.seed = 0

    def forward(self, prefix: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """prefix [b, ...] with keys [b] (see `row_keys`)."""
        if not self.training or self.p == 0 or self.step is None or keys is None:
            return super().forward(prefix)
        masks = []
        for key in keys.tolist():
            generator = torch.Generator(device=prefix.device).manual_seed(hash((self.seed, self.step, key)) % 2**63)
            masks.append(torch.rand(prefix.shape[1:], generator=generator, device=prefix.device) >= self.p)
        return prefix * (torch.stack(masks).to(prefix.dtype) / (1 - self.p))


def prefix_key_values(
    encoder: PrefixEncoder,
    dropout: nn.Module,
    batch_size: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    keys: torch.Tensor | None = None,
) -> PrefixKeyValues:
    """Run the prefix encoder and split its output into per-layer (key, value) pairs.

    The flat index of one prefix position is ((layer*2 + kv)*N + head)*D + d (kv 0 = key, 1 =
    value), as in the original. Returns, per layer, key and value of shape [b, N, P, D], already
    cast to the activation dtype and passed through the prefix dropout (`keys` [b]: see PrefixDropout).
    """
    flat = encoder().to(dtype)  # [P, K]; one encoder run shared by every row
    pre_seq_len = flat.shape[0]
    # [P, K] -> [b, P, 2L, N, D]; dropout draws a fresh mask per row, as the original's does
    expanded = flat.view(1, pre_seq_len, 2 * num_layers, num_kv_heads, head_dim).expand(batch_size, -1, -1, -1, -1)
    kv = dropout(expanded, keys) if isinstance(dropout, PrefixDropout) else dropout(expanded)
    # [2L, b, N, P, D], split by one unbind: its backward stacks the 2L gradients once, where
    # indexing would build a zero-filled [2L, b, N, P, D] gradient for every slice
    slots = kv.permute(2, 0, 3, 1, 4).unbind(0)
    return tuple(zip(slots[0::2], slots[1::2]))
