"""Writing model folders in the official ChatGLM on-disk layout.

The official Hugging Face repos hold a hand-written config.json (its own key set, `auto_map`,
`architectures: ["ChatGLMModel"]`, `torch_dtype`) and `pytorch_model-0000k-of-0000n.bin` shards
with a `pytorch_model.bin.index.json`. Tests build tiny folders in this layout, and full
fine-tuning exports to it, so other ChatGLM tools can read what this toolkit writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .configuration import ARCH_GLM1, ChatGLMConfig

# The keys each official config.json holds (THUDM/chatglm-6b, chatglm2-6b, chatglm3-6b), in their order.
_OFFICIAL_KEYS = {
    ARCH_GLM1: (
        "bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id", "hidden_size",
        "inner_hidden_size", "layernorm_epsilon", "max_sequence_length", "model_type", "num_attention_heads",
        "num_layers", "position_encoding_2d", "use_cache", "vocab_size",
    ),
    "chatglm2": (
        "model_type", "add_bias_linear", "add_qkv_bias", "apply_query_key_layer_scaling",
        "apply_residual_connection_post_layernorm", "attention_dropout", "attention_softmax_in_fp32",
        "bias_dropout_fusion", "ffn_hidden_size", "fp32_residual_connection", "hidden_dropout", "hidden_size",
        "kv_channels", "layernorm_epsilon", "multi_query_attention", "multi_query_group_num", "num_attention_heads",
        "num_layers", "original_rope", "padded_vocab_size", "post_layer_norm", "rmsnorm", "seq_length", "use_cache",
        "tie_word_embeddings", "eos_token_id", "pad_token_id",
    ),
}
_AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
}

WEIGHT_FORMATS = ("bin", "safetensors")


def official_config_dict(config: ChatGLMConfig, name_or_path: str = "", torch_dtype: str = "float16") -> dict[str, Any]:
    """The config.json an official repo would hold for `config` (remote-code `auto_map` included)."""
    out: dict[str, Any] = {"_name_or_path": name_or_path, "architectures": ["ChatGLMModel"], "auto_map": dict(_AUTO_MAP)}
    for key in _OFFICIAL_KEYS[config.architecture]:
        out[key] = getattr(config, key)
    if config.architecture != ARCH_GLM1 and config.rope_ratio != 1:  # the long-context repos (-32k, -128k)
        out["rope_ratio"] = config.rope_ratio
    if getattr(config, "rope_scaling_mode", None):  # ours: keeps the RoPE rule when the folder is renamed
        out["rope_scaling_mode"] = config.rope_scaling_mode
    if config.quantization_bit:
        out["quantization_bit"] = config.quantization_bit
    if config.pre_seq_len:
        out["pre_seq_len"] = config.pre_seq_len
        out["prefix_projection"] = config.prefix_projection
    out["torch_dtype"] = torch_dtype
    out["transformers_version"] = "4.30.2"
    return out


def _shard_name(fmt: str, index: int, count: int) -> str:
    if fmt == "bin":
        return "pytorch_model.bin" if count == 1 else f"pytorch_model-{index:05d}-of-{count:05d}.bin"
    return "model.safetensors" if count == 1 else f"model-{index:05d}-of-{count:05d}.safetensors"


def _atomic_write(path: Path, write) -> None:  # noqa: ANN001 - a callable taking a temp path
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_state_dict(state: dict[str, torch.Tensor], folder: str | os.PathLike, fmt: str = "bin", num_shards: int = 1) -> list[str]:
    """Write `state` as one file or `num_shards` shards plus the official index json.

    Keys keep their order and are split into contiguous runs, as the official shards are.
    Every file is written to a temporary name first and renamed, so a killed write never
    leaves a complete-looking file. Returns the file names written.
    """
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weight format must be one of {WEIGHT_FORMATS}, found {fmt!r}")
    if num_shards < 1 or num_shards > max(1, len(state)):
        raise ValueError(f"num_shards must be between 1 and {len(state)}, found {num_shards}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    per_shard = -(-len(keys) // num_shards)
    weight_map: dict[str, str] = {}
    names = []
    for index in range(num_shards):
        shard_keys = keys[index * per_shard : (index + 1) * per_shard]
        # Contiguous copies: tied or viewed tensors must not drag shared storage into every shard.
        shard = {k: state[k].detach().contiguous().clone() for k in shard_keys}
        name = _shard_name(fmt, index + 1, num_shards)
        if fmt == "bin":
            _atomic_write(folder / name, lambda p, s=shard: torch.save(s, p))
        else:
            _atomic_write(folder / name, lambda p, s=shard: save_file(s, str(p), metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(shard_keys, name))
        names.append(name)
    if num_shards > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index_name = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
        index_json = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        _atomic_write(folder / index_name, lambda p: p.write_text(index_json))
        names.append(index_name)
    return names


def write_official_folder(
    config: ChatGLMConfig,
    state: dict[str, torch.Tensor],
    folder: str | os.PathLike,
    fmt: str = "bin",
    num_shards: int = 1,
    torch_dtype: str = "float16",
    name_or_path: str = "",
) -> Path:
    """Write config.json and weights of a model in the official layout; returns the folder."""
    folder = Path(folder)
    write_state_dict(state, folder, fmt=fmt, num_shards=num_shards)
    config_dict = official_config_dict(config, name_or_path=name_or_path, torch_dtype=torch_dtype)
    config_json = json.dumps(config_dict, indent=2, ensure_ascii=False)
    _atomic_write(folder / "config.json", lambda p: p.write_text(config_json + "\n"))
    return folder
