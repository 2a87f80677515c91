"""ChatGLM-6B (first generation): GLM blocks with 2D rotary positions.

Module names and numerics follow the official `modeling_chatglm.py` of THUDM/chatglm-6b, so the
official checkpoints load unchanged and fp32 logits agree with the original code. Tensors are
batch-first here ([b, s, H]; attention [b, N, s, D]); the original is sequence-first.

Deliberate differences from the original, each for a reason:
- Left-padded batches: given a 2D padding mask (what `generate` builds), positions restart at each
  row's first real token and pad columns are blocked, so a row generates the same tokens alone or
  in a batch. The original derives positions from the padded row and lets tokens attend to pads.
- The KV cache is a transformers `Cache` ([b, N, seq, D], keys stored after rotation). The P-tuning
  prefix is concatenated inside attention instead of riding in the cache, so it survives gradient
  checkpointing (transformers drops caches there).
- bf16: rotary tables are computed in fp32 and cast. The original computes them in the dtype of its
  inv_freq buffer, which in bf16 rounds every position above 256.
- Prompt Tuning / P-tuning virtual tokens (not in the original) go first, inside the bidirectional
  context before [gMASK]: position row 0 gives them 0..P-1 and moves every real token up by P, block
  positions (row 1) are 0 for them and unchanged for the rest (see `SoftPromptMixin`).
- position_encoding_2d=False: positions follow the original's evident intent (tokens from <sop> on
  take the [MASK] position, only when [MASK] rather than [gMASK] is used); its code indexes the
  batch dimension there by mistake.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast

from .configuration import ChatGLM6BConfig
from .glm_positions import glm_attention_mask, glm_position_ids, next_position_ids, padding_mask_from_block_mask
from .linear import BlockedLinear
from .modeling_base import ChatGLMLMBase, ChatGLMPreTrainedModel, SoftPromptMixin

VIRTUAL_TOKEN_ID = -1  # stands for a virtual input token where the mask is derived from ids; never embedded
MASK_FILL = -10000.0  # the original fills blocked scores with this (not -inf) before the layer coefficient
# Residual scale sqrt(2L) with L = 28: the original never passes num_layers to its blocks, whose default
# is 28, so every config (tiny test ones included) uses sqrt(56).
RESIDUAL_ALPHA = (2 * 28) ** 0.5


# --------------------------------------------------------------------------------------------------
# Rotary embedding


def glm_inv_freq(dim: int) -> torch.Tensor:
    """Inverse frequencies 10000^(-2j/dim), j < dim/2, rounded to fp16 as the original stores them (fp32 tensor)."""
    return (1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))).half().float()


class RotaryEmbedding(nn.Module):
    """cos/sin of position * inv_freq for rotate-half rotary of width `dim`.

    `inv_freq` is a non-persistent buffer: the checkpoint's copy is ignored, as the original ignores it.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("inv_freq", glm_inv_freq(dim), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [b, s] -> (cos, sin), each [b, 1, s, dim] in `dtype`.

        fp16 computes in fp16 like the original's half-precision tables; every other dtype computes in
        fp32 (identical to the original in fp32).
        """
        compute = torch.float16 if dtype == torch.float16 else torch.float32
        freqs = position_ids.to(compute)[..., None] * self.inv_freq.to(compute)  # [b, s, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [b, 1, s, dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _apply(self, fn, recurse: bool = True):
        # Model casts (`.half()`, `.to(torch.bfloat16)`) must not round the frequencies again (bf16
        # would): keep the fp16-exact values in fp32 and follow only device moves.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            self.inv_freq = glm_inv_freq(self.dim).to(self.inv_freq.device)
        return self


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------------------
# Attention, MLP, block


class SelfAttention(nn.Module):
    """GLM attention: per-head interleaved qkv, 2D rotary, layer-scaled fp32 softmax."""

    def __init__(self, config: ChatGLM6BConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.hidden_size = config.hidden_size
        self.position_encoding_2d = config.position_encoding_2d
        # 2D: each half of a head is rotated by one position row
        self.rotary_emb = RotaryEmbedding(self.head_dim // 2 if self.position_encoding_2d else self.head_dim)
        self.query_key_value = BlockedLinear(config.hidden_size, 3 * config.hidden_size)
        self.dense = BlockedLinear(config.hidden_size, config.hidden_size)

    def _rotary_tables(self, position_ids: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) per position row: two for [b, 2, s] (2D), one for [b, s]."""
        rows = (position_ids[:, 0], position_ids[:, 1]) if self.position_encoding_2d else (position_ids,)
        return [self.rotary_emb(row, dtype) for row in rows]

    @staticmethod
    def _rotate(x: torch.Tensor, tables: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """x [b, N, s, D]: its i-th slice of D/len(tables) dims is rotated by the i-th position row."""
        parts = x.chunk(len(tables), dim=-1)
        return torch.cat([apply_rotary(part, cos, sin) for part, (cos, sin) in zip(parts, tables)], dim=-1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix_key: torch.Tensor | None = None,
        prefix_value: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """hidden_states [b, s, H]; attention_mask bool [b, 1, s, P + past + s] (True = blocked);
        prefix_key/value [b, N, P, D] (read-only, never rotated, never cached). Returns [b, s, H]."""
        batch, seq, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states).view(batch, seq, self.num_heads, 3 * self.head_dim)
        query, key, value = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))  # [b, N, s, D]
        tables = self._rotary_tables(position_ids, query.dtype)
        query, key = self._rotate(query, tables), self._rotate(key, tables)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if prefix_key is not None:
            key = torch.cat((prefix_key, key), dim=2)
            value = torch.cat((prefix_value, value), dim=2)

        # The original's order: shrink q by the layer coefficient in the activation dtype (keeps fp16
        # in range), fill blocked scores, then undo the coefficient in fp32 for the softmax.
        coeff = float(self.layer_idx + 1)
        scores = torch.matmul(query / (math.sqrt(self.head_dim) * coeff), key.transpose(-1, -2))  # [b, N, s, k]
        scores = scores.masked_fill(attention_mask, MASK_FILL)
        probs = torch.softmax(scores.float() * coeff, dim=-1).to(value.dtype)
        context = torch.matmul(probs, value)  # [b, N, s, D]
        return self.dense(context.transpose(1, 2).reshape(batch, seq, self.hidden_size))


