"""The tuning methods side by side: how a model is set up for each, and how each saves and
restores its trainable weights.

| method | trains | checkpoint folder |
|---|---|---|
| ptuning_v2, prefix_tuning, prompt_tuning, ptuning | the soft-prompt encoder (prompt_learning.py) | `model.safetensors` (encoder tensors) + `ptuning_config.json` |
| lora | PEFT LoRA adapters (lora.py) | PEFT's `adapter_config.json` + `adapter_model.safetensors` + `ptuning_config.json` |
| full | every weight | the whole model under the official key names + config.json (the Trainer's save) |

`ptuning_config.json` (checkpoint.PromptSettings) names the method, so loading one method's
checkpoint as another is caught before any weight is read. A full fine-tuning checkpoint is a
model folder: load it as the model itself (or as `ptuning_checkpoint` with method "full").
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .checkpoint import CheckpointError, PromptSettings, read_prefix_checkpoint
from .prompt_learning import INPUT_PROMPT_METHODS, METHODS, SOFT_PROMPT_METHODS, PromptEmbedding


class MethodError(ValueError):
    """Settings that do not fit the chosen method (a usage error; the message says which)."""


def resolve_method(method: str | None, checkpoint: PromptSettings | None, pre_seq_len: int | None, where: str) -> str | None:
    """The method to load: the one asked for (which must be the checkpoint's), else the
    checkpoint's, else ptuning_v2 when only `pre_seq_len` is given (the reference's meaning),
    else None (the model as its folder describes it)."""
    if method is not None and method not in METHODS:
        raise MethodError(f"method must be one of {', '.join(METHODS)}, found {method!r}")
    if checkpoint is not None:
        if method is not None and method != checkpoint.method:
            raise CheckpointError(
                f"{where} holds a {checkpoint.method} checkpoint; it cannot be loaded as {method} "
                f"(pass method={checkpoint.method!r} or leave the method out)"
            )
        return checkpoint.method
    if method is None and pre_seq_len is not None:
        return "ptuning_v2"
    return method


def soft_prompt_settings(
    architecture: str,
    checkpoint: PromptSettings | None,
    method: str,
    pre_seq_len: int | None,
    prefix_projection: bool | None,
    encoder_type: str | None,
    encoder_hidden_size: int | None,
    where: str,
) -> PromptSettings:
    """The soft-prompt settings to build: the checkpoint's (every flag given must agree with it),
    else the flags'. `prefix_projection` None means "not given"; prefix_tuning always projects.
    """
    if prefix_projection and method in INPUT_PROMPT_METHODS:
        raise MethodError(f"prefix_projection applies to ptuning_v2 (and is always on for prefix_tuning), not to {method}")
    if method == "prefix_tuning":
        prefix_projection = True
    if checkpoint is None:
        if pre_seq_len is None:
            raise MethodError(f"method {method} needs pre_seq_len, the number of virtual tokens (e.g. 128)")
        requested = PromptSettings(
            architecture,
            pre_seq_len,
            bool(prefix_projection),
            method=method,
            encoder_type=(encoder_type or "lstm") if method == "ptuning" else encoder_type,
            encoder_hidden_size=encoder_hidden_size,
        )
        try:
            return requested.check("requested settings")
        except CheckpointError as err:
            raise MethodError(str(err)) from None
    if checkpoint.architecture is not None and checkpoint.architecture != architecture:
        raise CheckpointError(
            f"{where} was trained on a {checkpoint.architecture!r} model but the base model is {architecture!r} "
            "(ChatGLM-6B prefixes and ChatGLM2/3 prefixes are not interchangeable)"
        )
    asked = {
        "pre_seq_len": pre_seq_len,
        "prefix_projection": None if prefix_projection is None else bool(prefix_projection),
        "encoder_type": encoder_type,
        "encoder_hidden_size": encoder_hidden_size,
    }
    for name, value in asked.items():
        stored = getattr(checkpoint, name)
        if value is not None and value != stored:
            raise CheckpointError(f"{where} has {name} {stored} but {name} {value} was asked for")
    return checkpoint


def soft_prompt_encoder(model: nn.Module) -> nn.Module:
    """The soft-prompt encoder of a ChatGLM LM: `transformer.prefix_encoder` or `transformer.prompt_encoder`."""
    inner = model.transformer
    encoder = getattr(inner, "prefix_encoder", None) or getattr(inner, "prompt_encoder", None)
    if encoder is None:
        raise ValueError("the model has no soft prompt (config.pre_seq_len is not set)")
    return encoder


def init_new_soft_prompt(model: nn.Module) -> None:
    """Initialise a soft prompt that no checkpoint filled: PyTorch's defaults (the official prefix
    init), and for Prompt Tuning the embeddings of sampled vocabulary tokens (Lester et al.)."""
    encoder = soft_prompt_encoder(model)
    encoder.reset_parameters()
    if isinstance(encoder, PromptEmbedding):
        encoder.init_from_vocabulary(model.get_input_embeddings().weight)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def load_method_state(model: nn.Module, folder: str | os.PathLike, settings: PromptSettings) -> None:
    """Put a soft-prompt or LoRA checkpoint's trainable weights back into a model set up for the
    same method (resuming a run). Full fine-tuning resumes through the Trainer's own loader."""
    folder = Path(folder)
    try:
        if settings.method == "lora":
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            result = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
            unexpected = getattr(result, "unexpected_keys", None)
        elif settings.method in SOFT_PROMPT_METHODS:
            unexpected = model.load_state_dict(read_prefix_checkpoint(folder)[0], strict=False).unexpected_keys
        else:
            raise ValueError(f"{folder}: a {settings.method} checkpoint is not restored by load_method_state")
    except RuntimeError as err:  # load_state_dict's "size mismatch for ...": other method settings
        mismatch = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err).splitlines()[0])
        raise CheckpointError(
            f"{folder}: its weights do not fit the model set up from the command line ({mismatch}); "
            f"use the checkpoint's settings ({folder / 'ptuning_config.json'})"
        ) from None
    if unexpected:
        raise CheckpointError(f"{folder}: tensors not in the model: {sorted(unexpected)[:5]}")
