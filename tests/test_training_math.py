"""The loss convention of an optimizer step: the mean over every label token of the step.

Batch 4, batch 1 x gradient accumulation 4 and 2 ranks x batch 2 see the same four rows per
optimizer step (the Trainer's seeded sampler; accelerate gives the ranks consecutive batches of one
permutation), so they must log the same losses and train the same weights. The runs use the
Trainer's flags a user would: `--max_grad_norm 0 --dataloader_drop_last` and a fixed seed. Weights
are compared with plain SGD (`--optim sgd`), whose update is proportional to the gradient: AdamW
would hide a constant scale error.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from official_layout import REPO_ROOT, write_tiny_checkpoint
from safetensors.torch import load_file
from transformers import set_seed

from chatglm_ptuning.train import main

ADGEN_TRAIN = REPO_ROOT / "data_samples" / "adgen_train.json"
STEPS = 3
LAYOUTS = {
    "batch4": ("--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"),
    "batch1x4": ("--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4"),
}
METHOD_FLAGS = {
    "ptuning_v2": ("--pre_seq_len", "4"),
    "prefix_tuning": ("--method", "prefix_tuning", "--pre_seq_len", "4", "--encoder_hidden_size", "16"),
    "prompt_tuning": ("--method", "prompt_tuning", "--pre_seq_len", "4"),
    "ptuning": ("--method", "ptuning", "--pre_seq_len", "4", "--encoder_type", "mlp", "--encoder_hidden_size", "16"),
    "lora": ("--method", "lora", "--lora_rank", "4"),
    "full": ("--method", "full",),
}


def varied_length_rows(path: Path, count: int = 4 * STEPS) -> Path:
    """ADGEN rows whose answers are cut to very different lengths (2 to 40 characters), so the
    micro-batches of a step hold different numbers of label tokens: the mean of per-micro-batch means
    then differs from the mean over the step's tokens, and only the latter is the convention."""
    rows = json.loads(ADGEN_TRAIN.read_text()) if ADGEN_TRAIN.read_text().lstrip().startswith("[") else [
        json.loads(line) for line in ADGEN_TRAIN.read_text().splitlines() if line.strip()
    ]
    cut = [dict(row, summary=row["summary"][: 2 + (i * 13) % 39]) for i, row in enumerate(rows[:count])]
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in cut) + "\n", encoding="utf-8")
    return path


def _flags(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--do_train", "--train_file", str(varied_length_rows(output_dir.parent / "rows.jsonl")), "--prompt_column", "content", "--response_column", "summary",
        "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir), "--overwrite_output_dir",
        "--max_source_length", "24", "--max_target_length", "48", "--max_train_samples", str(4 * STEPS),
        "--max_steps", str(STEPS), "--save_steps", "1", "--logging_steps", "1", "--max_grad_norm", "0",
        "--dataloader_drop_last", "--seed", "7", "--optim", "sgd", "--learning_rate", "0.5",
        "--use_cpu", "--report_to", "none", *extra,
    ]


def logged_losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def trained_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every floating-point tensor a checkpoint holds (prefix, adapter or whole model)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(path))
    for path in sorted(checkpoint.glob("pytorch_model*.bin")):
        tensors.update(torch.load(path, map_location="cpu", weights_only=True))
    assert tensors, f"no weights in {checkpoint}"
    return {k: v.float() for k, v in tensors.items() if v.is_floating_point()}


def updates(output_dir: Path) -> dict[str, torch.Tensor]:
    """What the optimizer steps after the first changed: checkpoint-STEPS minus checkpoint-1."""
    first, last = trained_tensors(output_dir / "checkpoint-1"), trained_tensors(output_dir / f"checkpoint-{STEPS}")
    return {k: last[k] - first[k] for k in last}


def assert_same_training(run: Path, reference: Path) -> None:
    """Logged losses within 1e-4 relative; the weights after the first step and the later updates
    within 1e-4 relative of the reference's."""
    got, expected = logged_losses(run), logged_losses(reference)
    assert len(got) == len(expected) == STEPS, (got, expected)
    for a, b in zip(got, expected):
        assert abs(a - b) <= 1e-4 * abs(b), f"logged losses differ: {got} vs {expected}"
    first_got, first_expected = trained_tensors(run / "checkpoint-1"), trained_tensors(reference / "checkpoint-1")
    for name, update in updates(reference).items():
        scale = update.norm().item()
        assert scale > 0, f"{name} did not change"
        difference = (updates(run)[name] - update).norm().item()
        assert difference <= 1e-4 * scale, f"{name}: updates differ by {difference / scale:.2e} relative"
        step_one = (first_got[name] - first_expected[name]).norm().item()
        assert step_one <= 1e-4 * scale, f"{name}: weights after step 1 differ by {step_one / scale:.2e} of an update"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, shared_tokenizers):
    root = tmp_path_factory.mktemp("math-models")
    return {arch: write_tiny_checkpoint(root / arch, arch, seed=11) for arch in ("chatglm2", "chatglm")}


def _train(model_dir: Path, output_dir: Path, *extra: str) -> Path:
    assert main(_flags(model_dir, output_dir, *extra)) == 0
    return output_dir


def _layouts_agree(model_dirs, tmp_path, arch: str, *extra: str) -> None:
    runs = {name: _train(model_dirs[arch], tmp_path / name, *layout, *extra) for name, layout in LAYOUTS.items()}
    assert_same_training(runs["batch1x4"], runs["batch4"])


def test_accumulation_changes_nothing_ptuning_v2(model_dirs, tmp_path):
    _layouts_agree(model_dirs, tmp_path, "chatglm2", *METHOD_FLAGS["ptuning_v2"])


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHOD_FLAGS))
@pytest.mark.parametrize("arch", ["chatglm2", "chatglm"])
def test_accumulation_changes_nothing_for_every_method(model_dirs, tmp_path, arch, method):
    if (arch, method) == ("chatglm2", "ptuning_v2"):
        pytest.skip("covered by test_accumulation_changes_nothing_ptuning_v2")
    _layouts_agree(model_dirs, tmp_path, arch, *METHOD_FLAGS[method])


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [("--quantization_bit", "4"), ("--quantization_bit", "8"), ("--gradient_checkpointing", "False")],
    ids=["int4", "int8", "no-checkpointing"],
)
def test_accumulation_changes_nothing_quantized_and_without_checkpointing(model_dirs, tmp_path, extra):
    _layouts_agree(model_dirs, tmp_path, "chatglm2", *METHOD_FLAGS["ptuning_v2"], *extra)