class MLP(nn.Module):
    """dense_h_to_4h -> tanh-approximated GELU -> dense_4h_to_h."""

    def __init__(self, config: ChatGLM6BConfig):
        super().__init__()
        self.dense_h_to_4h = BlockedLinear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = BlockedLinear(config.inner_hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The original's tanh GELU. torch's kernel computes fp16 in fp32 internally, as the original's
        # jit-fused kernel does on GPU (unfused, as on CPU, the original rounds every step to fp16).
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden_states), approximate="tanh"))


class GLMBlock(GradientCheckpointingLayer):
    """x -> a = LN1(x); x = alpha*a + Attn(a); m = LN2(x); x = alpha*m + MLP(m), alpha = RESIDUAL_ALPHA.

    The residual is the *normalized* input scaled by alpha (GLM's DeepNorm-style residual).
    """

    def __init__(self, config: ChatGLM6BConfig, layer_idx: int):
        super().__init__()
        self.alpha = RESIDUAL_ALPHA
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix_key: torch.Tensor | None = None,
        prefix_value: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """The prefix comes as positional tensors so reentrant checkpointing also sends gradients to it."""
        attention_input = self.input_layernorm(hidden_states)
        attention_output = self.attention(
            attention_input, position_ids, attention_mask, prefix_key, prefix_value, cache=cache
        )
        hidden_states = attention_input * self.alpha + attention_output
        mlp_input = self.post_attention_layernorm(hidden_states)
        return mlp_input * self.alpha + self.mlp(mlp_input)


# --------------------------------------------------------------------------------------------------
# Models


class ChatGLM6BPreTrainedModel(ChatGLMPreTrainedModel):
    """ChatGLM-6B weight handling shared by the inner model and the LM."""

    config_class = ChatGLM6BConfig
    _no_split_modules = ["GLMBlock"]
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq$"]  # stored by official files, recomputed here

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, RotaryEmbedding):  # non-persistent: refilled after meta-device loading
            init.copy_(module.inv_freq, glm_inv_freq(module.dim))


