"""A run owns its output folder; no non-finite checkpoint; one clear error for every fault.

Each test trains a few steps of a tiny ChatGLM2-layout model (or the embedded one) in-process.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from official_layout import REPO_ROOT
from safetensors.torch import load_file

import chatglm_ptuning.train as train_module
from chatglm_ptuning.checkpoint import CheckpointError, read_checkpoint_settings
from chatglm_ptuning.data import DataError, read_json_records
from chatglm_ptuning.train import main
from chatglm_ptuning.trainer import LossPlotCallback, last_complete_checkpoint

ADGEN_TRAIN = str(REPO_ROOT / "data_samples" / "adgen_train.json")
EMBEDDED = str(REPO_ROOT / "chatglm_ptuning" / "embedded")
LOCK_FILE = ".run.lock"  # run_folder.LOCK_FILE


def _args(model_dir, output_dir, *extra, overwrite=True):
    args = [
        "--do_train", "--train_file", ADGEN_TRAIN, "--prompt_column", "content", "--response_column", "summary",
        "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir),
        "--max_source_length", "32", "--max_target_length", "32", "--per_device_train_batch_size", "2",
        "--max_train_samples", "8", "--logging_steps", "1", "--learning_rate", "3e-2", "--pre_seq_len", "4",
        "--report_to", "none", *extra,
    ]  # fmt: skip
    return [*args, "--overwrite_output_dir"] if overwrite else args


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line[line.index("error: ") :] for line in re.split(r"[\r\n]", err) if "error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


def _all_finite(folder: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values())


@pytest.fixture
def no_model_load(monkeypatch):
    """Checks that must come before the model loads: loading fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(train_module, "load_model", refuse)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_glm2_dir):
    """A finished run with checkpoint-2 and checkpoint-4 (pre_seq_len 4)."""
    out = tmp_path_factory.mktemp("trained") / "out"
    assert main(_args(tiny_glm2_dir, out, "--max_steps", "4", "--save_steps", "2")) == 0
    return out


