"""The output folder of a training run: one run owns it.

- `claim` (before the model loads): the folder must be writable, and a lock file (`.run.lock`,
  holding the pid and host) keeps a second run out while the first is alive; a lock left by a
  process that no longer runs on this host is taken over.
- `clear_earlier_run` (--overwrite_output_dir, not resuming): what this toolkit wrote there
  (checkpoints, results, caches, the run record) is removed; anything else is left and named.
- `check_resume`: each checkpoint records the settings of the run that wrote it
  (`run_settings.json`); a resume is refused when they differ from the command line, and a
  damaged file in the checkpoint is named with the previous complete checkpoint to use instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import zipfile
from pathlib import Path
from typing import Any

from safetensors import safe_open

from .checkpoint import CheckpointError, read_checkpoint_settings, read_json_file

logger = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"
RUN_SETTINGS_FILE = "run_settings.json"  # in every checkpoint, and the run record in the output folder
TRAINER_STATE_FILE = "trainer_state.json"  # written last by the Trainer: marks a complete checkpoint
STAGING_DIR = ".staging"  # checkpoints are written here, then renamed into place
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
DIVERGED_SUFFIX = "-diverged"  # a checkpoint whose weights gave a non-finite step is set aside under this name
_WRITTEN_CHECKPOINT = re.compile(r"checkpoint-\d+(" + DIVERGED_SUFFIX + ")?")
# What train.py/trainer.py write into an output folder (the Trainer's results, plots, predictions, caches).
_WRITTEN_FILES = frozenset(
    {
        RUN_SETTINGS_FILE,
        TRAINER_STATE_FILE,
        "train_results.json",
        "eval_results.json",
        "predict_results.json",
        "all_results.json",
        "loss_curve.png",
        "generated_predictions.txt",
        "generation_settings.json",
    }
)
_WRITTEN_DIRS = frozenset({STAGING_DIR, "preprocess_cache", "runs"})
# Settings a resume may change: a lower learning rate is how a run goes on after a divergence.
ADJUSTABLE_SETTINGS = ("learning_rate",)
_DESCRIPTIVE_SETTINGS = ("train_file",)  # shown beside the data's sha256; the data are compared by content
_STALE_UNREADABLE_LOCK_S = 30  # a lock file that stays empty this long was left by a crash mid-write
_FREE_SPACE_CHECKPOINTS = 3  # warn when fewer checkpoints than this fit on the disk


class RunFolderError(RuntimeError):
    """The output folder cannot be used or written; the message names the folder and what to do."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_PATTERN.fullmatch(path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The completely written `checkpoint-N` folders of `output_dir`, lowest step first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(checkpoint_step(c), c) for c in folder.iterdir() if (c / TRAINER_STATE_FILE).is_file()]
    return [c for step, c in sorted((s, c) for s, c in found if s is not None)]


