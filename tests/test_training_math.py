"""The loss convention of an optimizer step: the mean over every label token of the step.

Batch 4, batch 1 x gradient accumulation 4 and 2 ranks x batch 2 see the same four rows per
optimizer step (the Trainer's seeded sampler; accelerate gives the ranks consecutive batches of one
permutation), so they must log the same losses and train the same weights. The runs use the
Trainer's flags a user would: `--max_grad_norm 0 --dataloader_drop_last` and a fixed seed. Weights
are compared with plain SGD (`--optim sgd`), whose update is proportional to the gradient: AdamW
would hide a constant scale error.
"""

from __future__ import annotations

import importlib.util
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
    "lora": ("--method", "lora", "--lora_rank", "4", "--lora_dropout", "0"),  # PEFT's dropout draws per micro-batch
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
    expected_updates, got_updates = updates(reference), updates(run)
    trained = {name for name, update in expected_updates.items() if update.norm() > 0}  # full: not the buffers
    assert trained, "no weight changed"
    for name in expected_updates:
        scale = expected_updates[name].norm().item() if name in trained else 1.0
        # fp32 rounding of the weights themselves: batches of other widths round their matmuls differently,
        # which shows where an update is near the weights' own resolution (a few ulps of |w|)
        rounding = 1e-6 * first_expected[name].norm().item()
        difference = (got_updates[name] - expected_updates[name]).norm().item()
        assert difference <= 1e-4 * scale + rounding, f"{name}: updates differ by {difference / scale:.2e} relative"
        step_one = (first_got[name] - first_expected[name]).norm().item()
        assert step_one <= 1e-4 * scale + rounding, f"{name}: weights after step 1 differ by {step_one / scale:.2e} of an update"


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
@pytest.mark.parametrize(
    "arch,method",
    # chatglm2 + ptuning_v2 is the fast test above
    [(arch, method) for arch in ("chatglm2", "chatglm") for method in sorted(METHOD_FLAGS) if (arch, method) != ("chatglm2", "ptuning_v2")],
)
def test_accumulation_changes_nothing_for_every_method(model_dirs, tmp_path, arch, method):
    _layouts_agree(model_dirs, tmp_path, arch, *METHOD_FLAGS[method])


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [("--quantization_bit", "4"), ("--quantization_bit", "8"), ("--gradient_checkpointing", "False")],
    ids=["int4", "int8", "no-checkpointing"],
)
def test_accumulation_changes_nothing_quantized_and_without_checkpointing(model_dirs, tmp_path, extra):
    _layouts_agree(model_dirs, tmp_path, "chatglm2", *METHOD_FLAGS["ptuning_v2"], *extra)


def _direct_token_mean(model_dir: Path, rows: Path, *, seed: int = 7) -> float:
    """The mean next-token loss over every label token of `rows`, computed row by row with the model
    as train.py builds it (same seed, fresh prefix), in eval mode (no prefix dropout)."""
    from chatglm_ptuning.arguments import DataTrainingArguments
    from chatglm_ptuning.data import build_preprocess_function, load_rows
    from chatglm_ptuning.loading import load_model

    data_args = DataTrainingArguments(
        train_file=str(rows), prompt_column="content", response_column="summary", max_source_length=24, max_target_length=48
    )
    set_seed(seed)
    model, tokenizer = load_model(model_dir, pre_seq_len=4, device="cpu")
    model.eval()
    features = load_rows(rows, data_args).to_dataset().map(
        build_preprocess_function(tokenizer, data_args, train=True), batched=True, remove_columns=["content", "summary"]
    )
    summed, count = 0.0, 0
    with torch.no_grad():
        for row in features:
            labels = torch.tensor([row["labels"]])
            tokens = int((labels[:, 1:] != -100).sum())
            loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss
            summed, count = summed + loss.item() * tokens, count + tokens
    return summed / count


def test_logged_loss_is_the_token_mean_not_scaled_by_accumulation(model_dirs, tmp_path):
    """One optimizer step over all four rows (batch 1 x accumulation 4): the logged loss is the mean over
    the four rows' label tokens, as computed directly (up to the prefix dropout that training applies)."""
    out = _train(model_dirs["chatglm2"], tmp_path / "run", *LAYOUTS["batch1x4"], "--pre_seq_len", "4", "--max_train_samples", "4", "--max_steps", "1")
    expected = _direct_token_mean(model_dirs["chatglm2"], tmp_path / "rows.jsonl")
    (logged,) = logged_losses(out)
    assert abs(logged - expected) <= 0.03 * expected, f"logged {logged}, token mean {expected}"


