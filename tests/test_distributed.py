"""Multi-process training on CPU (gloo): DDP and DeepSpeed ZeRO-2/3, launched for real.

Each test starts 2 ranks with torchrun or the deepspeed launcher on a tiny official-layout
ChatGLM2 model. A P-tuning run must save only the prefix (and DeepSpeed's own checkpoint no
frozen weight); a full fine-tuning run must save the whole model. Every DeepSpeed start
JIT-compiles a shared-memory comm op (about 2 minutes the first time, then cached under
$TORCH_EXTENSIONS_DIR); fp16 does not run on CPU, so the DeepSpeed runs use bf16.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from official_layout import REPO_ROOT
from safetensors.torch import load_file
from transformers import set_seed

from chatglm_ptuning.checkpoint import iter_weight_files
from chatglm_ptuning.loading import load_model

pytestmark = pytest.mark.slow

ADGEN_TRAIN = str(REPO_ROOT / "data_samples" / "adgen_train.json")
ADGEN_DEV = str(REPO_ROOT / "data_samples" / "adgen_dev.json")
SCRIPTS = REPO_ROOT / "scripts"
PREFIX = "transformer.prefix_encoder."
PRE_SEQ_LEN = 4
LEARNING_RATE = 2e-2
SEED = 42  # the Trainer's default seed: train.py seeds with it before it builds the prefix
RUN_TIMEOUT_S = 900  # the first DeepSpeed start compiles its comm op

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install 'chatglm-ptuning[deepspeed]')",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join(filter(None, [os.path.dirname(sys.executable), env.get("PATH")]))  # this env's `deepspeed`
    env.setdefault("OMP_NUM_THREADS", "1")  # 2 ranks share the cores (torchrun's default; the deepspeed launcher sets none)
    env.update(extra)
    return env


def _launch(cmd: list[str], log: Path, **env: str) -> str:
    """Run a launcher command from the repo root and return its output; on failure show where it broke."""
    start = time.monotonic()
    with open(log, "w") as handle:
        try:
            code = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(**env), stdout=handle, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    print(f"{log.stem}: {time.monotonic() - start:.1f}s")
    text = log.read_text(errors="replace")
    if code != 0:
        first_error = text.find("Traceback")  # the root cause, before the launcher's own report
        tail = (text[first_error : first_error + 3000] + "\n...\n" if first_error >= 0 else "") + text[-1500:]
        hint = ""
        if "--deepspeed" in cmd or cmd[0] == "deepspeed" or "ds_train" in " ".join(cmd):
            hint = "\n(DeepSpeed JIT-compiles a comm op at start: it needs g++ and ninja; fp16 does not run on CPU, bf16 does.)"
        pytest.fail(f"{' '.join(cmd)}\nexited with {code}; end of {log}:\n{tail}{hint}")
    return text


def _train_flags(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--do_train", "--train_file", ADGEN_TRAIN,
        "--prompt_column", "content", "--response_column", "summary", "--max_source_length", "32",
        "--max_target_length", "32", "--max_train_samples", "16", "--per_device_train_batch_size", "2",
        "--logging_steps", "1", "--learning_rate", str(LEARNING_RATE), "--output_dir", str(output_dir),
        "--overwrite_output_dir", "--use_cpu", "--report_to", "none", *extra,
    ]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), *args]


def _ptuning_flags(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return _train_flags(model_dir, output_dir, "--pre_seq_len", str(PRE_SEQ_LEN), *extra)


def _ran_two_ranks(checkpoint: Path) -> None:
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}, "the run did not have 2 ranks"


def _official_keys(model_dir: Path) -> set[str]:
    return {key for _, shard in iter_weight_files(model_dir) for key in shard}


def _check_prefix_checkpoint(checkpoint: Path, model_dir: Path, backbone_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The checkpoint holds the trained prefix and nothing of the backbone; it loads back."""
    names = {p.name for p in checkpoint.iterdir()}
    assert {"model.safetensors", "ptuning_config.json", "trainer_state.json"} <= names, names
    other_weights = {n for n in names if n.endswith((".safetensors", ".index.json")) or n.startswith("pytorch_model")}
    assert other_weights == {"model.safetensors"}, f"unexpected weight files {other_weights}"
    saved = load_file(checkpoint / "model.safetensors")
    assert set(saved) == {PREFIX + "embedding.weight"}, set(saved)
    prefix = saved[PREFIX + "embedding.weight"]
    assert prefix.dtype == torch.float32 and prefix.shape[0] == PRE_SEQ_LEN
    settings = json.loads((checkpoint / "ptuning_config.json").read_text())
    assert settings["pre_seq_len"] == PRE_SEQ_LEN and settings["architecture"] == "chatglm2"

    model, _ = load_model(model_dir, ptuning_checkpoint=checkpoint, device="cpu")
    torch.testing.assert_close(model.transformer.prefix_encoder.embedding.weight.detach(), prefix, rtol=0, atol=0)

    # train.py seeds, then builds a fresh prefix: rebuild it the same way. A few Adam steps move each
    # value by about the learning rate per step, far less than the N(0, 1) initial values.
    set_seed(SEED)
    fresh, _ = load_model(model_dir, pre_seq_len=PRE_SEQ_LEN, device="cpu", dtype=backbone_dtype)
    moved = (prefix - fresh.transformer.prefix_encoder.embedding.weight.detach()).abs()
    assert moved.mean() > 1e-3, f"the prefix barely changed from its initial value (mean |change| {moved.mean():.2e})"
    assert moved.max() < 0.5, f"the saved prefix is not the trained initial prefix (max |change| {moved.max():.3f})"
    return saved