# ----------------------------------------------------------------------- claiming the folder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class RunLock:
    """`<output_dir>/.run.lock`: created exclusively, holds {"pid", "host", "started"}."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}

    def _holder(self) -> dict[str, Any] | None:
        """The lock's recorded owner; None when the file is gone or was never completely written."""
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            holder = None
        if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
            return holder
        if time.time() - self.path.stat().st_mtime < _STALE_UNREADABLE_LOCK_S:
            return {"pid": None, "host": "?"}  # being written by a run starting right now
        return None

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and (holder["host"] != self.owner["host"] or holder["pid"] is None or _pid_alive(holder["pid"])):
                    raise RunFolderError(
                        f"{self.path.parent} is in use by another training run (process {holder['pid']} on "
                        f"{holder['host']}, lock file {self.path}); wait for it to finish or choose another "
                        "--output_dir (delete the lock file only if that process is gone)"
                    ) from None
                logger.warning("%s: taking over a stale lock (%s; that process no longer runs)", self.path, holder or "unreadable")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump({**self.owner, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, handle)
            return
        raise RunFolderError(f"{self.path}: could not take the lock (another run keeps taking it)")

    def release(self) -> None:
        holder = self._holder()
        if holder is not None and holder.get("pid") == self.owner["pid"] and holder.get("host") == self.owner["host"]:
            self.path.unlink(missing_ok=True)


def claim(output_dir: str | os.PathLike) -> RunLock:
    """Create `output_dir` if needed, check that it is writable, and lock it for this run."""
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunFolderError(f"--output_dir {folder}: not writable ({err.strerror}); choose a folder this user can write") from None
    lock = RunLock(folder)
    lock.acquire()
    return lock


def clear_earlier_run(output_dir: str | os.PathLike) -> list[str]:
    """Remove what an earlier run of this toolkit wrote into `output_dir`; returns the names removed.
    Anything else is left where it is and named in the log."""
    folder = Path(output_dir)
    removed, left = [], []
    for child in sorted(folder.iterdir()):
        if child.name == LOCK_FILE:
            continue
        if child.is_dir():
            ours = child.name in _WRITTEN_DIRS or _WRITTEN_CHECKPOINT.fullmatch(child.name) is not None
        else:
            ours = child.name in _WRITTEN_FILES
        if not ours or child.is_symlink():
            left.append(child.name)
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
        removed.append(child.name)
    if removed:
        logger.warning("--overwrite_output_dir: removed the earlier run's %s from %s", ", ".join(removed), folder)
    if left:
        logger.warning("%s: left in place, not written by this toolkit: %s", folder, ", ".join(left))
    return removed


def warn_if_low_space(output_dir: str | os.PathLike, checkpoint_bytes: int) -> None:
    """Log a warning when fewer than a few checkpoints of `checkpoint_bytes` fit in the free space."""
    free = shutil.disk_usage(output_dir).free
    if free < _FREE_SPACE_CHECKPOINTS * checkpoint_bytes:
        logger.warning(
            "%s: only %.1f MB free, and one checkpoint takes about %.1f MB; a save may fail with a full disk",
            output_dir,
            free / 1e6,
            checkpoint_bytes / 1e6,
        )


def write_run_settings(folder: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Write `run_settings.json` into `folder` (a temporary name, then renamed)."""
    path = Path(folder) / RUN_SETTINGS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- resuming


def _shown(key: str, settings: dict[str, Any]) -> str:
    value = settings.get(key)
    if key == "train_data_sha256" and isinstance(value, str):
        return f"{value[:12]} ({settings.get('train_file')})"
    return "unset" if value is None else str(value)


def settings_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`name: checkpoint X, command line Y` for every compared setting that differs."""
    skipped = ADJUSTABLE_SETTINGS + _DESCRIPTIVE_SETTINGS
    keys = [k for k in dict.fromkeys([*current, *recorded]) if k not in skipped]
    return [
        f"{key}: checkpoint {_shown(key, recorded)}, command line {_shown(key, current)}"
        for key in keys
        if recorded.get(key) != current.get(key)
    ]


def _previous_checkpoint(checkpoint: Path) -> Path | None:
    step = checkpoint_step(checkpoint)
    earlier = [c for c in complete_checkpoints(checkpoint.parent) if step is None or checkpoint_step(c) < step]
    return earlier[-1] if earlier else None


def damaged_checkpoint_error(checkpoint: str | os.PathLike, file: str, reason: str) -> CheckpointError:
    """The error for an unreadable file of a resume checkpoint, offering the previous complete one."""
    checkpoint = Path(checkpoint)
    previous = _previous_checkpoint(checkpoint)
    offer = (
        f"resume from the previous complete checkpoint with --resume_from_checkpoint {previous}"
        if previous is not None
        else "no earlier complete checkpoint is left: start afresh with --overwrite_output_dir"
    )
    return CheckpointError(f"{checkpoint / file}: cannot be read ({reason}); {offer}")


def _check_files(checkpoint: Path) -> None:
    """Open every state file a resume reads, cheaply: JSON parsed, torch zip archives' directories
    read (a truncated file has none), safetensors headers read."""
    for path in sorted(checkpoint.iterdir()):
        try:
            if path.suffix == ".json":
                read_json_file(path)
            elif path.suffix in (".pt", ".pth"):
                with zipfile.ZipFile(path) as archive:
                    archive.namelist()
            elif path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as handle:
                    handle.keys()
        except CheckpointError as err:  # read_json_file's: "<path>: <what is wrong>"
            raise damaged_checkpoint_error(checkpoint, path.name, str(err).removeprefix(f"{path}: ")) from None
        except Exception as err:  # noqa: BLE001 - any failure is a damaged file
            raise damaged_checkpoint_error(checkpoint, path.name, f"{type(err).__name__}: {err}") from None


def check_resume(checkpoint: str | os.PathLike, current: dict[str, Any]) -> None:
    """Refuse a resume checkpoint whose files are damaged or whose run had other settings than
    `current` (learning_rate may change; a warning says so)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint {checkpoint}: not a folder")
    if not (checkpoint / TRAINER_STATE_FILE).is_file():
        raise damaged_checkpoint_error(checkpoint, TRAINER_STATE_FILE, "missing: the checkpoint was not completely written")
    _check_files(checkpoint)
    if current.get("method") != "full":
        read_checkpoint_settings(checkpoint)  # names a damaged ptuning_config.json
    record = checkpoint / RUN_SETTINGS_FILE
    if not record.is_file():
        logger.warning("%s records no run settings (written by an older version): its settings are not checked", checkpoint)
        return
    recorded = read_json_file(record)
    if not isinstance(recorded, dict):
        raise damaged_checkpoint_error(checkpoint, RUN_SETTINGS_FILE, "expected a JSON object")
    differences = settings_differences(recorded, current)
    if differences:
        raise CheckpointError(
            f"{checkpoint} was written by a run with other settings: {'; '.join(differences)}. Resume with the "
            "checkpoint's settings, or start afresh: leave out --resume_from_checkpoint and pass --overwrite_output_dir "
            f"(this removes the checkpoints in {checkpoint.parent}), or choose another --output_dir"
        )
    for key in ADJUSTABLE_SETTINGS:
        if recorded.get(key) != current.get(key):
            logger.warning("resuming %s with %s %s (its run used %s)", checkpoint, key, current.get(key), recorded.get(key))