def _copy(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    return out


# ------------------------------------------------------------------------- a run owns its folder


def test_rerun_with_overwrite_removes_the_earlier_runs_outputs_only(tmp_path, tiny_glm2_dir, trained, capsys, caplog):
    out = _copy(trained, tmp_path)
    (out / "my_notes.txt").write_text("mine")
    (out / "checkpoint-notes").mkdir()
    first = load_file(out / "checkpoint-2" / "model.safetensors")
    capsys.readouterr()
    assert main(_args(tiny_glm2_dir, out, "--max_steps", "2", "--save_steps", "2", "--learning_rate", "5e-3")) == 0
    assert f"checkpoint written to {out / 'checkpoint-2'}" in capsys.readouterr().out
    assert not (out / "checkpoint-4").exists()  # the earlier run's: gone, not served or resumed
    assert last_complete_checkpoint(out) == str(out / "checkpoint-2")
    second = load_file(out / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(first[k], second[k]) for k in first)
    recorded = json.loads((out / "checkpoint-2" / "run_settings.json").read_text())
    assert recorded["learning_rate"] == 5e-3 and recorded["pre_seq_len"] == 4
    assert (out / "my_notes.txt").read_text() == "mine" and (out / "checkpoint-notes").is_dir()
    assert "my_notes.txt" in caplog.text and "checkpoint-4" in caplog.text


def test_without_overwrite_a_folder_holding_checkpoints_is_refused(tmp_path, tiny_glm2_dir, trained, capsys, no_model_load):
    out = _copy(trained, tmp_path)
    assert main(_args(tiny_glm2_dir, out, "--max_steps", "2", overwrite=False)) == 1
    assert "already holds" in _error_line(capsys)
    assert (out / "checkpoint-4").is_dir()


@pytest.mark.parametrize(
    "change,expected",
    [
        (["--pre_seq_len", "8"], "pre_seq_len: checkpoint 4, command line 8"),
        (["--prefix_projection"], "prefix_projection: checkpoint False, command line True"),
        (["--gradient_accumulation_steps", "2"], "gradient_accumulation_steps: checkpoint 1, command line 2"),
        (["--seed", "7"], "seed: checkpoint 42, command line 7"),
        (["--train_file", "OTHER"], "train_data_sha256: checkpoint"),
    ],
    ids=["pre_seq_len", "projection", "accumulation", "seed", "data"],
)
def test_resume_with_other_settings_is_refused_before_the_model_loads(
    tmp_path, tiny_glm2_dir, trained, capsys, no_model_load, change, expected
):
    out = _copy(trained, tmp_path)
    if change[-1] == "OTHER":
        other = tmp_path / "other.json"
        other.write_text('{"content": "类型#裤", "summary": "好看"}\n', encoding="utf-8")
        change = [change[0], str(other)]
    args = _args(tiny_glm2_dir, out, "--max_steps", "6", "--resume_from_checkpoint", "True")
    args = [*args, *change]
    if change[0] == "--pre_seq_len":
        args = args[: args.index("--pre_seq_len")] + args[args.index("--pre_seq_len") + 2 :]
    elif change[0] == "--train_file":
        args = args[: args.index("--train_file")] + args[args.index("--train_file") + 2 :]
    assert main(args) == 1
    error = _error_line(capsys)
    assert expected in error and str(out / "checkpoint-4") in error
    assert "--overwrite_output_dir" in error  # how to start afresh
    assert not (out / LOCK_FILE).exists()


def test_resume_of_a_checkpoint_without_run_settings_never_gives_a_size_mismatch_traceback(tmp_path, tiny_glm2_dir, trained, capsys):
    out = _copy(trained, tmp_path)
    (out / "checkpoint-4" / "run_settings.json").unlink()  # as written before run settings were recorded
    args = _args(tiny_glm2_dir, out, "--max_steps", "6", "--resume_from_checkpoint", "True")
    args[args.index("--pre_seq_len") + 1] = "8"
    assert main(args) == 1
    error = _error_line(capsys)
    assert "do not fit" in error and "size mismatch" in error and str(out / "checkpoint-4") in error


# ---------------------------------------------------------------------- no non-finite checkpoint


@pytest.mark.parametrize("max_grad_norm", ["1.0", "0"])
def test_a_non_finite_gradient_with_a_finite_loss_stops_before_the_update(tmp_path, tiny_glm2_dir, capsys, monkeypatch, max_grad_norm):
    class NanGradientAtStep3(LossPlotCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            if state.global_step == 2:
                model.transformer.prefix_encoder.embedding.weight.register_hook(lambda grad: grad * float("nan"))

    monkeypatch.setattr(train_module, "LossPlotCallback", NanGradientAtStep3)
    out = tmp_path / "out"
    args = _args(tiny_glm2_dir, out, "--max_steps", "5", "--save_steps", "1", "--max_grad_norm", max_grad_norm)
    assert main(args) == 1
    error = _error_line(capsys)
    assert "gradient norm became nan at step 3" in error
    # checkpoint-2 holds the weights that step 3 started from: set aside; checkpoint-1 is offered.
    assert f"Last usable checkpoint: {out / 'checkpoint-1'}" in error
    assert (out / "checkpoint-2-diverged").is_dir() and not (out / "checkpoint-3").exists()
    assert last_complete_checkpoint(out) == str(out / "checkpoint-1")
    for folder in out.glob("checkpoint-*"):
        assert _all_finite(folder), folder


def test_a_non_finite_weight_is_never_saved(tmp_path, tiny_glm2_dir, capsys, monkeypatch):
    class PoisonAfterTheStep(LossPlotCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            if state.global_step == 2:
                model.transformer.prefix_encoder.embedding.weight.data[0, 0] = float("inf")

    monkeypatch.setattr(train_module, "LossPlotCallback", PoisonAfterTheStep)
    out = tmp_path / "out"
    assert main(_args(tiny_glm2_dir, out, "--max_steps", "4", "--save_steps", "1")) == 1
    error = _error_line(capsys)
    assert "prefix_encoder.embedding.weight are not finite" in error and f"{out / 'checkpoint-1'}" in error
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"] and not (out / ".staging").exists()


@pytest.mark.slow
def test_divergence_at_a_huge_learning_rate_leaves_only_finite_checkpoints_and_a_resume_works(tmp_path, capsys):
    out = tmp_path / "out"
    args = _args(EMBEDDED, out, "--max_steps", "12", "--save_steps", "1", "--per_device_train_batch_size", "8",
                 "--prefix_projection", "--pre_seq_len", "16", "--max_train_samples", "96")  # fmt: skip
    args[args.index("--learning_rate") + 1] = "1e6"
    assert main(args) == 1
    error = _error_line(capsys)
    assert "became" in error and "Last usable checkpoint:" in error
    left = sorted(out.glob("checkpoint-*"))
    assert left, "no checkpoint before the divergence"
    for folder in left:
        assert _all_finite(folder), folder
    named = error.split("Last usable checkpoint: ")[1].split(";")[0]
    assert named == last_complete_checkpoint(out)
    resume = [*args, "--resume_from_checkpoint", named]
    resume[resume.index("--learning_rate") + 1] = "5e-3"
    resume[resume.index("--save_steps") + 1] = "4"  # the command line's, not the checkpoint's run's
    assert main(resume) == 0
    assert f"checkpoint written to {out / 'checkpoint-12'}" in capsys.readouterr().out
    written = {int(m.group(1)) for p in out.iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))}
    assert {s for s in written if s > int(named.rsplit("-", 1)[1])} == {s for s in (4, 8, 12) if s > int(named.rsplit("-", 1)[1])}
    for folder in out.glob("checkpoint-*"):
        assert _all_finite(folder), folder
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["log_history"][-1]["learning_rate"] < 5e-3  # the lower rate was applied (linear decay)


# ------------------------------------------------------------------------ filesystem faults


def test_an_unwritable_output_folder_is_one_error_before_the_model_loads(tmp_path, tiny_glm2_dir, capsys, no_model_load):
    if os.geteuid() == 0:  # root writes through file modes: /sys is read-only for everyone
        target = Path("/sys/kernel")
        if not target.is_dir() or os.access(target, os.W_OK) and _writable(target):
            pytest.skip("no read-only folder available")
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o555)
    assert main(_args(tiny_glm2_dir, target, "--max_steps", "1")) == 1
    error = _error_line(capsys)
    assert f"--output_dir {target}: not writable" in error