def _check_deepspeed_folder(checkpoint: Path, model_dir: Path, prefix_numel: int) -> None:
    """DeepSpeed's own checkpoint (global_stepN/) holds the prefix and its optimizer state only."""
    tag = (checkpoint / "latest").read_text().strip()
    folder = checkpoint / tag
    files = sorted(folder.iterdir())
    backbone_bytes = sum(t.numel() * 2 for _, shard in iter_weight_files(model_dir) for t in shard.values())
    for path in files:
        assert path.stat().st_size < backbone_bytes / 20, f"{path} is {path.stat().st_size} bytes: it holds frozen weights"
    model_states = [p for p in files if p.name.endswith("model_states.pt")]
    optim_states = [p for p in files if p.name.endswith("optim_states.pt")]
    assert model_states and len(optim_states) == 2, [p.name for p in files]
    for path in model_states:
        state = torch.load(path, map_location="cpu", weights_only=False)
        params = [name for group in state["param_shapes"] for name in group]
        assert params and all(name.startswith(PREFIX) for name in params), params
        stored = set(state["module"]) - set(state["buffer_names"])
        assert all(name.startswith(PREFIX) for name in stored), stored
        assert not state.get("frozen_param_shapes"), "frozen parameter shapes were saved"
    numel = 0
    for path in optim_states:
        stack = [torch.load(path, map_location="cpu", weights_only=False)]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                numel += item.numel()
            elif isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
    # fp32 master copy + two Adam moments of the prefix, split over the ranks (+ step counters)
    assert numel <= 3 * prefix_numel + 16, f"optimizer states hold {numel} values for a {prefix_numel}-value prefix"


def test_ddp_ptuning_trains_and_saves_the_prefix_once(tmp_path, tiny_glm2_dir):
    """Plain DDP (no DeepSpeed): only rank 0 writes the prefix checkpoint."""
    save_log = tmp_path / "saves.jsonl"
    entry = tmp_path / "count_saves.py"
    entry.write_text(
        "import json, os, sys\n"
        "import chatglm_ptuning.trainer as trainer\n"
        "from chatglm_ptuning.train import main\n"
        "real = trainer.save_prefix_checkpoint\n"
        "def counted(state, folder, settings):\n"
        "    with open(os.environ['SAVE_LOG'], 'a') as log:\n"
        "        log.write(json.dumps({'rank': int(os.environ['RANK']), 'folder': str(folder)}) + '\\n')\n"
        "    return real(state, folder, settings)\n"
        "trainer.save_prefix_checkpoint = counted\n"
        "sys.exit(main())\n"
    )
    out = tmp_path / "out"
    output = _launch(_torchrun(str(entry), *_ptuning_flags(tiny_glm2_dir, out, "--max_steps", "3")), tmp_path / "ddp.log", SAVE_LOG=str(save_log))
    # The Trainer asks DDP to search for unused parameters only when activation checkpointing is off.
    assert "find_unused_parameters=True" not in output, "P-tuning ran without activation checkpointing"
    checkpoint = out / "checkpoint-3"
    _ran_two_ranks(checkpoint)
    saves = [json.loads(line) for line in save_log.read_text().splitlines()]
    assert [s["rank"] for s in saves] == [0], saves
    assert Path(saves[0]["folder"]).name == "checkpoint-3"  # written in staging, then renamed
    assert not any(p.name.startswith("global_step") for p in checkpoint.iterdir())
    _check_prefix_checkpoint(checkpoint, tiny_glm2_dir, None)


@needs_deepspeed
@pytest.mark.parametrize("config", ["ds_zero2.json", "ds_zero2_offload.json", "ds_zero3_offload.json"])
def test_deepspeed_ptuning_saves_only_the_prefix(tmp_path, tiny_glm2_dir, config):
    out = tmp_path / "out"
    flags = _ptuning_flags(tiny_glm2_dir, out, "--max_steps", "3", "--bf16", "--deepspeed", str(SCRIPTS / config))
    _launch(_torchrun("-m", "chatglm_ptuning.train", *flags), tmp_path / f"{Path(config).stem}.log")
    checkpoint = out / "checkpoint-3"
    _ran_two_ranks(checkpoint)
    saved = _check_prefix_checkpoint(checkpoint, tiny_glm2_dir, torch.bfloat16)
    _check_deepspeed_folder(checkpoint, tiny_glm2_dir, sum(t.numel() for t in saved.values()))


