"""Tiny checkpoints in the official on-disk layout, built from the official key tables.

The key names and shapes below are written from the official repositories' weight index files (not from this
package's model classes), so a loader test really checks that official files load.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from chatglm_ptuning.configuration import ChatGLMConfig
from chatglm_ptuning.official_format import write_official_folder
from chatglm_ptuning.tokenizer_files import find_tokenizers_dir as tokenizers_dir  # the real tokenizer files, never copied into the repo

REPO_ROOT = Path(__file__).resolve().parents[1]


# Tiny shapes; vocabularies keep the real sizes so the real tokenizers fit.
TINY_GLM2 = dict(
    num_layers=2, padded_vocab_size=65024, hidden_size=32, ffn_hidden_size=48, kv_channels=8, num_attention_heads=4,
    seq_length=256, hidden_dropout=0.0, attention_dropout=0.0, layernorm_epsilon=1e-5, rmsnorm=True,
    apply_residual_connection_post_layernorm=False, post_layer_norm=True, add_bias_linear=False, add_qkv_bias=True,
    bias_dropout_fusion=True, multi_query_attention=True, multi_query_group_num=2, apply_query_key_layer_scaling=True,
    attention_softmax_in_fp32=True, fp32_residual_connection=False, original_rope=True, use_cache=True,
    tie_word_embeddings=False, eos_token_id=2, pad_token_id=0,
)
TINY_GLM1 = dict(
    num_layers=2, vocab_size=130528, hidden_size=32, inner_hidden_size=64, num_attention_heads=4, layernorm_epsilon=1e-5,
    max_sequence_length=256, position_encoding_2d=True, bos_token_id=130004, eos_token_id=130005, mask_token_id=130000,
    gmask_token_id=130001, pad_token_id=3, use_cache=True,
)


def _glm2_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, d, g, f, v = c["hidden_size"], c["kv_channels"], c["multi_query_group_num"], c["ffn_hidden_size"], c["padded_vocab_size"]
    qkv = c["num_attention_heads"] * d + 2 * g * d
    shapes = {"transformer.embedding.word_embeddings.weight": (v, h), "transformer.rotary_pos_emb.inv_freq": (d // 4,)}
    for i in range(c["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attention.query_key_value.weight": (qkv, h),
            p + "self_attention.query_key_value.bias": (qkv,),
            p + "self_attention.dense.weight": (h, c["num_attention_heads"] * d),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.dense_h_to_4h.weight": (2 * f, h),
            p + "mlp.dense_4h_to_h.weight": (h, f),
        })
    shapes["transformer.encoder.final_layernorm.weight"] = (h,)
    shapes["transformer.output_layer.weight"] = (v, h)
    return shapes


def _glm1_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i_, v = c["hidden_size"], c["inner_hidden_size"], c["vocab_size"]
    head_dim = h // c["num_attention_heads"]
    shapes = {"transformer.word_embeddings.weight": (v, h)}
    for i in range(c["num_layers"]):
        p = f"transformer.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "input_layernorm.bias": (h,),
            p + "attention.query_key_value.weight": (3 * h, h), p + "attention.query_key_value.bias": (3 * h,),
            p + "attention.dense.weight": (h, h), p + "attention.dense.bias": (h,),
            p + "attention.rotary_emb.inv_freq": (head_dim // 4,),
            p + "post_attention_layernorm.weight": (h,), p + "post_attention_layernorm.bias": (h,),
            p + "mlp.dense_h_to_4h.weight": (i_, h), p + "mlp.dense_h_to_4h.bias": (i_,),
            p + "mlp.dense_4h_to_h.weight": (h, i_), p + "mlp.dense_4h_to_h.bias": (h,),
        })
    shapes["transformer.final_layernorm.weight"] = (h,)
    shapes["transformer.final_layernorm.bias"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def _prefix_shapes(config: ChatGLMConfig) -> dict[str, tuple[int, ...]]:
    p, k, h = config.pre_seq_len, config.prefix_kv_size, config.hidden_size
    if not config.prefix_projection:
        return {"transformer.prefix_encoder.embedding.weight": (p, k)}
    e = h if config.architecture == "chatglm" else k
    return {
        "transformer.prefix_encoder.embedding.weight": (p, e),
        "transformer.prefix_encoder.trans.0.weight": (h, e),
        "transformer.prefix_encoder.trans.0.bias": (h,),
        "transformer.prefix_encoder.trans.2.weight": (k, h),
        "transformer.prefix_encoder.trans.2.bias": (k,),
    }


def random_official_state(config: ChatGLMConfig, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Random weights under the official key names and shapes of `config` (prefix keys excluded)."""
    fields = {k: getattr(config, k) for k in (TINY_GLM1 if config.architecture == "chatglm" else TINY_GLM2)}
    shapes = _glm1_shapes(fields) if config.architecture == "chatglm" else _glm2_shapes(fields)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("inv_freq"):
            rotary_dim = 2 * shape[0]
            state[key] = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
        elif "layernorm" in key and key.endswith("weight"):
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[key] = 0.08 * torch.randn(shape, generator=gen)
        state[key] = state[key].to(dtype)
    if config.architecture == "chatglm":
        state["lm_head.weight"] = state["transformer.word_embeddings.weight"].clone()  # the official files hold both
    return state


def random_prefix_state(config: ChatGLMConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: 0.5 * torch.randn(s, generator=gen) for k, s in _prefix_shapes(config).items()}


def tiny_config(architecture: str, **overrides) -> ChatGLMConfig:
    fields = dict(TINY_GLM1 if architecture == "chatglm" else TINY_GLM2)
    fields.update(overrides)
    return ChatGLMConfig(**fields)


def write_tiny_checkpoint(
    folder: Path,
    architecture: str = "chatglm2",
    tokenizer: str | None = None,
    fmt: str = "bin",
    num_shards: int = 2,
    seed: int = 0,
    with_prefix: bool = False,
    **overrides,
) -> Path:
    """An official-layout folder: config.json, shards (+ index) and the real tokenizer files."""
    config = tiny_config(architecture, **overrides)
    state = random_official_state(config, seed)
    if with_prefix:  # the older official full-model P-tuning checkpoints hold the prefix too
        state.update({k: v.half() for k, v in random_prefix_state(config).items()})
    write_official_folder(config, state, folder, fmt=fmt, num_shards=num_shards)
    tokenizer = tokenizer or ("chatglm-6b" if architecture == "chatglm" else "chatglm2-6b")
    for item in (tokenizers_dir() / tokenizer).iterdir():
        shutil.copy(item, folder / item.name)
    return folder
