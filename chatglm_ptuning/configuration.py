"""One configuration class for every ChatGLM generation, reading the official config.json as is.

Official ChatGLM-6B and ChatGLM2-6B/ChatGLM3-6B folders both say `model_type: "chatglm"` and
`architectures: ["ChatGLMModel"]`; only their field names tell the architectures apart
(ChatGLM-6B: `inner_hidden_size`, `position_encoding_2d`; ChatGLM2/3: `ffn_hidden_size`,
`padded_vocab_size`, `multi_query_attention`). `ChatGLMConfig(**fields)` therefore returns an
instance of the family's subclass, which holds that family's defaults; the Auto classes map
each subclass to its model class.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedConfig

# Fields only one family writes; a config.json holding any of them belongs to that family.
_GLM1_ONLY_FIELDS = frozenset({"inner_hidden_size", "position_encoding_2d", "max_sequence_length", "gmask_token_id"})
_GLM2_ONLY_FIELDS = frozenset(
    {"padded_vocab_size", "ffn_hidden_size", "kv_channels", "multi_query_attention", "multi_query_group_num", "seq_length"}
)

ARCH_GLM1 = "chatglm"  # ChatGLM-6B: GLM blocks, 2D positions
ARCH_GLM2 = "chatglm2"  # ChatGLM2-6B and ChatGLM3-6B: RoPE, multi-query attention, RMSNorm

# How `rope_ratio` stretches RoPE in long-context checkpoints (the two generations differ):
# chatglm2-6b-32k divides the positions by it (position interpolation), chatglm3-6b-32k/-128k
# multiply the RoPE base by it.
ROPE_INTERPOLATE = "interpolate"
ROPE_BASE = "base"
ROPE_SCALING_MODES = (ROPE_INTERPOLATE, ROPE_BASE)
# Tokens only ChatGLM3's tokenizer_config.json lists (its role tokens); ChatGLM2's has none.
_GLM3_TOKENIZER_MARKERS = ("<|user|>", "<|system|>", "<|assistant|>", "<|observation|>")


def detect_architecture(fields: dict[str, Any]) -> str:
    """Return ARCH_GLM1 or ARCH_GLM2 for the fields of a config.json (ChatGLM2 when nothing says)."""
    explicit = fields.get("chatglm_architecture")
    if explicit in (ARCH_GLM1, ARCH_GLM2):
        return explicit
    if explicit is not None:
        raise ValueError(f"chatglm_architecture must be {ARCH_GLM1!r} or {ARCH_GLM2!r}, found {explicit!r}")
    glm1 = _GLM1_ONLY_FIELDS & fields.keys()
    glm2 = _GLM2_ONLY_FIELDS & fields.keys()
    if glm1 and glm2:
        raise ValueError(
            f"config mixes ChatGLM-6B fields {sorted(glm1)} with ChatGLM2/3 fields {sorted(glm2)}; "
            "it cannot be both architectures"
        )
    return ARCH_GLM1 if glm1 else ARCH_GLM2


class ChatGLMConfig(PreTrainedConfig):
    """Configuration of a ChatGLM model of any generation, plus its soft-prompt settings.

    Instantiating this class returns a `ChatGLM6BConfig` or a `ChatGLM2Config` chosen from the
    fields given (see `detect_architecture`). Fields shared by both families live here.
    """

    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers"}
    keys_to_ignore_at_inference = ["past_key_values"]

    num_layers: int = 28  # transformer blocks
    hidden_size: int = 4096
    num_attention_heads: int = 32
    layernorm_epsilon: float = 1e-5
    use_cache: bool = True
    quantization_bit: int = 0  # 0 = dense; 4 or 8 = weight-only quantized linears (official packed layout)
    pre_seq_len: int | None = None  # P-tuning v2 prefix length; None = no prefix
    prefix_projection: bool = False  # MLP reparameterisation of the prefix (official flag name)
    # Which soft prompt the pre_seq_len virtual tokens are (prompt_learning.py): ptuning_v2 and
    # prefix_tuning add keys/values at every layer, prompt_tuning and ptuning add input tokens.
    prompt_method: str = "ptuning_v2"
    prompt_encoder_type: str = "lstm"  # ptuning's prompt encoder: "lstm" (biLSTM + MLP) or "mlp"
    prompt_encoder_hidden_size: int | None = None  # MLP/LSTM width of prefix_tuning/ptuning (None: their default)

    def __new__(cls, *args: Any, **kwargs: Any) -> "ChatGLMConfig":
        if cls is ChatGLMConfig:
            cls = ChatGLM6BConfig if detect_architecture(kwargs) == ARCH_GLM1 else ChatGLM2Config
        return super().__new__(cls)

    def __post_init__(self, **kwargs: Any) -> None:
        kwargs.pop("chatglm_architecture", None)  # derived from the class, never stored twice
        super().__post_init__(**kwargs)
        if self.quantization_bit not in (0, 4, 8):
            raise ValueError(f"quantization_bit must be 0, 4 or 8, found {self.quantization_bit!r}")
        if self.pre_seq_len is not None and (not isinstance(self.pre_seq_len, int) or self.pre_seq_len <= 0):
            raise ValueError(f"pre_seq_len must be a positive integer or None, found {self.pre_seq_len!r}")

    @property
    def architecture(self) -> str:
        """ARCH_GLM1 or ARCH_GLM2."""
        raise NotImplementedError

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads per layer: what the P-tuning v2 prefix produces for each layer."""
        raise NotImplementedError

    @property
    def head_dim(self) -> int:
        raise NotImplementedError

    @property
    def prefix_kv_size(self) -> int:
        """Width of one prefix position: keys and values of every layer, flattened (L*2*N*D)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim


class ChatGLM6BConfig(ChatGLMConfig):
    """ChatGLM-6B (first generation). Defaults are the official class defaults (150528 vocabulary)."""

    vocab_size: int = 150528
    inner_hidden_size: int = 16384  # MLP width
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    bos_token_id: int | None = 150004  # <sop>
    eos_token_id: int | list[int] | None = 150005  # <eop>
    mask_token_id: int = 150000  # [MASK]
    gmask_token_id: int = 150001  # [gMASK]
    pad_token_id: int | None = 0
    quantization_embeddings: bool = False
    tie_word_embeddings: bool = True  # official loader ties lm_head to word_embeddings

    @property
    def architecture(self) -> str:
        return ARCH_GLM1

    @property
    def num_kv_heads(self) -> int:
        return self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class ChatGLM2Config(ChatGLMConfig):
    """ChatGLM2-6B and ChatGLM3-6B (same architecture). Defaults are the official class defaults."""

    padded_vocab_size: int = 65024  # embedding/output rows; also exposed as vocab_size
    vocab_size: int | None = None
    ffn_hidden_size: int = 13696  # SwiGLU width (dense_h_to_4h is twice this)
    kv_channels: int = 128  # head dim
    seq_length: int = 2048
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    classifier_dropout: float | None = None
    rmsnorm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    bias_dropout_fusion: bool = True  # stored, unused
    multi_query_attention: bool = False
    multi_query_group_num: int = 1
    apply_query_key_layer_scaling: bool = True  # stored; SDPA attention has no layer coefficient
    attention_softmax_in_fp32: bool = True
    fp32_residual_connection: bool = False
    original_rope: bool = True  # stored, unused by the math
    rope_ratio: float = 1.0  # long-context stretch of RoPE; how it applies is `rope_scaling_mode`
    # ROPE_INTERPOLATE (chatglm2-6b-32k: positions / rope_ratio) or ROPE_BASE (chatglm3-6b-32k/128k:
    # base 10000 * rope_ratio); None: not decided, computed as ROPE_BASE (`load_model` decides
    # from the folder, see `rope_scaling_mode_for_folder`).
    rope_scaling_mode: str | None = None
    tie_word_embeddings: bool = False
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.vocab_size = self.padded_vocab_size
        if self.rope_scaling_mode not in (None, *ROPE_SCALING_MODES):
            raise ValueError(
                f"rope_scaling_mode must be one of {ROPE_SCALING_MODES} (or None), found {self.rope_scaling_mode!r}"
            )

    @property
    def architecture(self) -> str:
        return ARCH_GLM2

    @property
    def num_kv_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None
    return raw if isinstance(raw, dict) else {}


def _generation_in_name(name: object) -> int | None:
    """2 or 3 when a model/tokenizer name says chatglm2 or chatglm3 (GLM-4 counts as 3), else None."""
    text = str(name or "").lower()
    if "chatglm3" in text or "glm-4" in text or "glm4" in text:
        return 3
    if "chatglm2" in text:
        return 2
    return None


def rope_scaling_mode_for_folder(folder: str | os.PathLike, override: str | None = None) -> tuple[str, str]:
    """The RoPE rule of a ChatGLM2/3 model folder and why: (ROPE_INTERPOLATE or ROPE_BASE, reason).

    The rule follows the model generation: ChatGLM2 (chatglm2-6b-32k, whose modeling_chatglm.py
    divides `seq_idx` by `rope_ratio`) interpolates positions; ChatGLM3 (chatglm3-6b-32k/-128k,
    whose `forward_impl` multiplies `base` by `rope_ratio`) scales the base. First that applies:
    `override`; the folder's config.json `rope_scaling_mode`; rope_ratio 1 (both rules are the
    same); tokenizer_config.json's `chatglm_version` or ChatGLM3 role tokens; "chatglm2"/"chatglm3"
    in config.json `_name_or_path`, tokenizer_config.json `name_or_path` or the folder name; a
    ChatGLM2/3 `tokenizer.model` with no ChatGLM3 mark (the ChatGLM2 tokenizer); else ROPE_BASE.
    """
    folder = Path(folder)
    if override is not None:
        if override not in ROPE_SCALING_MODES:
            raise ValueError(f"rope_scaling_mode must be one of {ROPE_SCALING_MODES}, found {override!r}")
        return override, "rope_scaling_mode given"
    config = _read_json(folder / "config.json")
    stored = config.get("rope_scaling_mode")
    if stored is not None:
        if stored not in ROPE_SCALING_MODES:
            raise ValueError(
                f"{folder / 'config.json'}: rope_scaling_mode must be one of {ROPE_SCALING_MODES}, found {stored!r}"
            )
        return stored, "config.json rope_scaling_mode"
    if float(config.get("rope_ratio", 1.0)) == 1.0:
        return ROPE_BASE, "rope_ratio is 1 (no long-context scaling)"
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    version = tokenizer_config.get("chatglm_version")
    reason = "tokenizer_config.json chatglm_version"
    if version is None and any(marker in json.dumps(tokenizer_config) for marker in _GLM3_TOKENIZER_MARKERS):
        version, reason = 3, "ChatGLM3 role tokens in tokenizer_config.json"
    if version is None:
        names = {
            "config.json _name_or_path": config.get("_name_or_path"),
            "tokenizer_config.json name_or_path": tokenizer_config.get("name_or_path"),
            "the folder name": folder.resolve().name,
        }
        for where, name in names.items():
            version = _generation_in_name(name)
            if version is not None:
                reason = f"{name!r} in {where}"
                break
    if version is None and (folder / "tokenizer.model").is_file():
        version, reason = 2, "a ChatGLM2 tokenizer (tokenizer.model without ChatGLM3 marks)"
    if version is None:
        return ROPE_BASE, "nothing in the folder tells ChatGLM2 from ChatGLM3; the ChatGLM3 rule is assumed"
    mode = ROPE_INTERPOLATE if int(version) == 2 else ROPE_BASE
    return mode, f"ChatGLM{int(version)} ({reason})"
