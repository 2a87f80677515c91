"""The training/evaluation CLI end to end on tiny official-layout models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from official_layout import REPO_ROOT, write_tiny_checkpoint
from safetensors.torch import load_file

from chatglm_ptuning.train import main

ADGEN_TRAIN = str(REPO_ROOT / "data_samples" / "adgen_train.json")
ADGEN_DEV = str(REPO_ROOT / "data_samples" / "adgen_dev.json")


def _train_args(model_dir, output_dir, *extra):
    return [
        "--do_train", "--train_file", ADGEN_TRAIN, "--prompt_column", "content", "--response_column", "summary",
        "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir), "--overwrite_output_dir",
        "--max_source_length", "32", "--max_target_length", "32", "--per_device_train_batch_size", "2",
        "--logging_steps", "1", "--learning_rate", "3e-2", "--pre_seq_len", "4", "--report_to", "none", *extra,
    ]


def _losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch,extra",
    [("chatglm2", []), ("chatglm", ["--prefix_projection"]), ("chatglm2", ["--quantization_bit", "4"])],
    ids=["chatglm2", "chatglm6b-projection", "chatglm2-int4"],
)
def test_ptuning_end_to_end_saves_only_the_prefix_and_learns(tmp_path, arch, extra, shared_tokenizers):
    model_dir = write_tiny_checkpoint(tmp_path / "model", arch)
    out = tmp_path / "out"
    # Four rows seen again and again: the prefix must fit them (the loss falls). A random frozen
    # backbone this small leaves the prefix little to steer, so the fall is small but steady.
    args = _train_args(model_dir, out, "--max_train_samples", "4", "--max_steps", "24", "--save_steps", "100")
    code = main([*args, "--learning_rate", "0.3", *extra])
    assert code == 0
    losses = _losses(out)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1, losses
    checkpoint = out / "checkpoint-24"  # written although save_steps never came round
    assert (checkpoint / "trainer_state.json").is_file() and (out / "loss_curve.png").is_file()
    prefix = load_file(checkpoint / "model.safetensors")
    assert all(key.startswith("transformer.prefix_encoder.") for key in prefix)
    assert all(t.dtype == torch.float32 for t in prefix.values())
    settings = json.loads((checkpoint / "ptuning_config.json").read_text())
    assert settings["architecture"] == arch and settings["pre_seq_len"] == 4
    assert settings["quantization_bit"] == (4 if "--quantization_bit" in extra else 0)
    results = json.loads((out / "train_results.json").read_text())
    assert {"train_loss", "train_runtime", "train_samples", "epoch"} <= set(results)


@pytest.mark.slow
def test_predict_writes_reference_outputs_independent_of_batch_size(tmp_path, tiny_glm2_dir):
    out = tmp_path / "train"
    assert main(_train_args(tiny_glm2_dir, out, "--max_train_samples", "4", "--max_steps", "2")) == 0
    predictions = {}
    for batch_size in ("1", "3"):
        pred_dir = tmp_path / f"pred{batch_size}"
        code = main([
            "--do_predict", "--test_file", ADGEN_DEV, "--prompt_column", "content", "--response_column", "summary",
            "--model_name_or_path", str(tiny_glm2_dir), "--ptuning_checkpoint", str(out / "checkpoint-2"),
            "--output_dir", str(pred_dir), "--max_source_length", "48", "--max_target_length", "12",
            "--per_device_eval_batch_size", batch_size, "--predict_with_generate", "--max_predict_samples", "5",
            "--do_sample", "False", "--report_to", "none",
        ])
        assert code == 0
        lines = (pred_dir / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
        assert len(lines) == 5
        rows = [json.loads(line) for line in lines]
        assert all(list(row) == ["labels", "predict"] for row in rows)
        predictions[batch_size] = rows
        results = json.loads((pred_dir / "predict_results.json").read_text())
        assert {"predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_bleu-4", "predict_samples"} <= set(results)
    assert predictions["1"] == predictions["3"]


@pytest.mark.slow
def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(tmp_path, tiny_glm2_dir):
    common = ["--max_train_samples", "16", "--max_steps", "8", "--save_steps", "4", "--gradient_accumulation_steps", "2"]
    straight = tmp_path / "straight"
    assert main(_train_args(tiny_glm2_dir, straight, *common)) == 0

    interrupted = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "chatglm_ptuning.train", *_train_args(tiny_glm2_dir, interrupted, *common)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (interrupted / "checkpoint-4" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # a crash: no chance to clean up
    proc.wait()
    assert not (interrupted / "checkpoint-8").exists(), "the run finished before it could be interrupted"

    resumed_args = [a for a in _train_args(tiny_glm2_dir, interrupted, *common) if a != "--overwrite_output_dir"]
    assert main([*resumed_args, "--resume_from_checkpoint", "True"]) == 0
    expected = load_file(straight / "checkpoint-8" / "model.safetensors")
    got = load_file(interrupted / "checkpoint-8" / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)


def test_existing_checkpoints_are_not_overwritten_silently(tmp_path, tiny_glm2_dir, capsys):
    out = tmp_path / "out"
    assert main(_train_args(tiny_glm2_dir, out, "--max_train_samples", "2", "--max_steps", "1")) == 0
    args = [a for a in _train_args(tiny_glm2_dir, out, "--max_train_samples", "2", "--max_steps", "1") if a != "--overwrite_output_dir"]
    assert main(args) == 1
    assert "already holds" in capsys.readouterr().err


def test_half_written_checkpoint_is_never_taken_for_complete(tmp_path):
    from chatglm_ptuning.trainer import last_complete_checkpoint

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()  # killed mid-write: weights but no trainer state
    (tmp_path / "checkpoint-4" / "model.safetensors").write_bytes(b"")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")


def test_bad_data_is_one_clear_error_line(tmp_path, tiny_glm2_dir, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"content": "类型#裤", "summary": "好看"}\n{"content": 3, "summary": "x"}\n', encoding="utf-8")
    args = _train_args(tiny_glm2_dir, tmp_path / "out", "--max_steps", "1")
    args[args.index(ADGEN_TRAIN)] = str(bad)
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and f"{bad}:2" in err[0] and "content" in err[0]


def test_unsupported_file_type_is_a_usage_error(tmp_path, tiny_glm2_dir, capsys):
    args = _train_args(tiny_glm2_dir, tmp_path / "out")
    args[args.index(ADGEN_TRAIN)] = str(tmp_path / "train.csv")
    assert main(args) == 2
    assert "expected a .json or .jsonl file" in capsys.readouterr().err


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_glm2_dir, capsys, monkeypatch):
    import chatglm_ptuning.train as train_module
    from chatglm_ptuning.trainer import LossPlotCallback

    class PoisonAfterStep3(LossPlotCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            if state.global_step == 3:  # step 4 starts after checkpoint-2 was saved
                model.transformer.prefix_encoder.embedding.weight.data.fill_(float("nan"))

    monkeypatch.setattr(train_module, "LossPlotCallback", PoisonAfterStep3)
    out = tmp_path / "out"
    code = main(_train_args(tiny_glm2_dir, out, "--max_train_samples", "8", "--max_steps", "5", "--save_steps", "2"))
    err = capsys.readouterr().err
    assert code == 1
    assert "loss became nan at step 4" in err and f"Last usable checkpoint: {out / 'checkpoint-2'}" in err
    state = load_file(out / "checkpoint-2" / "model.safetensors")
    assert torch.isfinite(state["transformer.prefix_encoder.embedding.weight"]).all()
    assert not (out / "checkpoint-4").exists()
