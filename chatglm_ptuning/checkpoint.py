"""Reading checkpoint folders: official shards in, prefix-only checkpoints in and out.

Weights are read with `safetensors` or `torch.load(weights_only=True)` only, one file at a
time, so a quantized model can be built while the shards stream past (`loading.py`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .configuration import ARCH_GLM1, ARCH_GLM2, detect_architecture
from .prompt_learning import PREFIX_KEY_PREFIX

SETTINGS_FILE = "ptuning_config.json"  # the settings a prompt checkpoint carries beside its weights
PREFIX_WEIGHTS_FILE = "model.safetensors"

# Weight files in the order they are looked for: newer transformers write safetensors.
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be used; the message names the file."""


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
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_path}: not a valid shard index (expected JSON with a 'weight_map'): {err}") from None
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


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors or .bin file, on CPU (bin files memory-mapped)."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any decoding failure is a corrupt or foreign file
        raise CheckpointError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict), found {type(state).__name__}")
    return state


def iter_weight_files(folder: str | os.PathLike) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """Yield (file, state dict) one shard at a time."""
    for path in weight_files(folder):
        yield path, read_weight_file(path)


@dataclass
class PromptSettings:
    """What a prompt (prefix) checkpoint needs to be loaded back without repeating flags."""

    architecture: str  # "chatglm" (ChatGLM-6B) or "chatglm2" (ChatGLM2/3)
    pre_seq_len: int
    prefix_projection: bool
    method: str = "ptuning_v2"
    base_model: str | None = None
    family: str | None = None  # "chatglm", "chatglm2" or "chatglm3" (the tokenizer/template family)
    quantization_bit: int = 0

    def save(self, folder: Path) -> None:
        text = json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"
        tmp = folder / (SETTINGS_FILE + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, folder / SETTINGS_FILE)

    @classmethod
    def load(cls, path: Path) -> "PromptSettings":
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: invalid JSON ({err})") from None
        known = {f.name for f in fields(cls)}
        missing = [name for name in ("architecture", "pre_seq_len", "prefix_projection") if name not in raw]
        if missing:
            raise CheckpointError(f"{path}: missing field(s) {', '.join(missing)}")
        return cls(**{k: v for k, v in raw.items() if k in known})


def save_prefix_checkpoint(state: dict[str, torch.Tensor], folder: str | os.PathLike, settings: PromptSettings) -> Path:
    """Write prefix tensors (official key names, fp32) as safetensors plus the settings file.

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
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{config_path}: invalid JSON ({err})") from None
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


def read_prefix_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], PromptSettings]:
    """Prefix tensors (official names) and settings of a prefix checkpoint, in either format.

    Accepts this toolkit's folders (model.safetensors + ptuning_config.json) and the official
    ones (pytorch_model.bin holding `transformer.prefix_encoder.*`, config.json beside it),
    and older official full-model checkpoints (whose weights include the prefix).
    """
    folder = require_folder(path, "P-tuning checkpoint")
    state: dict[str, torch.Tensor] = {}
    for _, shard in iter_weight_files(folder):
        state.update({k: v for k, v in shard.items() if k.startswith(PREFIX_KEY_PREFIX)})
    if not state:
        raise CheckpointError(f"{folder}: its weights hold no '{PREFIX_KEY_PREFIX}*' tensors: not a P-tuning checkpoint")
    settings_path = folder / SETTINGS_FILE
    settings = PromptSettings.load(settings_path) if settings_path.is_file() else _settings_from_official(folder, state)
    if settings.architecture not in (ARCH_GLM1, ARCH_GLM2):
        raise CheckpointError(f"{settings_path}: architecture must be {ARCH_GLM1!r} or {ARCH_GLM2!r}, found {settings.architecture!r}")
    return state, settings
