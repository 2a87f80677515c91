"""LoRA through the PEFT library on the native ChatGLM models (no LoRA code of our own).

The adapters go on the attention's `query_key_value` by default (PEFT's own ChatGLM default, and
THUDM's ChatGLM3 LoRA recipe); the names are the same in both families, and `dense` adds the
attention output projection. A LoRA checkpoint is PEFT's own folder (`adapter_config.json` +
`adapter_model.safetensors`) plus this toolkit's `ptuning_config.json`, so PEFT tools read it as is.

INT8/INT4 backbones: the quantized linears are not `nn.Linear`, so they are registered with
PEFT's custom-module hook and wrapped by PEFT's own LoRA `Linear` layer, which adds the low-rank
update to the base layer's output and never touches the packed weight. Merging needs a dense
backbone: `merge_lora` refuses a quantized one (export from the dense base instead).
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import LORA_CONFIG_FILE, CheckpointError
from .quantization import QuantizedLinear

DEFAULT_TARGET_MODULES = ("query_key_value",)


@dataclass
class LoraOptions:
    """LoRA hyper-parameters for a new adapter (a saved one brings its own adapter_config.json)."""

    rank: int = 8  # r: the rank of the update B @ A
    alpha: float = 32.0  # the update is scaled by alpha / rank
    dropout: float = 0.1  # dropout on the adapter's input
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES  # module-name suffixes that get an adapter


def _peft():
    try:
        import peft
    except ImportError as err:  # an optional dependency (pip install 'chatglm-ptuning[lora]')
        raise ImportError("method lora needs the PEFT library: pip install peft") from err
    return peft


def _register_quantized_linears(config) -> None:  # noqa: ANN001 - a peft.LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    config._register_custom_module({QuantizedLinear: PeftLoraLinear})


@contextmanager
def _quiet_custom_layers():
    # PEFT warns "Unsupported layer type" for every registered custom layer; it is supported here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        yield


def add_lora(model: nn.Module, options: LoraOptions | None = None):
    """Wrap `model` in a new, trainable PEFT LoRA adapter (the backbone frozen). Returns the PeftModel."""
    peft = _peft()
    options = options or LoraOptions()
    if options.rank <= 0:
        raise ValueError(f"LoRA rank must be positive, found {options.rank}")
    config = peft.LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=list(options.target_modules),
        bias="none",
    )
    _register_quantized_linears(config)
    with _quiet_custom_layers():
        try:
            return peft.get_peft_model(model, config)
        except ValueError as err:
            raise ValueError(f"LoRA target modules {list(options.target_modules)}: {err}") from None


def load_lora(model: nn.Module, folder: str | os.PathLike, trainable: bool = True):
    """Wrap `model` in the PEFT adapter saved in `folder`. Returns the PeftModel."""
    peft = _peft()
    folder = Path(folder)
    if not (folder / LORA_CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder}: no {LORA_CONFIG_FILE}: not a LoRA checkpoint")
    config = peft.LoraConfig.from_pretrained(str(folder))
    _register_quantized_linears(config)
    with _quiet_custom_layers():
        return peft.PeftModel.from_pretrained(model, str(folder), config=config, is_trainable=trainable)


def save_lora(model: nn.Module, folder: str | os.PathLike, state: dict[str, torch.Tensor] | None = None) -> None:
    """PEFT's adapter files for `model` (a PeftModel). `state`: its trainable tensors under
    `model.named_parameters()` names, when they had to be gathered (DeepSpeed ZeRO-3)."""
    model.save_pretrained(str(folder), state_dict=state, safe_serialization=True)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights; returns the plain model (PEFT's merge_and_unload)."""
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError(
            "LoRA cannot be merged into an INT8/INT4 backbone (its packed weights cannot take the update); "
            "load the dense base model (no quantization_bit) with the adapter and merge that"
        )
    return model.merge_and_unload()
