"""chatglm_ptuning.tokenizer_files: the variable, the user cache, the pinned download and its one message.

Downloads go to a small Hub stand-in on loopback (the real files served under the Hub's URL layout),
so nothing here needs the network; the message for a machine with none is checked both on the helper
and through the test fixture, in a fresh pytest process.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest

from official_layout import REPO_ROOT

from chatglm_ptuning import tokenizer_files
from chatglm_ptuning.tokenizer_files import (
    ENV_VAR,
    FETCH_COMMAND,
    TOKENIZERS,
    TokenizerDownloadError,
    TokenizerFilesNotFound,
    download_tokenizers,
    find_tokenizers_dir,
    problems,
)

FILES = [(name, file) for name, spec in TOKENIZERS.items() for file, _ in spec.files]


@pytest.fixture
def no_variable_empty_cache(monkeypatch, tmp_path) -> Path:
    """No $CHATGLM_TOKENIZERS_DIR and an empty user cache under tmp_path; returns the cache folder."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "chatglm_ptuning" / "tokenizers"


@pytest.fixture
def online(monkeypatch) -> None:
    """huggingface_hub not in offline mode, whatever HF_HUB_OFFLINE said when it was imported."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@contextlib.contextmanager
def fake_hub(files: dict[str, bytes]) -> Iterator[str]:
    """A loopback server answering the Hub's `/{repo}/resolve/{revision}/{file}` HEAD and GET requests."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _headers(self) -> bytes | None:
            body = files.get(self.path)
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            self.send_response(200)
            self.send_header("X-Repo-Commit", self.path.split("/")[4])
            self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return body

        def do_HEAD(self) -> None:  # noqa: N802
            self._headers()

        def do_GET(self) -> None:  # noqa: N802
            body = self._headers()
            if body is not None:
                self.wfile.write(body)

        def log_message(self, *args) -> None:  # noqa: ANN002
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def hub_files(source: Path) -> dict[str, bytes]:
    """The real files under the URL paths of their pinned revisions."""
    return {
        f"/{spec.repo_id}/resolve/{spec.revision}/{file}": (source / name / file).read_bytes()
        for name, spec in TOKENIZERS.items()
        for file, _ in spec.files
    }


def test_pinned_checksums_are_those_of_the_real_files(shared_tokenizers):
    assert problems(shared_tokenizers) == []
    for spec in TOKENIZERS.values():
        assert len(spec.revision) == 40 and int(spec.revision, 16) >= 0  # full commit ids, not branch names


def test_variable_wins_and_an_incomplete_folder_is_named(monkeypatch, tmp_path, shared_tokenizers):
    monkeypatch.setenv(ENV_VAR, str(shared_tokenizers))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert find_tokenizers_dir() == shared_tokenizers.resolve()

    partial = tmp_path / "partial"
    (partial / "chatglm2-6b").mkdir(parents=True)
    (partial / "chatglm2-6b" / "tokenizer.model").write_bytes((shared_tokenizers / "chatglm2-6b" / "tokenizer.model").read_bytes())
    monkeypatch.setenv(ENV_VAR, str(partial))
    with pytest.raises(TokenizerFilesNotFound) as err:
        find_tokenizers_dir()
    message = str(err.value)
    assert f"${ENV_VAR}={partial}" in message and "chatglm-6b/ice_text.model is missing" in message
    assert "chatglm2-6b/tokenizer.model" not in message and FETCH_COMMAND in message


def test_a_changed_file_is_reported_with_both_checksums(monkeypatch, tmp_path, shared_tokenizers):
    folder = tmp_path / "tokenizers"
    for name, file in FILES:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / file).write_bytes((shared_tokenizers / name / file).read_bytes())
    config = folder / "chatglm3-6b" / "tokenizer_config.json"
    config.write_bytes(config.read_bytes().replace(b"chatglm3", b"chatglm4"))
    monkeypatch.setenv(ENV_VAR, str(folder))
    with pytest.raises(TokenizerFilesNotFound) as err:
        find_tokenizers_dir()
    expected = dict(TOKENIZERS["chatglm3-6b"].files)["tokenizer_config.json"]
    found = hashlib.sha256(config.read_bytes()).hexdigest()
    assert f"{config}: sha256 {found}, expected {expected}" in str(err.value)