class ChatGLMModel(SoftPromptMixin, ChatGLM6BPreTrainedModel):
    """The ChatGLM-6B transformer: embeddings, GLM blocks, final LayerNorm (official key names)."""

    _input_embed_layer = "word_embeddings"

    def __init__(self, config: ChatGLM6BConfig):
        super().__init__(config)
        self.num_layers = config.num_layers
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.gradient_checkpointing = False
        self._init_prefix(config)
        self.post_init()

    def _positions_and_mask(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_length: int,
        batch: int,
        seq: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Resolve the caller's mask/positions (or derive them from input_ids) for s new tokens.

        attention_mask: None, a 2D keep-mask [b, past + s] (1 real, 0 pad) or the original's 4D
        block mask [b, 1, s, past + s] (True or nonzero = blocked). Returns (positions [b, 2, s] or
        [b, s], bool block mask [b, 1, s, past + s]).
        """
        padding_mask = block_mask = None
        if attention_mask is not None:
            if attention_mask.dim() == 4:
                block_mask = attention_mask.bool()
                if block_mask.shape[-1] != past_length + seq:
                    raise ValueError(
                        f"4D attention_mask must have {past_length + seq} key columns (cached + new tokens), "
                        f"found {block_mask.shape[-1]}"
                    )
            elif attention_mask.dim() == 2:
                padding_mask = attention_mask
            else:
                raise ValueError(
                    "attention_mask must be 2D [batch, keys] (1 = token, 0 = pad) or 4D [batch, 1, queries, keys] "
                    f"(True = blocked), found shape {tuple(attention_mask.shape)}"
                )
        if (position_ids is None or block_mask is None) and input_ids is None:
            raise ValueError(
                "without input_ids the GLM positions and mask cannot be derived: "
                "pass position_ids and a 4D attention_mask"
            )
        if position_ids is None:
            if past_length:
                raise ValueError(
                    "position_ids are required when continuing from a cache (extend them with next_position_ids)"
                )
            position_ids = glm_position_ids(
                input_ids, self.config, None if padding_mask is None else padding_mask[:, -seq:]
            )
        expected = (batch, 2, seq) if self.config.position_encoding_2d else (batch, seq)
        if tuple(position_ids.shape) != expected:
            raise ValueError(
                f"position_ids must have shape {expected} (batch, [2,] new tokens), found {tuple(position_ids.shape)}"
            )
        if block_mask is None:
            block_mask = glm_attention_mask(input_ids, self.config.bos_token_id, padding_mask, past_length)
        return position_ids, block_mask

    def shift_positions(self, position_ids: torch.Tensor, offset: int) -> torch.Tensor:
        """Move real tokens past `offset` leading virtual tokens: 2D [b, 2, s] shifts row 0 only
        (block positions count from <sop>); 1D [b, s] shifts all."""
        if position_ids.dim() == 3:
            return torch.cat((position_ids[:, :1] + offset, position_ids[:, 1:]), dim=1)
        return position_ids + offset

    def virtual_position_ids(self, batch_size: int, count: int, like: torch.Tensor) -> torch.Tensor:
        """Virtual tokens are context tokens: positions 0..count-1, block position 0 ([b, 2, count] or [b, count])."""
        steps = super().virtual_position_ids(batch_size, count, like)
        return torch.stack((steps, torch.zeros_like(steps)), dim=1) if like.dim() == 3 else steps

    def _insert_virtual_tokens(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
        cache: Cache | None,
        past_length: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
        """Make positions explicit for the real tokens, then add the virtual tokens in front.

        A 4D tokenizer mask is read as its padding mask (the block structure is derived from the ids
        again, with the virtual tokens in the context). Returns (ids with VIRTUAL_TOKEN_ID in front,
        positions, padding mask [b, past + n + s] or None, embeddings [b, n + s, H], n inserted).
        """
        if input_ids is None:
            raise ValueError(
                "with virtual input tokens (prompt_tuning, ptuning) ChatGLM-6B needs input_ids to place its "
                "2D positions and block mask"
            )
        seq = input_ids.shape[-1]
        padding_mask = attention_mask
        if attention_mask is not None and attention_mask.dim() == 4:
            padding_mask = padding_mask_from_block_mask(attention_mask)
        if position_ids is None:
            if past_length:
                raise ValueError("position_ids are required when continuing from a cache (extend them with next_position_ids)")
            position_ids = glm_position_ids(input_ids, self.config, None if padding_mask is None else padding_mask[:, -seq:])
        inputs_embeds, position_ids, padding_mask, inserted = self.add_virtual_tokens(
            inputs_embeds, position_ids, padding_mask, cache
        )
        if inserted:
            input_ids = torch.cat((input_ids.new_full((input_ids.shape[0], inserted), VIRTUAL_TOKEN_ID), input_ids), dim=1)
        return input_ids, position_ids, padding_mask, inputs_embeds, inserted

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """input_ids [b, s] -> last_hidden_state [b, s, H] (and the cache when use_cache; with
        `output_hidden_states`, every layer's input and the final-norm output, as the original collects them).

        With virtual input tokens every argument and output counts real tokens only; the cache holds
        the virtual tokens first."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False  # the blocks drop caches under checkpointing anyway
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_length = cache.get_seq_length() if cache is not None else 0
        inserted = 0
        if self.has_input_prompt:
            input_ids, position_ids, attention_mask, inputs_embeds, inserted = self._insert_virtual_tokens(
                input_ids, position_ids, attention_mask, inputs_embeds, cache, past_length
            )
        position_ids, block_mask = self._positions_and_mask(
            input_ids, position_ids, attention_mask, past_length, batch, inserted + seq
        )
        prefix = self.get_prefix(batch, inputs_embeds.dtype, cache, input_ids)
        if prefix is not None:
            block_mask = F.pad(block_mask, (self.pre_seq_len, 0), value=False)  # prefix columns always open

        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        all_hidden_states = () if output_hidden_states else None
        hidden_states = inputs_embeds
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states[:, inserted:],)  # outputs cover the real tokens only
            prefix_key, prefix_value = (None, None) if prefix is None else prefix[i]
            hidden_states = layer(hidden_states, position_ids, block_mask, prefix_key, prefix_value, cache=cache)
        hidden_states = self.final_layernorm(hidden_states)[:, inserted:]
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, cache=cache if use_cache else None, hidden_states=all_hidden_states
        )


