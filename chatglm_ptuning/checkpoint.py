"""Reading checkpoint folders: official shards in, method checkpoints (soft prompts) in and out.

Weights are read with `safetensors` or `torch.load(weights_only=True)` only, one file at a
time, so a quantized model can be built while the shards stream past (`loading.py`).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils import logging

from .configuration import ARCH_GLM1, ARCH_GLM2, ChatGLMConfig, detect_architecture
from .prompt_learning import (
    ENCODER_TYPES,
    METHODS,
    PREFIX_KEY_PREFIX,
    SOFT_PROMPT_KEY_PREFIXES,
    SOFT_PROMPT_METHODS,
)

SETTINGS_FILE = "ptuning_config.json"  # the settings a method checkpoint carries beside its weights
PREFIX_WEIGHTS_FILE = "model.safetensors"
LORA_CONFIG_FILE = "adapter_config.json"  # PEFT's adapter settings (a LoRA checkpoint)

# Weight files in the order they are looked for: newer transformers write safetensors.
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


logger = logging.get_logger(__name__)


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be used; the message names the file."""


def read_json_file(path: Path) -> object:
    """A JSON file's value; a file that is not UTF-8 JSON text raises a CheckpointError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not JSON text (a binary or corrupt file: byte {err.start} is not UTF-8)") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror})") from None


def require_folder(path: str | os.PathLike, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{what} {str(path)!r} is not a folder (it must be a local checkpoint directory)")
    return folder


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint folder, in index order; every shard an index lists must exist."""
    folder = require_folder(folder, "checkpoint")
    for index_name in _INDEX_FILES:
        index_path = folder / index_name
        if not index_path.exists():
            continue
        index = read_json_file(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: not a valid shard index (expected JSON with a 'weight_map' object)")
        shards = list(dict.fromkeys(weight_map.values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{index_path} lists shard(s) that are missing from {folder}: {', '.join(missing)}")
        return [folder / name for name in shards]
    for name in _SINGLE_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(
        f"{folder} holds no weights: expected one of {', '.join(_SINGLE_FILES + _INDEX_FILES)}"
    )


def _torch_load(path: Path, mmap: bool) -> dict[str, torch.Tensor]:
    """A .bin state dict through `torch.load(weights_only=True)` (no arbitrary unpickling)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - any decoding failure is a corrupt or foreign file
        raise CheckpointError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict), found {type(state).__name__}")
    return state


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors or .bin file, on CPU (memory-mapped but the legacy .bin format)."""
    if path.suffix == ".safetensors":
        return {key: tensor for _, key, tensor in _file_tensors(path, release=False)}
    return _torch_load(path, mmap=zipfile.is_zipfile(path))


def release_file_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages of a memory-mapped tensor from this process (Linux madvise
    MADV_PAGEOUT on the pages wholly inside it). Contents are kept: a later read faults them
    back in. A no-op elsewhere, on kernels without MADV_PAGEOUT (< 5.4) and for small tensors."""
    if _madvise is None:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _madvise(first, last - first, _MADV_PAGEOUT)


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_MADV_PAGEOUT = 21  # <linux/mman.h>
_madvise = _load_madvise()


def _file_tensors(path: Path, release: bool = True) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, key, tensor) of one weight file, one tensor at a time (see `iter_weight_tensors`)."""
    if path.suffix == ".safetensors":
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as err:  # noqa: BLE001 - a corrupt or foreign file
            raise CheckpointError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None
        with handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                yield path, key, tensor
                if release:
                    release_file_pages(tensor)
        return
    streamed = zipfile.is_zipfile(path)
    if not streamed:
        logger.warning("%s is in the legacy (non-zip) torch.save format: it is read whole, not streamed", path)
    state = _torch_load(path, mmap=streamed)
    for key in list(state):
        tensor = state.pop(key)
        yield path, key, tensor
        if release and streamed:
            release_file_pages(tensor)


def iter_weight_tensors(folder: str | os.PathLike) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """Yield (file, key, tensor) over every weight file of `folder`, one tensor at a time.

    Files are memory-mapped (safetensors' `safe_open`; `torch.load(mmap=True, weights_only=True)`
    for zip-format .bin files) and each tensor's pages are released once the next one is asked
    for, so no shard is ever wholly resident: copy what you need before asking for the next.
    Legacy non-zip .bin files cannot be mapped: they are read whole (logged).
    """
    for path in weight_files(folder):
        yield from _file_tensors(path)


def iter_weight_files(folder: str | os.PathLike) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """Yield (file, state dict) one shard at a time."""
    for path in weight_files(folder):
        yield path, read_weight_file(path)


@dataclass
class PromptSettings:
    """What a method checkpoint needs to be loaded back without repeating flags (`ptuning_config.json`).

    One format for every method; the soft-prompt fields (pre_seq_len, prefix_projection,
    encoder_type, encoder_hidden_size) stay at their defaults for lora and full. Files written
    before `method` and the encoder fields existed read as P-tuning v2.
    """

    architecture: str | None  # "chatglm" (ChatGLM-6B) or "chatglm2" (ChatGLM2/3); None: unknown (a bare PEFT folder)
    pre_seq_len: int | None = None  # virtual tokens of a soft-prompt method
    prefix_projection: bool = False  # MLP reparameterisation (ptuning_v2: optional; prefix_tuning: always)
    method: str = "ptuning_v2"  # one of METHODS
    base_model: str | None = None
    family: str | None = None  # "chatglm", "chatglm2" or "chatglm3" (the tokenizer/template family)
    quantization_bit: int = 0
    encoder_type: str | None = None  # ptuning's prompt encoder: "lstm" or "mlp"
    encoder_hidden_size: int | None = None  # prefix_tuning / ptuning encoder width (None: the method's default)

    def check(self, where: str) -> "PromptSettings":
        """Raise a CheckpointError naming `where` when the fields do not fit together; returns self."""
        if self.method not in METHODS:
            raise CheckpointError(f"{where}: method must be one of {', '.join(METHODS)}, found {self.method!r}")
        soft = self.method in SOFT_PROMPT_METHODS
        if soft and (not isinstance(self.pre_seq_len, int) or self.pre_seq_len <= 0):
            raise CheckpointError(f"{where}: method {self.method} needs pre_seq_len > 0, found {self.pre_seq_len!r}")
        if not soft and self.pre_seq_len:
            raise CheckpointError(f"{where}: pre_seq_len applies to soft-prompt methods, not to {self.method}")
        if self.encoder_type is not None and (self.method != "ptuning" or self.encoder_type not in ENCODER_TYPES):
            raise CheckpointError(
                f"{where}: encoder_type {self.encoder_type!r} needs method ptuning and one of {ENCODER_TYPES}"
            )
        if self.encoder_hidden_size is not None and self.method not in ("prefix_tuning", "ptuning"):
            raise CheckpointError(f"{where}: encoder_hidden_size applies to prefix_tuning and ptuning, not to {self.method}")
        return self

    # The one translation between the model config's tuning fields (pre_seq_len, prefix_projection,
    # prompt_method, prompt_encoder_type, prompt_encoder_hidden_size) and this record.
    @classmethod
    def from_config(cls, config: ChatGLMConfig, method: str) -> "PromptSettings":
        """The settings describing a loaded model of `method` (base model and family filled in by the caller)."""
        soft = method in SOFT_PROMPT_METHODS
        return cls(
            config.architecture,
            config.pre_seq_len if soft else None,
            bool(config.prefix_projection) if soft else False,
            method=method,
            quantization_bit=config.quantization_bit,
            encoder_type=config.prompt_encoder_type if method == "ptuning" else None,
            encoder_hidden_size=config.prompt_encoder_hidden_size if method in ("prefix_tuning", "ptuning") else None,
        )

    def apply_to(self, config: ChatGLMConfig) -> None:
        """Put the soft-prompt settings on a model config (the model builds its encoder from these)."""
        config.pre_seq_len = self.pre_seq_len
        config.prefix_projection = self.prefix_projection
        config.prompt_method = self.method
        if self.encoder_type is not None:
            config.prompt_encoder_type = self.encoder_type
        config.prompt_encoder_hidden_size = self.encoder_hidden_size

    def save(self, folder: Path) -> None:
        text = json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"
        tmp = folder / (SETTINGS_FILE + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, folder / SETTINGS_FILE)

    @classmethod
    def load(cls, path: Path) -> "PromptSettings":
        raw = read_json_file(path)
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object, found {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        required = ["architecture"]
        if raw.get("method", "ptuning_v2") in SOFT_PROMPT_METHODS:
            required += ["pre_seq_len", "prefix_projection"]
        missing = [name for name in required if name not in raw]
        if missing:
            raise CheckpointError(f"{path}: missing field(s) {', '.join(missing)}")
        return cls(**{k: v for k, v in raw.items() if k in known}).check(str(path))


def save_prefix_checkpoint(state: dict[str, torch.Tensor], folder: str | os.PathLike, settings: PromptSettings) -> Path:
    """Write soft-prompt tensors (full key names, official ones for a prefix; fp32) as safetensors
    plus the settings file.

    The weights go to a temporary name and are renamed, and the settings file is written last,
    so a folder with a settings file always has complete weights.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    tmp = folder / (PREFIX_WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / PREFIX_WEIGHTS_FILE)
    settings.save(folder)
    return folder


def _settings_from_official(folder: Path, state: dict[str, torch.Tensor]) -> PromptSettings:
    """Settings of a checkpoint written by the official recipe (config.json beside pytorch_model.bin)."""
    embedding = state.get(PREFIX_KEY_PREFIX + "embedding.weight")
    if embedding is None:
        raise CheckpointError(f"{folder}: no '{PREFIX_KEY_PREFIX}embedding.weight' tensor: not a P-tuning checkpoint")
    projection = PREFIX_KEY_PREFIX + "trans.0.weight" in state
    config_path = folder / "config.json"
    config = read_json_file(config_path) if config_path.is_file() else {}
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, found {type(config).__name__}")
    architecture = detect_architecture(config) if config else _architecture_from_prefix(state)
    return PromptSettings(
        architecture=architecture,
        pre_seq_len=int(embedding.shape[0]),
        prefix_projection=projection,
        base_model=config.get("_name_or_path") or None,
        quantization_bit=int(config.get("quantization_bit") or 0),
    )


def _architecture_from_prefix(state: dict[str, torch.Tensor]) -> str:
    # With projection, ChatGLM-6B's embedding is hidden-size wide and narrower than its output;
    # ChatGLM2/3's embedding is as wide as the output. Without projection the shapes cannot tell.
    trans2 = state.get(PREFIX_KEY_PREFIX + "trans.2.weight")
    embedding = state[PREFIX_KEY_PREFIX + "embedding.weight"]
    if trans2 is not None:
        return ARCH_GLM2 if trans2.shape[0] == embedding.shape[1] else ARCH_GLM1
    return ARCH_GLM2


def has_method_settings(folder: str | os.PathLike) -> bool:
    """Whether `folder` states its method: this toolkit's settings file or PEFT's adapter config."""
    return any((Path(folder) / name).is_file() for name in (SETTINGS_FILE, LORA_CONFIG_FILE))


def read_checkpoint_settings(path: str | os.PathLike) -> PromptSettings:
    """The settings of a checkpoint folder of any method, without reading large weights.

    This toolkit's folders carry `ptuning_config.json`; a bare PEFT folder (`adapter_config.json`)
    is a LoRA checkpoint; anything else must be an official P-tuning v2 checkpoint, whose settings
    come from its prefix tensors and config.json.
    """
    folder = require_folder(path, "checkpoint")
    if (folder / SETTINGS_FILE).is_file():
        return PromptSettings.load(folder / SETTINGS_FILE)
    if (folder / LORA_CONFIG_FILE).is_file():
        adapter = read_json_file(folder / LORA_CONFIG_FILE)
        if not isinstance(adapter, dict):
            raise CheckpointError(f"{folder / LORA_CONFIG_FILE}: expected a JSON object, found {type(adapter).__name__}")
        return PromptSettings(None, method="lora", base_model=adapter.get("base_model_name_or_path"))
    return read_prefix_checkpoint(folder)[1]


def read_prefix_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], PromptSettings]:
    """Soft-prompt tensors (full names) and settings of a soft-prompt checkpoint, in either format.

    Accepts this toolkit's folders (model.safetensors + ptuning_config.json, any soft-prompt
    method) and the official P-tuning v2 ones (pytorch_model.bin holding
    `transformer.prefix_encoder.*`, config.json beside it), and older official full-model
    checkpoints (whose weights include the prefix).
    """
    folder = require_folder(path, "P-tuning checkpoint")
    settings_path = folder / SETTINGS_FILE
    settings = PromptSettings.load(settings_path) if settings_path.is_file() else None
    if settings is not None and settings.method not in SOFT_PROMPT_METHODS:
        raise CheckpointError(f"{settings_path}: this is a {settings.method} checkpoint, not a soft-prompt (P-tuning) one")
    state: dict[str, torch.Tensor] = {}
    for _, shard in iter_weight_files(folder):
        state.update({k: v for k, v in shard.items() if k.startswith(SOFT_PROMPT_KEY_PREFIXES)})
    if not state:
        raise CheckpointError(
            f"{folder}: its weights hold no '{PREFIX_KEY_PREFIX}*' tensors: not a P-tuning checkpoint "
            "(a fully fine-tuned model folder is loaded as the model itself)"
        )
    if settings is None:
        settings = _settings_from_official(folder, state)
    if settings.architecture not in (ARCH_GLM1, ARCH_GLM2):
        raise CheckpointError(f"{settings_path}: architecture must be {ARCH_GLM1!r} or {ARCH_GLM2!r}, found {settings.architecture!r}")
    return state, settings
