"""Shared fixtures: tiny official-layout checkpoints, built once per test run."""

from __future__ import annotations

import pytest

from official_layout import tokenizers_dir, write_tiny_checkpoint


@pytest.fixture(scope="session")
def shared_tokenizers():
    try:
        return tokenizers_dir()
    except FileNotFoundError as err:
        pytest.fail(str(err))


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
