"""Shared fixtures: tiny official-layout checkpoints, built once per test run."""

from __future__ import annotations

from pathlib import Path

import pytest

from official_layout import write_tiny_checkpoint

from chatglm_ptuning.tokenizer_files import TokenizerFilesNotFound, find_tokenizers_dir


@pytest.fixture(scope="session")
def shared_tokenizers() -> Path:
    """The real tokenizer files' folder ($CHATGLM_TOKENIZERS_DIR, the user cache, or a download); the one
    message of chatglm_ptuning.tokenizer_files fails every test that needs them when there is none."""
    try:
        return find_tokenizers_dir()
    except TokenizerFilesNotFound as err:
        message = str(err)
    pytest.fail(message, pytrace=False)  # outside `except`: no chained traceback around the message


@pytest.fixture(scope="session")
def tiny_glm2_dir(tmp_path_factory, shared_tokenizers):
    """ChatGLM2-layout folder: 2 .bin shards + index, ChatGLM2 tokenizer."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-chatglm2"), "chatglm2", fmt="bin", num_shards=2)


@pytest.fixture(scope="session")
def tiny_glm3_dir(tmp_path_factory, shared_tokenizers):
    """ChatGLM3 folder (same architecture), single safetensors file, ChatGLM3 tokenizer."""
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-chatglm3"), "chatglm2", tokenizer="chatglm3-6b", fmt="safetensors", num_shards=1, seed=3
    )


@pytest.fixture(scope="session")
def tiny_glm1_dir(tmp_path_factory, shared_tokenizers):
    """ChatGLM-6B-layout folder: 2 .bin shards + index (lm_head stored too), ChatGLM-6B tokenizer."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-chatglm6b"), "chatglm", fmt="bin", num_shards=2, seed=1)
