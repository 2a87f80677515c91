"""`load_model`: the one loader behind training, evaluation, the demos and the API.

It builds the model empty (no initialisation, memory untouched), then streams the checkpoint
into it tensor by tensor (`checkpoint.iter_weight_tensors`). With `quantization_bit` the
quantized layers are built as packed holders and each dense weight is quantized as it arrives,
so peak host memory stays near the quantized model plus the largest single tensor.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.initialization import no_init_weights
from transformers.utils import logging

from .checkpoint import (
    CheckpointError,
    PromptSettings,
    has_method_settings,
    iter_weight_tensors,
    release_file_pages,
    read_checkpoint_settings,
    read_prefix_checkpoint,
    require_folder,
)
from .configuration import (
    ARCH_GLM2,
    ROPE_INTERPOLATE,
    ROPE_SCALING_MODES,
    ChatGLM2Config,
    ChatGLM6BConfig,
    ChatGLMConfig,
    rope_scaling_mode_for_folder,
)
from .lora import LoraOptions, add_lora, load_lora
from .methods import (
    MethodError,
    init_new_soft_prompt,
    resolve_method,
    soft_prompt_encoder,
    soft_prompt_settings,
)
from .modeling_base import ChatGLMLMBase
from .modeling_chatglm import ChatGLMForConditionalGeneration
from .modeling_chatglm2 import ChatGLM2ForConditionalGeneration
from .prompt_learning import SOFT_PROMPT_KEY_PREFIXES, SOFT_PROMPT_METHODS

logger = logging.get_logger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """Half precision on GPU (bf16 where supported), fp32 on CPU (CPU half matmuls are slow)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# The LM class of each architecture's config class; the package registers the same pairs with the
# transformers Auto classes.
MODEL_CLASSES: dict[type[ChatGLMConfig], type[ChatGLMLMBase]] = {
    ChatGLM6BConfig: ChatGLMForConditionalGeneration,
    ChatGLM2Config: ChatGLM2ForConditionalGeneration,
}


def _model_class(config: ChatGLMConfig) -> type[ChatGLMLMBase]:
    return MODEL_CLASSES[type(config)]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _ignored_unexpected(model: ChatGLMLMBase, key: str) -> bool:
    patterns = model._keys_to_ignore_on_load_unexpected or []
    return any(re.search(pattern, key) for pattern in patterns)


_CHUNK_BYTES = 64 * 1024**2  # rows of a stored tensor copied (or quantized) at once


