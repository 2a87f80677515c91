"""Helpers for the front-end tests: a prefix checkpoint on the tiny model, and servers on loopback.

Servers run as subprocesses of the real command lines, on a free 127.0.0.1 port, with output in a
log file that a failing start shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from official_layout import REPO_ROOT, random_prefix_state, tiny_config

from chatglm_ptuning.checkpoint import PromptSettings, save_prefix_checkpoint
from chatglm_ptuning.run_folder import TRAINER_STATE_FILE

PRE_SEQ_LEN = 4


def write_prefix_checkpoint(folder: Path, base: Path, projection: bool = True) -> Path:
    """A checkpoint as training writes it (prefix + settings + trainer state) for the tiny ChatGLM2 base."""
    config = tiny_config("chatglm2", pre_seq_len=PRE_SEQ_LEN, prefix_projection=projection)
    settings = PromptSettings("chatglm2", PRE_SEQ_LEN, projection, base_model=str(base), family="chatglm2")
    save_prefix_checkpoint(random_prefix_state(config, seed=5), folder, settings)
    (folder / TRAINER_STATE_FILE).write_text(json.dumps({"global_step": int(folder.name.split("-")[-1])}))
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(**extra: str) -> dict[str, str]:
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1"
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise RuntimeError(f"server not up at {url} after {timeout} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def running_server(
    command: Sequence[str], probe_url: str, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen]:
    """Start `command` (from the repository root), wait until `probe_url` answers, stop it afterwards."""
    with open(log, "w") as out:
        process = subprocess.Popen(
            list(command), cwd=REPO_ROOT, env=env or server_env(), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_until_up(probe_url, process, log)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