def _writable(folder: Path) -> bool:
    try:
        (folder / ".probe").write_bytes(b"")
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


def test_low_free_space_is_warned_before_training(tmp_path, tiny_glm2_dir, monkeypatch, caplog):
    import chatglm_ptuning.run_folder as run_folder

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda path: usage._replace(free=100_000))
    assert main(_args(tiny_glm2_dir, tmp_path / "out", "--max_steps", "1")) == 0
    assert "0.1 MB free" in caplog.text and "full disk" in caplog.text


@pytest.mark.parametrize("where", ["weights", "optimizer"])
def test_a_full_disk_during_a_save_keeps_earlier_checkpoints_and_leaves_no_staging(tmp_path, tiny_glm2_dir, capsys, monkeypatch, where):
    import chatglm_ptuning.checkpoint as checkpoint_module
    import transformers.trainer as hf_trainer

    calls = {"n": 0}

    def fail_on_the_second_save(real):
        def save(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                if where == "weights":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[1]))
                raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed")
            return real(*args, **kwargs)

        return save

    if where == "weights":
        monkeypatch.setattr(checkpoint_module, "save_file", fail_on_the_second_save(checkpoint_module.save_file))
    else:
        real_save = torch.save

        def optimizer_save(obj, path, *args, **kwargs):  # noqa: ANN001
            if str(path).endswith("optimizer.pt"):
                return fail_on_the_second_save(real_save)(obj, path, *args, **kwargs)
            return real_save(obj, path, *args, **kwargs)

        monkeypatch.setattr(hf_trainer.torch, "save", optimizer_save)
    out = tmp_path / "out"
    assert main(_args(tiny_glm2_dir, out, "--max_steps", "4", "--save_steps", "2")) == 1
    error = _error_line(capsys)
    assert "writing checkpoint-4" in error and f"last complete checkpoint is {out / 'checkpoint-2'}" in error
    assert ("No space left on device" if where == "weights" else "file write failed") in error
    assert not (out / ".staging").exists() and not (out / "checkpoint-4").exists() and not (out / LOCK_FILE).exists()
    assert _all_finite(out / "checkpoint-2")
    monkeypatch.undo()
    resumed = _args(tiny_glm2_dir, out, "--max_steps", "4", "--save_steps", "2", "--resume_from_checkpoint", "True")
    assert main(resumed) == 0


