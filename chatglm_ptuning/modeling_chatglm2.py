"""ChatGLM2-6B and ChatGLM3-6B (one architecture): RMSNorm, half-dim RoPE, multi-query attention, SwiGLU.

Numerically this follows the official `modeling_chatglm.py` of THUDM/chatglm3-6b (fp32 RoPE angles,
`scaled_dot_product_attention`, the official mask rules) while keeping the official state-dict key names,
so official folders load unchanged. Differences from the original are in plumbing only:

- activations are batch-first `[b, s, H]` (the original is sequence-first);
- the KV cache is a transformers `Cache` (`[b, groups, seq, D]`, un-expanded groups);
- the P-tuning v2 prefix is concatenated in front of each layer's keys/values inside attention and is
  never written into the cache, so it survives gradient checkpointing and every generation strategy;
- Prompt Tuning / P-tuning virtual tokens go first, before [gMASK, sop] (see `SoftPromptMixin`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import logging

from .configuration import ChatGLM2Config
from .linear import BlockedLinear
from .modeling_base import ChatGLMLMBase, ChatGLMPreTrainedModel, SoftPromptMixin

logger = logging.get_logger(__name__)

Rotary = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [b, 1, s, rotary_pairs]
LayerPrefix = tuple[torch.Tensor, torch.Tensor]  # (key, value), each [b, groups, P, D]


class RMSNorm(nn.Module):
    """`w * x / sqrt(mean(x^2) + eps)`, the mean taken in fp32 and the result cast back to x's dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        # x (input dtype) times an fp32 factor promotes to fp32, as in the original
        return (self.weight * (hidden_states * torch.rsqrt(variance + self.eps))).to(input_dtype)


def make_norm(config: ChatGLM2Config) -> nn.Module:
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, eps=config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class RotaryEmbedding(nn.Module):
    """RoPE angles for the first half of each head: pair j of a head turns by `(position / scale) * theta_j`,
    `theta_j = base^(-2j / (D/2))`.

    `rope_ratio` stretches RoPE as `config.rope_scaling_mode` says: "interpolate" (chatglm2-6b-32k's
    modeling_chatglm.py: `seq_idx / rope_ratio`, base 10000) or "base" (chatglm3-6b-32k/-128k:
    `base = 10000 * rope_ratio`, positions as they are; also the rule when the mode is None).
    Angles are computed in fp32 as the originals do; cos/sin are then rounded to the activation dtype
    when that is fp16/bf16, as the original's cache is. The `inv_freq` buffer exists only because
    official checkpoints store `transformer.rotary_pos_emb.inv_freq`: it is loaded and saved, and its
    values are never read.
    """

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.rotary_dim = config.kv_channels // 2
        self.set_scaling(config.rope_ratio, config.rope_scaling_mode)
        steps = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32) / self.rotary_dim
        self.register_buffer("inv_freq", 1.0 / (10000**steps))

    def set_scaling(self, rope_ratio: float, mode: str | None) -> None:
        """Apply `rope_ratio` by `mode` ("interpolate" or "base"; None: "base")."""
        interpolate = mode == "interpolate"
        self.base = 10000 if interpolate else 10000 * rope_ratio
        self.position_divisor = rope_ratio if interpolate else 1

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Rotary:
        """position_ids [b, s] -> (cos, sin), each [b, 1, s, rotary_dim/2] (broadcast over heads)."""
        steps = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=position_ids.device) / self.rotary_dim
        theta = 1.0 / (self.base**steps)
        positions = position_ids.to(torch.float32)
        if self.position_divisor != 1:
            positions = positions / self.position_divisor
        angles = positions[..., None] * theta  # [b, s, rotary_dim/2]
        cos, sin = torch.cos(angles), torch.sin(angles)
        if dtype in (torch.float16, torch.bfloat16):
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos[:, None], sin[:, None]