@needs_deepspeed
def test_deepspeed_zero3_ptuning_resumes_to_the_same_prefix(tmp_path, tiny_glm2_dir):
    """ZeRO-3 (parameters partitioned): the prefix is gathered to save, and a run resumed from
    a prefix-only DeepSpeed checkpoint ends where an uninterrupted one does."""
    out = tmp_path / "out"
    common = ("--max_steps", "4", "--save_steps", "2", "--bf16", "--deepspeed", str(SCRIPTS / "ds_zero3.json"))
    _launch(_torchrun("-m", "chatglm_ptuning.train", *_ptuning_flags(tiny_glm2_dir, out, *common)), tmp_path / "zero3.log")
    checkpoint = out / "checkpoint-4"
    _ran_two_ranks(checkpoint)
    saved = _check_prefix_checkpoint(checkpoint, tiny_glm2_dir, torch.bfloat16)
    _check_deepspeed_folder(checkpoint, tiny_glm2_dir, sum(t.numel() for t in saved.values()))

    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    flags = [f for f in _ptuning_flags(tiny_glm2_dir, resumed, *common) if f != "--overwrite_output_dir"]
    _launch(_torchrun("-m", "chatglm_ptuning.train", *flags, "--resume_from_checkpoint", "True"), tmp_path / "zero3_resumed.log")
    got = load_file(resumed / "checkpoint-4" / "model.safetensors")
    for key, expected in saved.items():
        torch.testing.assert_close(got[key], expected, rtol=0, atol=1e-6)


@needs_deepspeed
def test_deepspeed_launcher_runs_two_ranks(tmp_path, tiny_glm2_dir):
    """`deepspeed --num_accelerators 2` (without it the launcher counts NUMA nodes and starts one rank)."""
    out = tmp_path / "out"
    flags = _ptuning_flags(tiny_glm2_dir, out, "--max_steps", "2", "--bf16", "--deepspeed", str(SCRIPTS / "ds_zero2.json"))
    cmd = ["deepspeed", "--num_accelerators", "2", "--master_port", str(_free_port()), "--module", "chatglm_ptuning.train", *flags]
    _launch(cmd, tmp_path / "deepspeed_launcher.log")
    checkpoint = out / "checkpoint-2"
    _ran_two_ranks(checkpoint)
    saved = _check_prefix_checkpoint(checkpoint, tiny_glm2_dir, torch.bfloat16)
    _check_deepspeed_folder(checkpoint, tiny_glm2_dir, sum(t.numel() for t in saved.values()))


@needs_deepspeed
def test_full_finetuning_script_saves_the_whole_model(tmp_path, tiny_glm2_dir):
    """scripts/ds_train_finetune.sh (ZeRO-2, deepspeed launcher), no prefix: the whole model is saved
    under the official key names and loads with load_model."""
    out = tmp_path / "out"
    env = dict(
        LR="1e-2", NUM_GPUS="2", MASTER_PORT=str(_free_port()), MODEL_PATH=str(tiny_glm2_dir), TRAIN_FILE=ADGEN_TRAIN,
        TEST_FILE=ADGEN_DEV, OUTPUT_DIR=str(out), MAX_STEPS="2", SAVE_STEPS="2", PRECISION="--bf16 --use_cpu",
        MAX_SOURCE_LENGTH="32", MAX_TARGET_LENGTH="32", BATCH_SIZE="2",
    )
    extra = ["--max_train_samples", "8", "--report_to", "none"]
    _launch(["bash", str(SCRIPTS / "ds_train_finetune.sh"), *extra], tmp_path / "finetune.log", **env)
    checkpoint = out / "checkpoint-2"
    _ran_two_ranks(checkpoint)
    assert not (checkpoint / "ptuning_config.json").exists()
    assert _official_keys(checkpoint) == _official_keys(tiny_glm2_dir)

    tuned, _ = load_model(checkpoint, device="cpu")
    base, _ = load_model(tiny_glm2_dir, device="cpu")
    assert tuned.config.pre_seq_len in (None, 0)
    tuned_state, base_state = tuned.state_dict(), base.state_dict()
    changes = {k: (tuned_state[k].float() - v.float()).abs().max().item() for k, v in base_state.items() if v.is_floating_point()}
    changed = [k for k, c in changes.items() if c > 0]
    assert len(changed) >= len(changes) // 2, f"fine-tuning changed only {changed}"
    assert max(changes.values()) < 0.2, changes  # two small steps from the base weights, not another model