def test_a_folder_in_use_by_a_live_run_is_refused_and_a_stale_lock_taken_over(tmp_path, tiny_glm2_dir, capsys, monkeypatch):
    import socket

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        monkeypatch.setattr(train_module, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
        assert main(_args(tiny_glm2_dir, out, "--max_steps", "1")) == 1
        error = _error_line(capsys)
        assert f"in use by another training run (process {holder.pid}" in error and str(out / LOCK_FILE) in error
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.undo()
    assert main(_args(tiny_glm2_dir, out, "--max_steps", "1")) == 0  # the holder is gone: a stale lock
    assert not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_two_runs_into_one_folder_and_a_resume_after_kill_9(tmp_path, tiny_glm2_dir, capsys):
    out = tmp_path / "out"
    common = ["--max_steps", "400", "--save_steps", "2"]
    first = subprocess.Popen(
        [sys.executable, "-m", "chatglm_ptuning.train", *_args(tiny_glm2_dir, out, *common)],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 300
    while not (out / "checkpoint-2" / "trainer_state.json").exists():
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    assert main(_args(tiny_glm2_dir, out, *common)) == 1
    assert f"process {first.pid}" in _error_line(capsys)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert (out / LOCK_FILE).exists()  # left behind by the killed run
    assert main(_args(tiny_glm2_dir, out, "--max_steps", "6", "--save_steps", "2", "--resume_from_checkpoint", "True")) == 0
    assert f"checkpoint written to {out / 'checkpoint-6'}" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth", "trainer_state.json", "model.safetensors"])
def test_a_truncated_file_in_the_resume_checkpoint_is_named_with_the_previous_checkpoint(
    tmp_path, tiny_glm2_dir, trained, capsys, no_model_load, name
):
    out = _copy(trained, tmp_path)
    path = out / "checkpoint-4" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert main(_args(tiny_glm2_dir, out, "--max_steps", "6", "--resume_from_checkpoint", "True")) == 1
    error = _error_line(capsys)
    assert f"{path}: cannot be read" in error and f"--resume_from_checkpoint {out / 'checkpoint-2'}" in error


def test_a_binary_settings_file_is_named(tmp_path, tiny_glm2_dir, trained, capsys):
    out = _copy(trained, tmp_path)
    settings = out / "checkpoint-4" / "ptuning_config.json"
    settings.write_bytes(b"\x80\x81\xfe\x00binary")
    with pytest.raises(CheckpointError, match="ptuning_config.json: not JSON text"):
        read_checkpoint_settings(settings.parent)
    assert main(_args(tiny_glm2_dir, out, "--max_steps", "6", "--resume_from_checkpoint", "True")) == 1
    error = _error_line(capsys)
    assert f"{settings}: cannot be read (not JSON text" in error and str(out / "checkpoint-2") in error
    predict = ["--do_predict", "--test_file", ADGEN_TRAIN, "--prompt_column", "content", "--response_column", "summary",
               "--model_name_or_path", str(tiny_glm2_dir), "--ptuning_checkpoint", str(settings.parent),
               "--output_dir", str(tmp_path / "pred"), "--report_to", "none"]  # fmt: skip
    assert main(predict) == 1
    assert f"{settings}: not JSON text" in _error_line(capsys)


def test_a_lone_surrogate_in_a_training_row_is_a_file_line_error(tmp_path, tiny_glm2_dir, capsys):
    data = tmp_path / "train.json"
    data.write_text('{"content": "类型#裤", "summary": "好看"}\n{"content": "a\\ud800b", "summary": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train.json:2: .*lone surrogate \\ud800"):
        read_json_records(data)
    args = _args(tiny_glm2_dir, tmp_path / "out", "--max_steps", "1")
    args[args.index(ADGEN_TRAIN)] = str(data)
    assert main(args) == 1
    assert f"{data}:2:" in _error_line(capsys)


@pytest.mark.slow
def test_train_sh_rerun_then_evaluate_sh_use_the_second_runs_checkpoint(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUTPUT_DIR": str(out), "MAX_STEPS": "4", "SAVE_STEPS": "2", "MAX_SOURCE_LENGTH": "32", "MAX_TARGET_LENGTH": "32"}

    def script(name, *args, **extra):
        result = subprocess.run(["bash", name, *args], cwd=REPO_ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return result

    first = script("train.sh")
    assert f"checkpoint written to {out / 'checkpoint-4'}" in first.stdout
    first_weights = load_file(out / "checkpoint-4" / "model.safetensors")
    second = script("train.sh", MAX_STEPS="2", LR="5e-3")
    assert f"checkpoint written to {out / 'checkpoint-2'}" in second.stdout
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    second_weights = load_file(out / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(first_weights[k], second_weights[k]) for k in first_weights)
    evaluation = script("evaluate.sh", "--max_predict_samples", "2", EVAL_BATCH_SIZE="2")
    assert f"evaluating {out / 'checkpoint-2'}" in evaluation.stdout