def test_user_cache_is_used_without_the_variable(no_variable_empty_cache, shared_tokenizers, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # a download would fail
    for name, file in FILES:
        (no_variable_empty_cache / name).mkdir(parents=True, exist_ok=True)
        (no_variable_empty_cache / name / file).symlink_to(shared_tokenizers / name / file)
    assert find_tokenizers_dir() == no_variable_empty_cache


def test_nothing_anywhere_offline_gives_the_one_message(no_variable_empty_cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TokenizerFilesNotFound) as err:
        find_tokenizers_dir()
    assert str(err.value) == (
        f"real ChatGLM tokenizer files not found: ${ENV_VAR} is not set, {no_variable_empty_cache} does not hold "
        "them, and downloading them from the Hugging Face Hub failed (HF_HUB_OFFLINE is set). "
        f"Run `{FETCH_COMMAND}` where huggingface.co is reachable, or set {ENV_VAR} to a folder holding "
        "chatglm-6b/, chatglm2-6b/ and chatglm3-6b/"
    )
    assert not no_variable_empty_cache.exists()
    with pytest.raises(TokenizerFilesNotFound, match="no download was tried"):
        find_tokenizers_dir(download=False)


def test_unreachable_hub_fails_at_once(tmp_path, online):
    with contextlib.closing(__import__("socket").socket()) as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    start = time.monotonic()
    with pytest.raises(TokenizerDownloadError, match="the Hub did not answer for http://127.0.0.1:"):
        download_tokenizers(tmp_path / "dest", endpoint=closed)
    assert time.monotonic() - start < 15  # hf_hub_download's own retries alone sleep 1+2+4+8 s
    assert not (tmp_path / "dest").exists()


def test_download_from_the_pinned_revisions(tmp_path, shared_tokenizers, online):
    with fake_hub(hub_files(shared_tokenizers)) as endpoint:
        assert download_tokenizers(tmp_path / "dest", endpoint=endpoint) == tmp_path / "dest"
    assert problems(tmp_path / "dest") == []
    assert sorted(p.relative_to(tmp_path / "dest").as_posix() for p in (tmp_path / "dest").rglob("*") if p.is_file()) == sorted(
        f"{name}/{file}" for name, file in FILES
    )


def test_download_with_a_wrong_checksum_writes_nothing(tmp_path, shared_tokenizers, online):
    served = hub_files(shared_tokenizers)
    spec = TOKENIZERS["chatglm3-6b"]
    served[f"/{spec.repo_id}/resolve/{spec.revision}/tokenizer_config.json"] += b"\n"
    with fake_hub(served) as endpoint, pytest.raises(TokenizerDownloadError) as err:
        download_tokenizers(tmp_path / "dest", endpoint=endpoint)
    assert f"THUDM/chatglm3-6b/tokenizer_config.json @ {spec.revision}: sha256 " in str(err.value)
    assert not (tmp_path / "dest").exists()


@pytest.mark.slow
def test_fetch_command_fills_the_cache_through_hf_endpoint(tmp_path, shared_tokenizers):
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=str(REPO_ROOT))
    cache = tmp_path / "cache" / "chatglm_ptuning" / "tokenizers"
    with fake_hub(hub_files(shared_tokenizers)) as endpoint:
        result = subprocess.run(
            [sys.executable, "-m", "chatglm_ptuning.tokenizer_files", "fetch"],
            env={**env, "HF_ENDPOINT": endpoint}, capture_output=True, text=True, timeout=300,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(cache) and problems(cache) == []


def test_where_and_fetch_print_one_line_without_a_traceback(no_variable_empty_cache, shared_tokenizers, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert tokenizer_files.main(["where"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: real ChatGLM tokenizer files not found") and err.count("\n") == 1
    assert tokenizer_files.main(["fetch"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: could not fetch the tokenizer files into {no_variable_empty_cache}: HF_HUB_OFFLINE is set\n"

    monkeypatch.setenv(ENV_VAR, str(shared_tokenizers))
    assert tokenizer_files.main(["where"]) == 0
    assert capsys.readouterr().out == f"{shared_tokenizers.resolve()}\n"
    assert tokenizer_files.main(["fetch", "--dest", str(shared_tokenizers)]) == 0  # complete already: no download
    assert capsys.readouterr().out == f"{shared_tokenizers.resolve()}\n"


@pytest.mark.slow
def test_tests_needing_tokenizers_fail_with_the_one_message(tmp_path):
    """No variable, an empty cache, offline: every lookup site fails the test with the helper's message."""
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    tests = [
        "tests/test_tokenization.py::test_direct_construction_picks_family",  # the fixture in a test
        "tests/test_chat.py::test_greedy_and_max_new_tokens_send_no_sampling_or_length_defaults",  # via a module fixture
        "tests/test_data.py::test_tokenizer_family",
        "tests/test_loading.py::test_load_model_glm1_uses_word_embeddings_as_output_matrix",  # tiny checkpoint fixtures
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *tests],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    cache = tmp_path / "cache" / "chatglm_ptuning" / "tokenizers"
    message = (
        f"real ChatGLM tokenizer files not found: ${ENV_VAR} is not set, {cache} does not hold them, "
        f"and downloading them from the Hugging Face Hub failed (HF_HUB_OFFLINE is set). Run `{FETCH_COMMAND}`"
    )
    assert result.returncode == 1, result.stdout[-3000:]
    assert "4 errors" in result.stdout, result.stdout[-3000:]
    assert result.stdout.count(message) == len(tests), result.stdout[-3000:]  # once per test, nothing chained
    assert "Traceback" not in result.stdout and "During handling" not in result.stdout