def _stream_weights(model: ChatGLMLMBase, folder: Path, quantization_bit: int) -> set[str]:
    """Copy every tensor of `folder` into `model`, one at a time; returns the model keys filled.

    Large tensors go in row chunks of about _CHUNK_BYTES whose file pages are released as soon
    as they are copied (or quantized: every quantization formula is per row), so at most one
    chunk of the checkpoint is resident beside the model."""
    from .quantization import quantize_linear_state

    expected = model.state_dict()  # views of the model's own tensors: copying into them loads
    tied_targets = _tied_keys(model)  # e.g. ChatGLM-6B's lm_head: the official loader keeps word_embeddings
    filled: set[str] = set()
    architecture = model.config.architecture
    with torch.no_grad():
        for path, key, tensor in iter_weight_tensors(folder):
            if key in tied_targets:
                continue
            if key not in expected:
                if _ignored_unexpected(model, key):
                    continue
                raise CheckpointError(
                    f"{path}: tensor {key!r} does not belong to a {architecture!r} model of this configuration"
                )
            target = expected[key]
            quantized = bool(quantization_bit) and tensor.is_floating_point() and target.dtype == torch.int8

            def entries(rows: torch.Tensor) -> dict[str, torch.Tensor]:
                if quantized:  # a dense weight arriving for a quantized holder: quantize it on the model's device
                    return quantize_linear_state(architecture, key, rows.to(target.device), quantization_bit)
                return {key: rows}

            if tensor.dim() == 0 or tensor.shape[0] != target.shape[0] or target.dim() == 0:
                chunks = [tensor]  # whole (and a shape mismatch is reported below)
            else:
                rows = max(1, _CHUNK_BYTES // max(1, tensor[0].numel() * tensor.element_size()))
                chunks = [tensor[start : start + rows] for start in range(0, tensor.shape[0], rows)]
            start = 0
            for chunk in chunks:
                for name, value in entries(chunk).items():
                    destination = expected[name] if len(chunks) == 1 else expected[name][start : start + len(value)]
                    if tuple(value.shape) != tuple(destination.shape):
                        shape = list(tensor.shape) if name == key else list(value.shape)
                        raise CheckpointError(
                            f"{path}: tensor {name!r} has shape {shape} but the model (config.json) expects "
                            f"{list(expected[name].shape)}"
                        )
                    destination.copy_(value)
                    filled.add(name)
                start += len(chunk) if chunk.dim() else 0
                release_file_pages(chunk)
            del tensor, chunks
    return filled


def _stored_config(folder: str | os.PathLike) -> dict | None:
    """config.json of a local model folder as stored, or None (not a local folder)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from None
    return raw if isinstance(raw, dict) else None


def dense_folder_quantization_bit(folder: str | os.PathLike, kwargs: dict) -> int | None:
    """For `from_pretrained(folder, quantization_bit=b)` (or a config saying b) on a dense local
    folder: make `kwargs` load it dense and return b to quantize after loading; else None.

    A folder already quantized to other bits is an error (reload the dense checkpoint)."""
    stored = _stored_config(folder) if isinstance(folder, (str, os.PathLike)) else None
    if stored is None:
        return None
    config = kwargs.get("config")
    requested = kwargs.get("quantization_bit")
    if requested is None and isinstance(config, ChatGLMConfig):
        requested = config.quantization_bit
    stored_bits = int(stored.get("quantization_bit") or 0)
    if not requested or requested == stored_bits:
        return None
    if stored_bits:
        raise CheckpointError(f"{folder} is already quantized to INT{stored_bits}; it cannot be loaded as INT{requested}")
    if isinstance(config, ChatGLMConfig):
        kwargs["config"] = config = copy.deepcopy(config)
        config.quantization_bit = 0
    if "quantization_bit" in kwargs:
        kwargs["quantization_bit"] = 0
    return requested


def choose_rope_rule(config: ChatGLMConfig, folder: str | os.PathLike, override: str | None = None) -> None:
    """Set `config.rope_scaling_mode` of a ChatGLM2/3 folder (`rope_scaling_mode_for_folder`) and
    say which rule was chosen when it matters (rope_ratio != 1)."""
    if config.architecture != ARCH_GLM2:
        if override is not None:
            raise ValueError("rope_scaling_mode applies to ChatGLM2/3 models, not to ChatGLM-6B")
        return
    if config.rope_ratio == 1 and override is None:
        return  # both rules are the same
    mode, reason = rope_scaling_mode_for_folder(folder, override)
    config.rope_scaling_mode = mode
    if config.rope_ratio != 1:
        rule = "positions / rope_ratio" if mode == ROPE_INTERPOLATE else "RoPE base 10000 x rope_ratio"
        logger.warning(
            f"{folder}: rope_ratio {config.rope_ratio} applied as rope_scaling_mode={mode!r} ({rule}), chosen by {reason}; "
            f"pass rope_scaling_mode={ROPE_SCALING_MODES} to override"
        )


def apply_folder_rope_rule(model: ChatGLMLMBase, folder: str | os.PathLike) -> None:
    """After `from_pretrained`: give a ChatGLM2/3 model whose config does not fix the RoPE rule
    its folder's rule (a no-op for other models and for folders that are not local)."""
    config = model.config
    if config.architecture != ARCH_GLM2 or config.rope_scaling_mode is not None:
        return
    if not isinstance(folder, (str, os.PathLike)) or not (Path(folder) / "config.json").is_file():
        return
    choose_rope_rule(config, folder)
    model.transformer.rotary_pos_emb.set_scaling(config.rope_ratio, config.rope_scaling_mode)


@dataclass(frozen=True)
class LoadOptions:
    """What `load_model` / `load_model_weights` load besides the base model folder.

    `ptuning_checkpoint` is a checkpoint of any method (prompt_learning.METHODS): a soft prompt
    (this toolkit's or an official P-tuning v2 one), a LoRA adapter, or a fully fine-tuned model
    (which then replaces the base weights). `method` None takes the checkpoint's method, else
    ptuning_v2 when `pre_seq_len` is given, else the model as its folder describes it; a method
    other than the checkpoint's is an error. The settings come from the checkpoint (flags that
    contradict it are an error), else from these: `pre_seq_len` virtual tokens,
    `prefix_projection` (ptuning_v2), `encoder_type` "lstm"/"mlp" (ptuning), `encoder_hidden_size`
    (prefix_tuning, ptuning), `lora_options` (a new LoRA adapter).
    `quantization_bit` 4/8 quantizes a dense checkpoint while loading; a pre-quantized one
    loads as it is. `device`/`dtype` default to the GPU in bf16/fp16 when there is one, else the
    CPU in fp32. `rope_scaling_mode` ("interpolate": chatglm2-6b-32k, "base": chatglm3-6b-32k/-128k)
    overrides the RoPE rule a ChatGLM2/3 folder with `rope_ratio` gets from its tokenizer family
    and name (logged).
    """

    ptuning_checkpoint: str | os.PathLike | None = None
    pre_seq_len: int | None = None
    prefix_projection: bool | None = None
    quantization_bit: int | None = None
    device: str | torch.device | None = None
    dtype: torch.dtype | str | None = None
    method: str | None = None
    encoder_type: str | None = None
    encoder_hidden_size: int | None = None
    lora_options: LoraOptions | None = None
    rope_scaling_mode: str | None = None


def load_model(
    model_name_or_path: str | os.PathLike,
    ptuning_checkpoint: str | os.PathLike | None = None,
    *,
    chatglm_version: int | None = None,
    **options,  # noqa: ANN003 - LoadOptions' fields
):
    """Load a ChatGLM model folder (and optionally a method checkpoint) for use or training.

    Returns (model, tokenizer). The keyword arguments are `LoadOptions`' fields (pre_seq_len,
    prefix_projection, quantization_bit, device, dtype, method, encoder_type, encoder_hidden_size,
    lora_options, rope_scaling_mode); `chatglm_version` (2 or 3) picks the ChatGLM2 or ChatGLM3
    tokenizer for folders whose tokenizer_config.json does not say. The model is returned in eval
    mode with the backbone frozen for every method but full; with lora it is PEFT's PeftModel
    around the ChatGLM model (which still has `chat()`, `generate()` and `config`).
    """
    model = load_model_weights(model_name_or_path, LoadOptions(ptuning_checkpoint, **options))
    tokenizer = load_tokenizer(model_name_or_path, chatglm_version)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_model_weights(
    model_name_or_path: str | os.PathLike,
    options: LoadOptions | None = None,
    **fields,  # noqa: ANN003 - LoadOptions' fields
) -> ChatGLMLMBase:
    """`load_model` without the tokenizer: the model alone, same checks. Takes `options`, or
    `LoadOptions`' fields as keywords."""
    options = replace(options, **fields) if options is not None else LoadOptions(**fields)
    ptuning_checkpoint, pre_seq_len = options.ptuning_checkpoint, options.pre_seq_len
    where = f"checkpoint {ptuning_checkpoint}"
    settings = None
    if ptuning_checkpoint is not None:
        if options.method == "full" and not has_method_settings(ptuning_checkpoint):
            settings = PromptSettings(None, method="full")  # a whole model folder, as the Trainer saves it
        else:
            settings = read_checkpoint_settings(ptuning_checkpoint)
    method = resolve_method(options.method, settings, pre_seq_len, where)
    # A full fine-tuning checkpoint is a whole model in the official layout: it replaces the base.
    folder = require_folder(ptuning_checkpoint if method == "full" and settings else model_name_or_path, "model")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json: not a model folder")
    config = ChatGLMConfig.from_pretrained(folder)
    choose_rope_rule(config, folder, options.rope_scaling_mode)
    prefix_state: dict[str, torch.Tensor] = {}
    if method in SOFT_PROMPT_METHODS:
        if settings is not None:
            prefix_state, settings = read_prefix_checkpoint(ptuning_checkpoint)
        elif pre_seq_len is None and config.pre_seq_len:  # the folder holds its own prompt (old full-model P-tuning)
            pre_seq_len = config.pre_seq_len
        settings = soft_prompt_settings(
            config.architecture,
            settings,
            method,
            pre_seq_len,
            options.prefix_projection,
            options.encoder_type,
            options.encoder_hidden_size,
            where,
        )
        settings.apply_to(config)
    elif pre_seq_len is not None or options.prefix_projection or (options.encoder_type, options.encoder_hidden_size) != (None, None):
        raise MethodError(
            f"pre_seq_len, prefix_projection, encoder_type and encoder_hidden_size apply to the soft-prompt methods "
            f"({', '.join(SOFT_PROMPT_METHODS)}), not to {method}"
        )
    elif method == "lora" and settings is not None and settings.architecture not in (None, config.architecture):
        raise CheckpointError(
            f"{where} was trained on a {settings.architecture!r} model but the base model is {config.architecture!r}"
        )

    stored_bits = config.quantization_bit
    quantization_bit = options.quantization_bit
    if quantization_bit is not None and (isinstance(quantization_bit, bool) or quantization_bit not in (4, 8)):
        raise ValueError(f"quantization_bit must be 4 or 8 (or None for none), found {quantization_bit!r}")
    bits = stored_bits if quantization_bit is None else quantization_bit
    if stored_bits and bits != stored_bits:
        raise CheckpointError(f"{folder} is already quantized to INT{stored_bits}; it cannot be loaded as INT{bits or 16}")

    device = torch.device(options.device) if options.device is not None else default_device()
    dtype = getattr(torch, options.dtype) if isinstance(options.dtype, str) else (options.dtype or default_dtype(device))

    # Build empty: no initialisation, so untouched memory is never committed; with
    # quantization_bit set the model builds its quantized layers as packed holders.
    config.quantization_bit = bits
    with no_init_weights(), _default_dtype(dtype), device:
        model = _model_class(config)(config)
    if config.pre_seq_len:
        soft_prompt_encoder(model).float()  # the prompt stays fp32 whatever the backbone dtype
    filled = _stream_weights(model, folder, bits)

    missing = [k for k in model.state_dict() if k not in filled and not k.startswith(SOFT_PROMPT_KEY_PREFIXES)]
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{folder}: the checkpoint lacks weights the model needs: {shown}")

    if config.pre_seq_len:
        prefix_loaded = filled & {k for k in model.state_dict() if k.startswith(SOFT_PROMPT_KEY_PREFIXES)}
        if prefix_state:
            _load_prefix(model, prefix_state, ptuning_checkpoint)
        elif not prefix_loaded:
            init_new_soft_prompt(model)  # a new prompt to train
    model.tie_weights()
    if method == "lora":
        model = load_lora(model, ptuning_checkpoint) if ptuning_checkpoint is not None else add_lora(model, options.lora_options)
    model.eval()
    return model


def _tied_keys(model: ChatGLMLMBase) -> set[str]:
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def _load_prefix(model: ChatGLMLMBase, state: dict[str, torch.Tensor], where: str | os.PathLike | None) -> None:
    expected = model.prefix_state_dict()
    unknown = sorted(set(state) - set(expected))
    absent = sorted(set(expected) - set(state))
    if unknown or absent:
        raise CheckpointError(f"P-tuning checkpoint {where}: unexpected tensors {unknown}, missing tensors {absent}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"P-tuning checkpoint {where}: {key} has shape {list(tensor.shape)} but this base model needs "
                f"{list(expected[key].shape)} (pre_seq_len={model.config.pre_seq_len}, "
                f"prefix_projection={model.config.prefix_projection}, {model.config.num_layers} layers)"
            )
    model.load_state_dict(state, strict=False)


def load_tokenizer(folder: str | os.PathLike, chatglm_version: int | None = None):
    """The tokenizer of a model folder (AutoTokenizer, no remote code)."""
    kwargs = {} if chatglm_version is None else {"chatglm_version": chatglm_version}
    try:
        return AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder}: cannot load the tokenizer ({err})") from None
