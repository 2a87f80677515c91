"""Scripted replies for a tiny random ChatGLM3 model, which cannot call a tool by itself: the tests of
tool calls force the output tokens (a logits processor added to stream_chat) and record each prompt."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList


class ForceReply(LogitsProcessor):
    """Makes generation emit `ids` one by one (finite scores: the chat guard resets non-finite ones)."""

    def __init__(self, ids: list[int]) -> None:
        self.ids, self.start = ids, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.start = input_ids.shape[1] if self.start is None else self.start
        step = min(input_ids.shape[1] - self.start, len(self.ids) - 1)
        forced = torch.full_like(scores, -1e4)
        forced[:, self.ids[step]] = 1e4
        return forced


def reply_ids(tokenizer: Any, metadata: str, content: str, stop: str) -> list[int]:
    """The tokens a ChatGLM3 model emits after <|assistant|> for a reply, then its stop token."""
    return tokenizer.build_single_message("assistant", metadata, content)[1:] + [tokenizer.get_command(stop)]


class ScriptedReplies:
    """Wraps `model.stream_chat` so that every reply is the scripted one; `prompts` holds each
    prompt's input ids and `roles` each query's role."""

    def __init__(self, model: Any) -> None:
        self.model, self.stream_chat = model, model.stream_chat
        self.ids: list[int] = []
        self.prompts: list[list[int]] = []
        self.roles: list[str] = []
        model.stream_chat = self._stream_chat

    def script(self, ids: list[int]) -> None:
        self.ids = ids

    def _stream_chat(self, tokenizer: Any, query: str, history: list | None = None, role: str = "user", **kwargs: Any):
        self.prompts.append(tokenizer.build_chat_input(query, history=history, role=role)["input_ids"][0].tolist())
        self.roles.append(role)
        kwargs["logits_processor"] = LogitsProcessorList([ForceReply(self.ids)])
        return self.stream_chat(tokenizer, query, history, role=role, **kwargs)