class ChatGLMForConditionalGeneration(ChatGLMLMBase, ChatGLM6BPreTrainedModel):
    """ChatGLM-6B language model: `transformer` + `lm_head` tied to the word embeddings.

    The official loader ties lm_head to `transformer.word_embeddings` after loading, so the stored
    `lm_head.weight` is discarded; this class does the same (and lists the shared weight once).
    """

    config_class = ChatGLM6BConfig
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: ChatGLM6BConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.lm_head = BlockedLinear(config.hidden_size, config.vocab_size, bias=False)
        self._finish_init()

    def tie_weights(self, missing_keys: set[str] | None = None, recompute_mapping: bool = True) -> None:
        # While loading, count the stored lm_head.weight as absent: the official loader overwrites it by
        # tying, whereas transformers would keep both (untied, with a warning) when the stored tensors differ.
        if missing_keys is not None and "lm_head.weight" in self.all_tied_weights_keys:
            missing_keys.add("lm_head.weight")
        super().tie_weights(missing_keys=missing_keys, recompute_mapping=recompute_mapping)

    # ---- generation: GLM positions in place of transformers' 1D ones ------------------------------

    def generate(self, *args: Any, **kwargs: Any):
        """transformers' generate; a 4D tokenizer mask is reduced to its padding mask (the block
        structure is derived again from the ids, exactly as the tokenizer built it)."""
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 4:
            kwargs["attention_mask"] = padding_mask_from_block_mask(mask)
        return super().generate(*args, **kwargs)

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        input_ids = model_kwargs.get("input_ids", inputs_tensor)
        if input_ids is None or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(
                "ChatGLM-6B generation needs input_ids (or explicit position_ids) to place its 2D positions"
            )
        mask = model_kwargs.get("attention_mask")
        return glm_position_ids(input_ids, self.config, mask if mask is not None and mask.dim() == 2 else None)

    def _update_model_kwargs_for_generation(
        self,
        outputs: Any,
        model_kwargs: dict[str, Any],
        is_encoder_decoder: bool = False,
        num_new_tokens: int = 1,
    ) -> dict[str, Any]:
        position_ids = model_kwargs.pop("position_ids", None)  # the base class would add +1 to both rows
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        if position_ids is not None:
            model_kwargs["position_ids"] = next_position_ids(position_ids, num_new_tokens)
        return model_kwargs

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs: Any,
    ) -> tuple[torch.LongTensor, dict[str, Any]]:
        # The base class expands 3D positions along dim 1 (multimodal [3, b, s]); ours are [b, 2, s].
        position_ids = model_kwargs.pop("position_ids", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if position_ids is not None:
            model_kwargs["position_ids"] = position_ids.repeat_interleave(expand_size, dim=0)
        return input_ids, model_kwargs
