"""What both ChatGLM architectures share: the PreTrainedModel base, the soft-prompt plumbing
(P-tuning v2 / Prefix-Tuning prefixes computed once per generation; Prompt Tuning / P-tuning
virtual input tokens with their positions and masks), freezing and weight initialisation.

Family files (`modeling_chatglm.py`, `modeling_chatglm2.py`) hold only their architecture.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from .chat import ChatMixin
from .configuration import ChatGLMConfig
from .constants import IGNORE_INDEX
from .head_loss import can_fuse, fused_head_loss, loss_divisor, shifted_labels
from .prompt_learning import (
    INPUT_PROMPT_METHODS,
    KV_PREFIX_METHODS,
    PREFIX_DROPOUT,
    SOFT_PROMPT_KEY_PREFIXES,
    SOFT_PROMPT_METHODS,
    PrefixDropout,
    PrefixEncoder,
    PrefixKeyValues,
    build_input_prompt_encoder,
    input_prompt_embeddings,
    prefix_key_values,
    row_keys,
)

# Attribute under which the computed prefix rides on a generation cache: the prefix is computed
# once per generate() call instead of once per decoding step.
_CACHED_PREFIX_ATTRIBUTE = "_chatglm_prefix_key_values"


class ChatGLMPreTrainedModel(PreTrainedModel):
    """Base of every ChatGLM model class (both families, inner model and LM)."""

    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _keep_in_fp32_modules = ["prefix_encoder", "prompt_encoder"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, "is_prompt_encoder_layer", False):
            # PyTorch's defaults, as the original (transformers guards the init functions here,
            # so tensors already loaded from a checkpoint are left alone).
            module.reset_parameters()
            return
        super()._init_weights(module)


class SoftPromptMixin:
    """Adds the soft prompt of `config.prompt_method` to an inner ChatGLM model (the module named
    `transformer`): a layer-level prefix (`prefix_encoder`) or virtual input tokens (`prompt_encoder`).

    The host must set `self.num_layers` before calling `_init_prefix` and call it after every
    backbone module is built (the official parameter order: backbone, then prefix encoder).

    Virtual input tokens come first in the sequence, before any left padding: in ChatGLM-6B that
    puts them inside the bidirectional context (before [gMASK]), in ChatGLM2/3 before [gMASK, sop],
    where Prompt Tuning puts its prompt in front of any input. They take the positions 0..P-1, and
    every real token's position moves up by P (ChatGLM-6B: the first row of its 2D positions; its
    block positions count from <sop> and do not move). Callers keep real-token coordinates
    throughout (position_ids, attention_mask, labels and outputs never contain the virtual tokens):
    the model inserts them on a forward that starts a sequence, and on a forward that continues a
    cache (which then holds them first) it shifts the given positions and opens the P cached columns.
    The family supplies the hook: `shift_positions` / `virtual_position_ids` (1D by default here).
    """

    pre_seq_len: int | None

    def _init_prefix(self, config: ChatGLMConfig) -> None:
        self.pre_seq_len = config.pre_seq_len
        self.prompt_method = config.prompt_method
        self.prefix_num_kv_heads = config.num_kv_heads
        self.prefix_head_dim = config.head_dim
        if not config.pre_seq_len:
            return
        if config.prompt_method not in SOFT_PROMPT_METHODS:
            raise ValueError(f"prompt_method must be one of {SOFT_PROMPT_METHODS}, found {config.prompt_method!r}")
        if config.prompt_method in KV_PREFIX_METHODS:
            self.prefix_encoder = PrefixEncoder.from_config(config)
            self.dropout = PrefixDropout(PREFIX_DROPOUT)
        else:
            self.prompt_encoder = build_input_prompt_encoder(config)

    @property
    def has_input_prompt(self) -> bool:
        """Whether virtual tokens are inserted at the input (Prompt Tuning, P-tuning)."""
        return bool(self.pre_seq_len) and self.prompt_method in INPUT_PROMPT_METHODS

    def virtual_tokens_in_cache(self, cache: Cache | None) -> int:
        """P when `cache` continues a sequence this model started (its first P entries are the
        virtual tokens), else 0."""
        if not self.has_input_prompt or cache is None or cache.get_seq_length() == 0:
            return 0
        return self.pre_seq_len

    def shift_positions(self, position_ids: torch.Tensor, offset: int) -> torch.Tensor:
        """Real-token positions [b, s] moved up past `offset` virtual tokens."""
        return position_ids + offset

    def virtual_position_ids(self, batch_size: int, count: int, like: torch.Tensor) -> torch.Tensor:
        """Positions of `count` virtual tokens at the start: [b, count] = 0..count-1."""
        return torch.arange(count, dtype=like.dtype, device=like.device).expand(batch_size, count)

    def add_virtual_tokens(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        padding_mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """Put the virtual tokens in front of a forward's inputs (see the class docstring).

        inputs_embeds [b, s, H], position_ids (real tokens, [b, s] or the family's shape),
        padding_mask [b, cached real + s] (1 = token) or None. Returns the embeddings [b, n + s, H],
        positions, padding mask (P ones in front) and n: P when the tokens were inserted here, 0 on
        a forward that continues a cache, or without an input-level prompt (inputs unchanged).
        """
        if not self.has_input_prompt:
            return inputs_embeds, position_ids, padding_mask, 0
        count = self.pre_seq_len
        batch_size = inputs_embeds.shape[0]
        position_ids = self.shift_positions(position_ids, count)
        if padding_mask is not None:
            padding_mask = torch.cat((padding_mask.new_ones(batch_size, count), padding_mask), dim=-1)
        if self.virtual_tokens_in_cache(cache):
            return inputs_embeds, position_ids, padding_mask, 0
        prompt = input_prompt_embeddings(self.prompt_encoder, batch_size, inputs_embeds.dtype)
        inputs_embeds = torch.cat((prompt.to(inputs_embeds.device), inputs_embeds), dim=1)
        position_ids = torch.cat((self.virtual_position_ids(batch_size, count, position_ids), position_ids), dim=-1)
        return inputs_embeds, position_ids, padding_mask, count

    def get_prefix(
        self, batch_size: int, dtype: torch.dtype, cache: Cache | None = None, input_ids: torch.Tensor | None = None
    ) -> PrefixKeyValues | None:
        """Per-layer prefix keys/values [b, N, P, D], or None without a prefix. `input_ids` [b, s] key each
        row's dropout mask in training (see PrefixDropout).

        Under generation (a cache and no autograd) the result is stored on the cache, so every
        decoding step after the first reuses it.
        """
        if not self.pre_seq_len or self.prompt_method not in KV_PREFIX_METHODS:
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
            keys=row_keys(input_ids, self.config.pad_token_id) if self.training and input_ids is not None else None,
        )
        if reusable:
            setattr(cache, _CACHED_PREFIX_ATTRIBUTE, prefix)
        return prefix


def lm_head_output(
    head: nn.Module,
    hidden_states: torch.Tensor,
    labels: torch.Tensor | None,
    logits_to_keep: int = 0,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Logits [b, s, V] from hidden states [b, s, H] (the last `logits_to_keep` positions when > 0)
    and, with labels [b, s], the original's loss: fp32 logits, position t predicts label t+1,
    ignore_index -100, cast back to the activation dtype. The summed loss is divided by
    `num_items_in_batch` when given (transformers' convention: the label tokens of the whole optimizer
    step, so gradient accumulation and data parallelism change nothing but speed), else by this
    batch's label count (the original's mean).

    Training through a frozen head (every soft-prompt method) returns no logits: the loss comes
    from `fused_head_loss`, which computes the head at the labelled positions only."""
    if logits_to_keep:
        hidden_states = hidden_states[:, -logits_to_keep:]
    if labels is None:
        return head(hidden_states), None
    targets = shifted_labels(labels).to(hidden_states.device)  # shift the labels, never the [b, s, V] logits
    divisor = loss_divisor(targets, num_items_in_batch)
    if can_fuse(head, hidden_states, targets):
        return None, fused_head_loss(head, hidden_states, targets, divisor)
    logits = head(hidden_states)
    summed = F.cross_entropy(
        logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return logits, (summed / divisor).to(hidden_states.dtype)


def freeze_all_but_soft_prompt(model: nn.Module) -> None:
    """With a soft prompt, train only its encoder (`transformer.prefix_encoder.*` or
    `transformer.prompt_encoder.*`); the original freezes the rest."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(SOFT_PROMPT_KEY_PREFIXES))


class ChatGLMLMBase(ChatMixin, ChatGLMPreTrainedModel, GenerationMixin):
    """Base of the two causal-LM classes: the causal-LM forward, chat helpers, generation and prefix
    freezing. A family class sets `self.transformer` (its inner model) and an output layer reachable
    through `get_output_embeddings()`."""

    # forward() divides the summed loss by `num_items_in_batch`, so the Trainer passes the label-token
    # count of the whole optimizer step and does not divide again by the accumulation steps.
    accepts_loss_kwargs = True

    @deprecate_kwarg("past_key_values", version="6.0.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """input_ids [b, s] (or inputs_embeds [b, s, H]) -> logits [b, s, V] (the last `logits_to_keep`
        positions when > 0), the cache when `use_cache`, every layer's input plus the last layer's output
        when `output_hidden_states`.

        labels [b, s]: the original's loss (fp32 logits, position t predicts label t+1, ignore_index -100)
        summed and divided by `num_items_in_batch` when given (the Trainer's count of label tokens in the
        optimizer step), else by this batch's label count. A training forward through a frozen head
        returns the loss without logits (see `lm_head_output`). `past_key_values=` is the old name of
        `cache`; other keyword arguments are ignored, as transformers' models do."""
        if output_attentions:
            raise ValueError("output_attentions is not supported: attention runs in scaled_dot_product_attention")
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(
                f"cache must be a transformers Cache (e.g. DynamicCache), found {type(cache).__name__}; "
                "legacy tuples of per-layer (key, value) are not supported"
            )
        outputs = self.transformer(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        logits, loss = lm_head_output(
            self.get_output_embeddings(), outputs.last_hidden_state, labels, logits_to_keep, num_items_in_batch
        )
        output = CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    def _finish_init(self) -> None:
        """Call at the end of the family's __init__."""
        self.post_init()
        if self.config.quantization_bit:
            # Official pre-quantized folders say so in config.json: build the packed holders
            # their state dict loads into (as the original model quantizes itself in __init__).
            from .quantization import quantize

            quantize(self, self.config.quantization_bit, empty_init=True)
        if self.config.pre_seq_len:
            freeze_all_but_soft_prompt(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' from_pretrained, plus: `quantization_bit` on a dense folder loads it dense
        and quantizes it (`quantize`); a ChatGLM2/3 folder gets its RoPE rule (`load_model`'s);
        the prefix is frozen again (loading replaces every Parameter with a new, trainable one)."""
        from .loading import apply_folder_rope_rule, dense_folder_quantization_bit

        bits = dense_folder_quantization_bit(pretrained_model_name_or_path, kwargs)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a tuple
        apply_folder_rope_rule(model, pretrained_model_name_or_path)
        if bits:
            model.quantize(bits)
        if model.config.pre_seq_len:
            freeze_all_but_soft_prompt(model)
        return loaded

    def quantize(self, bits: int, empty_init: bool = False, device: torch.device | str | None = None):
        """The official `model.quantize(bits)`: INT4/INT8 weight-only quantization in place, in the
        official packed format; returns the model (`quantization.quantize_model`)."""
        from .quantization import quantize_model

        return quantize_model(self, bits, empty_init=empty_init, device=device)

    def prefix_state_dict(self) -> dict[str, torch.Tensor]:
        """The soft-prompt encoder's tensors under their full names (official ones for the prefix
        encoder); empty without a soft prompt."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(SOFT_PROMPT_KEY_PREFIXES)}
