"""What both ChatGLM architectures share: the PreTrainedModel base, the P-tuning v2 prefix
plumbing (build, freeze, compute once per generation) and weight initialisation.

Family files (`modeling_chatglm.py`, `modeling_chatglm2.py`) hold only their architecture.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache

from .chat import ChatMixin
from .configuration import ChatGLMConfig
from .prompt_learning import PREFIX_DROPOUT, PREFIX_KEY_PREFIX, PrefixEncoder, PrefixKeyValues, prefix_key_values

# Attribute under which the computed prefix rides on a generation cache: the prefix is computed
# once per generate() call instead of once per decoding step.
_CACHED_PREFIX_ATTRIBUTE = "_chatglm_prefix_key_values"


class ChatGLMPreTrainedModel(PreTrainedModel):
    """Base of every ChatGLM model class (both families, inner model and LM)."""

    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _keep_in_fp32_modules = ["prefix_encoder"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, "is_prompt_encoder_layer", False):
            # PyTorch's defaults, as the original (transformers guards the init functions here,
            # so tensors already loaded from a checkpoint are left alone).
            module.reset_parameters()
            return
        super()._init_weights(module)


class PrefixTuningMixin:
    """Adds the P-tuning v2 prefix to an inner ChatGLM model (the module named `transformer`).

    The host must set `self.num_layers` before calling `_init_prefix` and call it after every
    backbone module is built (the official parameter order: backbone, then prefix encoder).
    """

    pre_seq_len: int | None

    def _init_prefix(self, config: ChatGLMConfig) -> None:
        self.pre_seq_len = config.pre_seq_len
        self.prefix_num_kv_heads = config.num_kv_heads
        self.prefix_head_dim = config.head_dim
        if config.pre_seq_len:
            self.prefix_encoder = PrefixEncoder.from_config(config)
            self.dropout = nn.Dropout(PREFIX_DROPOUT)

    def get_prefix(self, batch_size: int, dtype: torch.dtype, cache: Cache | None = None) -> PrefixKeyValues | None:
        """Per-layer prefix keys/values [b, N, P, D], or None without a prefix.

        Under generation (a cache and no autograd) the result is stored on the cache, so every
        decoding step after the first reuses it.
        """
        if not self.pre_seq_len:
            return None
        reusable = cache is not None and not torch.is_grad_enabled() and not self.training
        if reusable:
            stored = getattr(cache, _CACHED_PREFIX_ATTRIBUTE, None)
            if stored is not None and stored[0][0].shape[0] == batch_size and stored[0][0].dtype == dtype:
                return stored
        prefix = prefix_key_values(
            self.prefix_encoder,
            self.dropout,
            batch_size,
            self.num_layers,
            self.prefix_num_kv_heads,
            self.prefix_head_dim,
            dtype,
        )
        if reusable:
            setattr(cache, _CACHED_PREFIX_ATTRIBUTE, prefix)
        return prefix


def freeze_backbone_for_prefix(model: nn.Module) -> None:
    """With a prefix, train only `transformer.prefix_encoder.*` (the original freezes the rest)."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(PREFIX_KEY_PREFIX))


class ChatGLMLMBase(ChatMixin, ChatGLMPreTrainedModel, GenerationMixin):
    """Base of the two causal-LM classes: chat helpers, generation and prefix freezing."""

    def _finish_init(self) -> None:
        """Call at the end of the family's __init__."""
        self.post_init()
        if self.config.pre_seq_len:
            freeze_backbone_for_prefix(self)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' from_pretrained, then the prefix freeze again: loading replaces every
        Parameter with a new, trainable one."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a tuple
        if model.config.pre_seq_len:
            freeze_backbone_for_prefix(model)
        return loaded

    def prefix_state_dict(self) -> dict[str, torch.Tensor]:
        """The prefix encoder's tensors under their official names (empty without a prefix)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(PREFIX_KEY_PREFIX)}