def test_eval_loss_is_the_token_mean_whatever_the_batch_size(model_dirs, tmp_path):
    rows = varied_length_rows(tmp_path / "rows.jsonl")
    eval_losses = []
    for batch_size in ("1", "3"):
        out = tmp_path / f"eval{batch_size}"
        flags = [
            "--do_eval", "--validation_file", str(rows), "--prompt_column", "content", "--response_column", "summary",
            "--model_name_or_path", str(model_dirs["chatglm2"]), "--output_dir", str(out), "--pre_seq_len", "4",
            "--max_source_length", "24", "--max_target_length", "48", "--per_device_eval_batch_size", batch_size,
            "--seed", "7", "--use_cpu", "--report_to", "none",
        ]
        assert main(flags) == 0
        eval_losses.append(json.loads((out / "eval_results.json").read_text())["eval_loss"])
    expected = _direct_token_mean(model_dirs["chatglm2"], rows)
    for got in eval_losses:
        assert abs(got - expected) <= 1e-5 * expected, f"eval_loss {eval_losses}, token mean {expected}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(model_dir: Path, output_dir: Path, *extra: str) -> Path:
    """Two gloo ranks on the CPU, as a user launches them."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "chatglm_ptuning.train", *_flags(model_dir, output_dir, *extra), "--ddp_backend", "gloo",
    ]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert (output_dir / "checkpoint-1" / "rng_state_1.pth").is_file(), "the run did not have 2 ranks"
    return output_dir


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["chatglm2", "chatglm"])
def test_two_ranks_change_nothing(model_dirs, tmp_path, arch):
    """2 gloo ranks x batch 2 == 1 process x batch 4, prefix dropout included (its masks are keyed by row and step)."""
    extra = (*METHOD_FLAGS["ptuning_v2"],)
    reference = _train(model_dirs[arch], tmp_path / "batch4", *LAYOUTS["batch4"], *extra)
    ranks = _torchrun(model_dirs[arch], tmp_path / "ranks2", "--per_device_train_batch_size", "2", *extra)
    assert_same_training(ranks, reference)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (pip install 'chatglm-ptuning[deepspeed]')")
@pytest.mark.parametrize("config", ["ds_zero2.json", "ds_zero3.json"])
def test_deepspeed_two_ranks_change_nothing(model_dirs, tmp_path, config):
    """ZeRO-2/3 with 2 ranks x batch 2 (fp32: DeepSpeed does not run fp16 on the CPU) == batch 4."""
    extra = (*METHOD_FLAGS["ptuning_v2"],)
    reference = _train(model_dirs["chatglm2"], tmp_path / "batch4", *LAYOUTS["batch4"], *extra)
    deepspeed = str(REPO_ROOT / "scripts" / config)
    ranks = _torchrun(model_dirs["chatglm2"], tmp_path / "zero", "--per_device_train_batch_size", "2", "--deepspeed", deepspeed, *extra)
    assert_same_training(ranks, reference)


@pytest.mark.parametrize("arch", ["chatglm2", "chatglm"])
def test_one_forward_skeleton_for_both_families(model_dirs, arch):
    """Both LM classes take the same causal-LM arguments: hidden states (every layer's input plus the
    final one), tuple output, the old `past_key_values` name, and `num_items_in_batch` dividing the
    summed loss."""
    from transformers.cache_utils import DynamicCache

    from chatglm_ptuning.loading import load_model

    model, _ = load_model(model_dirs[arch], device="cpu")
    assert type(model).accepts_loss_kwargs is True
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]]) if arch == "chatglm2" else None
    if ids is None:  # ChatGLM-6B needs its [gMASK] <sop> layout
        config = model.config
        ids = torch.tensor([[5, 6, 7, config.gmask_token_id, config.bos_token_id, 9]])
    labels = ids.clone()
    with torch.no_grad():
        out = model(ids, labels=labels, output_hidden_states=True)
        assert len(out.hidden_states) == model.config.num_layers + 1
        assert all(h.shape == (1, ids.shape[1], model.config.hidden_size) for h in out.hidden_states)
        summed = model(ids, labels=labels, num_items_in_batch=1).loss
        torch.testing.assert_close(summed, out.loss * (ids.shape[1] - 1))
        halved = model(ids, labels=labels, num_items_in_batch=2 * (ids.shape[1] - 1)).loss
        torch.testing.assert_close(halved, out.loss / 2)
        as_tuple = model(ids, labels=labels, return_dict=False, use_cache=False)
        assert torch.equal(as_tuple[0], out.loss)
        cache = DynamicCache(config=model.config)
        assert model(ids, past_key_values=cache, use_cache=True).cache is cache
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids, output_attentions=True)
