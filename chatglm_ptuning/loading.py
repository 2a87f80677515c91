"""`load_model`: the one loader behind training, evaluation, the demos and the API.

It builds the model empty (no initialisation, memory untouched), then streams the checkpoint
shard by shard into it. With `quantization_bit` the quantized layers are built as packed
holders, and each dense weight is quantized as its shard arrives, so peak host memory stays
near the quantized model plus one shard.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.initialization import no_init_weights

from .checkpoint import CheckpointError, PromptSettings, iter_weight_files, read_prefix_checkpoint, require_folder
from .configuration import ChatGLMConfig
from .modeling_base import ChatGLMLMBase
from .prompt_learning import PREFIX_KEY_PREFIX


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """Half precision on GPU (bf16 where supported), fp32 on CPU (CPU half matmuls are slow)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _model_class(config: ChatGLMConfig) -> type[ChatGLMLMBase]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _apply_prompt_settings(
    config: ChatGLMConfig, settings: PromptSettings | None, pre_seq_len: int | None, prefix_projection: bool | None, where: str
) -> None:
    """Put the prefix settings on `config`, refusing flags that contradict the checkpoint."""
    if settings is None:
        if pre_seq_len is not None:
            config.pre_seq_len = pre_seq_len
        if prefix_projection is not None:
            config.prefix_projection = prefix_projection
        return
    if settings.architecture != config.architecture:
        raise CheckpointError(
            f"{where} was trained on a {settings.architecture!r} model but the base model is {config.architecture!r} "
            "(ChatGLM-6B prefixes and ChatGLM2/3 prefixes are not interchangeable)"
        )
    if pre_seq_len is not None and pre_seq_len != settings.pre_seq_len:
        raise CheckpointError(f"{where} has pre_seq_len {settings.pre_seq_len} but pre_seq_len {pre_seq_len} was asked for")
    if prefix_projection is not None and bool(prefix_projection) != settings.prefix_projection:
        raise CheckpointError(
            f"{where} has prefix_projection {settings.prefix_projection} but prefix_projection {bool(prefix_projection)} was asked for"
        )
    config.pre_seq_len = settings.pre_seq_len
    config.prefix_projection = settings.prefix_projection


def _ignored_unexpected(model: ChatGLMLMBase, key: str) -> bool:
    patterns = model._keys_to_ignore_on_load_unexpected or []
    return any(re.search(pattern, key) for pattern in patterns)


def _stream_weights(model: ChatGLMLMBase, folder: Path, quantization_bit: int) -> set[str]:
    """Copy every shard of `folder` into `model`; returns the model keys that were filled."""
    from .quantization import quantize_linear_state

    expected = model.state_dict()
    tied_targets = _tied_keys(model)  # e.g. ChatGLM-6B's lm_head: the official loader keeps word_embeddings
    filled: set[str] = set()
    architecture = model.config.architecture
    for path, shard in iter_weight_files(folder):
        batch: dict[str, torch.Tensor] = {}
        for key, tensor in shard.items():
            if key in tied_targets:
                continue
            if quantization_bit and tensor.is_floating_point() and key in expected and expected[key].dtype == torch.int8:
                # A dense weight arriving for a quantized holder: quantize it now, on the model's device.
                quantized = quantize_linear_state(architecture, key, tensor.to(expected[key].device), quantization_bit)
                batch.update(quantized)
                continue
            if key not in expected:
                if _ignored_unexpected(model, key):
                    continue
                raise CheckpointError(f"{path}: tensor {key!r} does not belong to a {architecture!r} model of this configuration")
            batch[key] = tensor
        for key, tensor in batch.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise CheckpointError(
                    f"{path}: tensor {key!r} has shape {list(tensor.shape)} but the model (config.json) expects "
                    f"{list(expected[key].shape)}"
                )
        model.load_state_dict(batch, strict=False)
        filled.update(batch)
        del shard, batch
    return filled


def load_model(
    model_name_or_path: str | os.PathLike,
    ptuning_checkpoint: str | os.PathLike | None = None,
    pre_seq_len: int | None = None,
    prefix_projection: bool | None = None,
    quantization_bit: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    chatglm_version: int | None = None,
):
    """Load a ChatGLM model folder (and optionally a prefix checkpoint) for use or training.

    Returns (model, tokenizer). The prefix settings come from the prefix checkpoint when given
    (flags that contradict it are an error), else from the flags, else from config.json.
    `quantization_bit` 4/8 quantizes a dense checkpoint while loading; a pre-quantized one
    loads as it is. `chatglm_version` (2 or 3) picks the ChatGLM2 or ChatGLM3 tokenizer for
    folders whose tokenizer_config.json does not say. The model is returned in eval mode with
    the backbone frozen when a prefix is present.
    """
    model = load_model_weights(
        model_name_or_path, ptuning_checkpoint, pre_seq_len, prefix_projection, quantization_bit, device, dtype
    )
    tokenizer = load_tokenizer(model_name_or_path, chatglm_version)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_model_weights(
    model_name_or_path: str | os.PathLike,
    ptuning_checkpoint: str | os.PathLike | None = None,
    pre_seq_len: int | None = None,
    prefix_projection: bool | None = None,
    quantization_bit: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> ChatGLMLMBase:
    """`load_model` without the tokenizer: the model alone, same arguments and checks."""
    from .quantization import quantize

    folder = require_folder(model_name_or_path, "model")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json: not a model folder")
    config = ChatGLMConfig.from_pretrained(folder)
    settings = None
    prefix_state: dict[str, torch.Tensor] = {}
    if ptuning_checkpoint is not None:
        prefix_state, settings = read_prefix_checkpoint(ptuning_checkpoint)
    _apply_prompt_settings(config, settings, pre_seq_len, prefix_projection, f"P-tuning checkpoint {ptuning_checkpoint}")

    stored_bits = config.quantization_bit
    bits = stored_bits if quantization_bit is None else int(quantization_bit)
    if bits not in (0, 4, 8):
        raise ValueError(f"quantization_bit must be 4 or 8 (or None), found {quantization_bit!r}")
    if stored_bits and bits != stored_bits:
        raise CheckpointError(f"{folder} is already quantized to INT{stored_bits}; it cannot be loaded as INT{bits or 16}")

    device = torch.device(device) if device is not None else default_device()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or default_dtype(device))

    # Build empty: no initialisation, so untouched memory is never committed; quantized
    # layers are created as packed holders before any weight arrives.
    config.quantization_bit = 0
    with no_init_weights(), _default_dtype(dtype), device:
        model = _model_class(config)(config)
        if bits:
            quantize(model, bits, empty_init=True)
    if config.pre_seq_len:
        model.transformer.prefix_encoder.float()  # the prefix stays fp32 whatever the backbone dtype
    filled = _stream_weights(model, folder, bits)

    missing = [k for k in model.state_dict() if k not in filled and not k.startswith(PREFIX_KEY_PREFIX)]
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{folder}: the checkpoint lacks weights the model needs: {shown}")

    if config.pre_seq_len:
        prefix_loaded = filled & {k for k in model.state_dict() if k.startswith(PREFIX_KEY_PREFIX)}
        if prefix_state:
            _load_prefix(model, prefix_state, ptuning_checkpoint)
        elif not prefix_loaded:
            model.transformer.prefix_encoder.reset_parameters()  # a new prefix to train
    model.tie_weights()
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