def apply_rotary(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) of the first `2 * pairs` dims; the rest pass through.

    x: [b, heads, s, D]; returns the same shape.
    """
    cos, sin = rotary
    rot_dim = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    pairs = x_rot.unflatten(-1, (-1, 2))  # [b, heads, s, pairs, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1)


def expand_groups(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[b, groups, L, D] -> [b, heads, L, D]; head h reads group h // (heads / groups)."""
    b, groups, length, dim = x.shape
    if groups == num_heads:
        return x
    return x[:, :, None].expand(b, groups, num_heads // groups, length, dim).reshape(b, num_heads, length, dim)


def attend_grouped_single_query(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention of one new token per row without copying keys/values to every head (the decoding step).

    The heads that share a key/value group become that group's query rows: q [b, heads, 1, D] is viewed
    as [b, groups, heads/groups, D] against k, v [b, groups, L, D]; one mask row [b|1, 1, 1, L] (or
    None: attend to everything) serves them all. Returns [b, heads, 1, D].
    """
    b, heads, _, dim = q.shape
    groups = k.shape[1]
    context = F.scaled_dot_product_attention(q.view(b, groups, heads // groups, dim), k, v, attn_mask=attention_mask)
    return context.view(b, heads, 1, dim)


class SelfAttention(nn.Module):
    """Multi-query attention: `query_key_value` yields q (heads*D) | k (groups*D) | v (groups*D).

    Without multi-query attention the official layout interleaves per head: [q_h | k_h | v_h] for each head.
    `attention_dropout` is not applied, as in the original's SDPA path.
    """

    def __init__(self, config: ChatGLM2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_kv_heads
        self.head_dim = config.kv_channels
        self.multi_query_attention = config.multi_query_attention
        qkv_size = (self.num_heads + 2 * self.num_groups) * self.head_dim
        self.query_key_value = BlockedLinear(config.hidden_size, qkv_size, bias=config.add_bias_linear or config.add_qkv_bias)
        self.dense = BlockedLinear(self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: Rotary,
        attention_mask: torch.Tensor | None,
        prefix: LayerPrefix | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        """hidden_states [b, s, H]; attention_mask bool [b|1, 1, s, P+past+s] (True = may attend) or None.

        Returns [b, s, H].
        """
        b, s, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states)
        if self.multi_query_attention:
            q, k, v = qkv.split(
                [self.num_heads * self.head_dim, self.num_groups * self.head_dim, self.num_groups * self.head_dim], -1
            )
            q = q.view(b, s, self.num_heads, self.head_dim)
            k = k.view(b, s, self.num_groups, self.head_dim)
            v = v.view(b, s, self.num_groups, self.head_dim)
        else:
            q, k, v = qkv.view(b, s, self.num_heads, 3 * self.head_dim).split(self.head_dim, -1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads|groups, s, D]
        q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)

        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [b, groups, past+s, D]
        if prefix is not None:
            # read-only: the prefix is never stored in the cache (prefix keys are not rotated)
            k = torch.cat((prefix[0], k), dim=2)
            v = torch.cat((prefix[1], v), dim=2)
        if s == 1 and self.num_groups != self.num_heads:
            context = attend_grouped_single_query(q, k, v, attention_mask)
        else:
            k, v = expand_groups(k, self.num_heads), expand_groups(v, self.num_heads)
            # The original's rule: no mask and a square score matrix means plain causal attention;
            # no mask otherwise (one new token) means attend to everything.
            is_causal = attention_mask is None and q.shape[2] == k.shape[2]
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=is_causal)
        context = context.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.dense(context)


class MLP(nn.Module):
    """SwiGLU: `dense_4h_to_h(silu(a) * g)` where `[a | g] = dense_h_to_4h(x)` (two halves of ffn_hidden_size)."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.dense_h_to_4h = BlockedLinear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = BlockedLinear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(hidden_states).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(GradientCheckpointingLayer):
    """Pre-norm block: `x + Attn(norm1(x))`, then `+ MLP(norm2(.))`. The residual is the normalized value
    instead when `apply_residual_connection_post_layernorm` is set."""

    def __init__(self, config: ChatGLM2Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)
        self.hidden_dropout = config.hidden_dropout
        self.residual_from_norm = config.apply_residual_connection_post_layernorm

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: Rotary,
        attention_mask: torch.Tensor | None = None,
        prefix: LayerPrefix | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        # `cache` is a keyword so gradient checkpointing can drop it; `prefix` must survive, so it is separate.
        normed = self.input_layernorm(hidden_states)
        attention_output = self.self_attention(normed, rotary, attention_mask, prefix, cache)
        residual = normed if self.residual_from_norm else hidden_states
        hidden_states = residual + F.dropout(attention_output, p=self.hidden_dropout, training=self.training)

        normed = self.post_attention_layernorm(hidden_states)
        residual = normed if self.residual_from_norm else hidden_states
        return residual + F.dropout(self.mlp(normed), p=self.hidden_dropout, training=self.training)


class GLMTransformer(nn.Module):
    """The layer stack and final norm (official module name `encoder`)."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = make_norm(config) if config.post_layer_norm else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: Rotary,
        attention_mask: torch.Tensor | None,
        prefix: tuple[LayerPrefix, ...] | None,
        cache: Cache | None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Returns the final hidden states [b, s, H] and, if asked, the input of every layer plus the
        last layer's output (before the final norm), as the original collects them."""
        all_hidden_states = () if output_hidden_states else None
        for index, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(
                hidden_states,
                rotary=rotary,
                attention_mask=attention_mask,
                prefix=None if prefix is None else prefix[index],
                cache=cache,
            )
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states, all_hidden_states


class Embedding(nn.Module):
    """Word embeddings only (official module name `embedding.word_embeddings`); no position table."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


def build_attention_mask(padding_mask: torch.Tensor | None, query_length: int, past_length: int) -> torch.Tensor | None:
    """The original's full mask, as a bool mask where True = may attend, or None where SDPA needs none.

    padding_mask: [b, past+s] (1 = token, 0 = left pad), its past part including the prefix columns.
    past_length: prefix length plus cached tokens. A mask is built only when the padding mask has a zero,
    or when there is a past and more than one new token. Then: causal over the new tokens, every past
    column visible, pad columns blocked; with no past at all, rows of pad tokens see everything (the
    original's guard against all-blocked rows). Returns [b|1, 1, s, past+s].
    """
    has_padding = padding_mask is not None and not bool(padding_mask.all())
    if not has_padding and not (past_length and query_length != 1):
        return None
    device = padding_mask.device if padding_mask is not None else None
    allowed = torch.ones(query_length, past_length + query_length, dtype=torch.bool, device=device)
    allowed = allowed.tril(diagonal=past_length)[None]  # [1, s, past+s]
    if padding_mask is not None:
        keep = padding_mask.bool()
        allowed = allowed & keep[:, None, :]
        if not past_length:
            allowed = allowed | ~keep[:, :, None]
    return allowed[:, None]


class ChatGLM2Model(SoftPromptMixin, ChatGLMPreTrainedModel):
    """The ChatGLM2/3 backbone (`transformer.*` in official checkpoints), output layer included.

    Submodules carry the official names: `embedding.word_embeddings`, `rotary_pos_emb`,
    `encoder.layers.{i}.*`, `encoder.final_layernorm`, `output_layer`, then `prefix_encoder` (or, for
    virtual input tokens, `prompt_encoder`) when `config.pre_seq_len` is set.
    """

    config_class = ChatGLM2Config
    _no_split_modules = ["GLMBlock"]

    def __init__(self, config: ChatGLM2Config):
        super().__init__(config)
        if config.fp32_residual_connection:
            raise ValueError("fp32_residual_connection=True is not supported (no released ChatGLM2/3 model uses it)")
        if config.num_attention_heads % config.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({config.num_attention_heads}) must be a multiple of "
                f"multi_query_group_num ({config.num_kv_heads})"
            )
        self.num_layers = config.num_layers
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryEmbedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = BlockedLinear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.gradient_checkpointing = False
        self._init_prefix(config)  # after the backbone: the official parameter order
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding.word_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """input_ids [b, s] (or inputs_embeds [b, s, H]); position_ids [b, s] (default: cached length + 0..s-1);
        attention_mask [b, past+s] padding mask without prefix columns. Returns hidden states [b, s, H]
        (after the final norm) and the cache when `use_cache`. With virtual input tokens every argument
        and output counts real tokens only (`past` too); the cache holds the virtual tokens first."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if isinstance(cache, (tuple, list)):
            raise TypeError(
                "legacy tuple caches are not supported; pass a transformers Cache (e.g. DynamicCache()) or None"
            )
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        batch_size, seq_length = inputs_embeds.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; setting use_cache=False")
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        cached_length = cache.get_seq_length() if cache is not None else 0
        real_cached = cached_length - self.virtual_tokens_in_cache(cache)
        if position_ids is None:
            position_ids = torch.arange(real_cached, real_cached + seq_length, device=inputs_embeds.device)
            position_ids = position_ids.expand(batch_size, -1)

        prefix = self.get_prefix(batch_size, inputs_embeds.dtype, cache, input_ids)
        past_length = cached_length + (self.pre_seq_len if prefix is not None else 0)
        if attention_mask is not None:
            if attention_mask.shape != (batch_size, real_cached + seq_length):
                raise ValueError(
                    f"attention_mask must have shape {(batch_size, real_cached + seq_length)} "
                    f"(batch, cached + new tokens), found {tuple(attention_mask.shape)}"
                )
            if prefix is not None:
                attention_mask = torch.cat((attention_mask.new_ones(batch_size, self.pre_seq_len), attention_mask), -1)
        inputs_embeds, position_ids, attention_mask, inserted = self.add_virtual_tokens(
            inputs_embeds, position_ids, attention_mask, cache
        )
        full_mask = build_attention_mask(attention_mask, inserted + seq_length, past_length)

        rotary = self.rotary_pos_emb(position_ids, inputs_embeds.dtype)
        hidden_states, all_hidden_states = self.encoder(
            inputs_embeds,
            rotary,
            full_mask,
            prefix,
            cache,
            output_hidden_states=output_hidden_states,
        )
        if inserted:  # outputs cover the real tokens only
            hidden_states = hidden_states[:, inserted:]
            if all_hidden_states is not None:
                all_hidden_states = tuple(h[:, inserted:] for h in all_hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, cache=cache if use_cache else None, hidden_states=all_hidden_states
        )


class ChatGLM2ForConditionalGeneration(ChatGLMLMBase):
    """ChatGLM2-6B / ChatGLM3-6B causal LM: the backbone under `transformer`, logits from `transformer.output_layer`."""

    config_class = ChatGLM2Config
    _no_split_modules = ["GLMBlock"]
    # Checkpoints not written by the official code may lack the (unused) RoPE buffer.
    _keys_to_ignore_on_load_missing = [r"rotary_pos_emb\.inv_freq"]

    def __init__(self, config: ChatGLM2Config):
        super().__init__(config)
        self.transformer = ChatGLM2Model(config)
        self._finish_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.transformer.output_layer

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.transformer.output_layer = value

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        """Positions when generate() gets none: 0..n-1 counted from each row's first real token.

        Unpadded rows get 0..n-1, as in the original. For left-padded rows the original counted the
        pads too, which makes a row's output depend on its batch; here pads get 0 and the tokens
        0..k-1, exactly the position_ids the ChatGLM2/3 tokenizer returns.
        inputs_tensor: input_ids [b, n] or inputs_embeds [b, n, H]. Returns [b, n].
        """
        batch_size, seq_length = inputs_tensor.shape[:2]
        mask = model_kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            return (mask.long().cumsum(-1) - 1).clamp(min=0)
        return torch.arange(seq_length, device=inputs_tensor.device).repeat(batch_size, 1)
