"""`chat()` / `stream_chat()` for the LM classes.

The family comes from the tokenizer (`families.family_of`): its row in families.py says how to
build the model input, what ends a reply, how to post-process it into (response, history), and the
official sampling defaults.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import BatchEncoding, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .families import Family, History, Response, family_of


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """The official guard: if any score is NaN or Inf, zero all scores and put 5e4 on token 5."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if torch.isnan(scores).any() or torch.isinf(scores).any():
            scores.zero_()
            scores[..., 5] = 5e4
        return scores


@dataclass(frozen=True)
class GenerationOptions:
    """The sampling arguments of one chat()/stream_chat() call; None takes the family's official default."""

    max_length: int | None = None  # prompt + reply tokens
    num_beams: int = 1
    do_sample: bool = True
    top_p: float | None = None
    temperature: float | None = None
    logits_processor: LogitsProcessorList | None = None  # run before the official NaN/Inf guard
    gen_kwargs: dict[str, Any] = field(default_factory=dict)  # further generate() keyword arguments, applied last

    def generate_kwargs(self, family: Family) -> dict[str, Any]:
        """generate() keyword arguments with the family's defaults filled in (without `gen_kwargs`)."""
        processors = LogitsProcessorList(self.logits_processor or [])
        processors.append(InvalidScoreLogitsProcessor())
        kwargs: dict[str, Any] = {"num_beams": self.num_beams, "do_sample": self.do_sample, "logits_processor": processors}
        if self.do_sample:  # greedy/beam search ignore them and transformers warns when they are set
            kwargs["top_p"] = family.top_p if self.top_p is None else self.top_p
            kwargs["temperature"] = family.temperature if self.temperature is None else self.temperature
        if self.max_length is not None or "max_new_tokens" not in self.gen_kwargs:
            kwargs["max_length"] = family.max_length if self.max_length is None else self.max_length
        return kwargs


# ---- streaming plumbing -----------------------------------------------------------------------


class _TokenQueueStreamer(BaseStreamer):
    """Carries generate()'s new token ids (batch of one) from the generating thread to the reader."""

    _END = object()

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._prompt_pending = True

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_pending:  # generate() first hands over the prompt
            self._prompt_pending = False
            return
        self._queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self._queue.put(self._END)

    def run(self, generate: Callable[..., Any], kwargs: dict[str, Any]) -> None:
        """Thread target: run generate, passing any exception on to the reader."""
        try:
            generate(**kwargs)
        except BaseException as error:  # noqa: BLE001 - re-raised in the reading thread
            self._queue.put(error)

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class _StopWhenClosed(StoppingCriteria):
    """Ends generation once the stream_chat reader has gone away."""

    def __init__(self) -> None:
        self.closed = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.closed, dtype=torch.bool, device=input_ids.device)


# ---- the mixin --------------------------------------------------------------------------------


class ChatMixin:
    """`chat()` and `stream_chat()` for the ChatGLM LM classes (needs `generate`, `device`, `config`)."""

    def _chat_request(
        self, tokenizer: Any, query: str, history: History | None, role: str, options: GenerationOptions
    ) -> tuple[Family, History, BatchEncoding, dict[str, Any]]:
        """Family, history copy, model inputs [1, n] and generate() keyword arguments for one turn."""
        family = family_of(tokenizer)
        architecture = getattr(getattr(self, "config", None), "architecture", family.architecture)
        if architecture != family.architecture:
            raise ValueError(
                f"{type(tokenizer).__name__} is the {family.display_name} tokenizer but the model architecture is "
                f"{architecture!r}; load the tokenizer of the same checkpoint"
            )
        if role not in family.roles:
            raise ValueError(f"{family.display_name} chat accepts role in {family.roles}, found {role!r}")
        history = list(history or [])
        inputs = family.build_inputs(tokenizer, query, history, role).to(self.device)
        kwargs = options.generate_kwargs(family)
        kwargs["eos_token_id"] = family.stop_token_ids(tokenizer)
        kwargs.update(options.gen_kwargs)
        return family, history, inputs, kwargs

    @staticmethod
    def _chat_reply(
        family: Family, tokenizer: Any, generated: list[int], history: History, query: str, role: str
    ) -> tuple[str, Response, History]:
        """Decode the generated ids up to the first stop token; return (text, response, new history)."""
        stops = set(family.stop_token_ids(tokenizer))
        end = next((i for i, token in enumerate(generated) if token in stops), len(generated))
        text = tokenizer.decode(generated[:end])
        response, new_history = family.finish(text, history, query, role)
        return text, response, new_history

    @torch.no_grad()
    def chat(
        self,
        tokenizer: Any,
        query: str,
        history: History | None = None,
        role: str = "user",
        max_length: int | None = None,
        num_beams: int = 1,
        do_sample: bool = True,
        top_p: float | None = None,
        temperature: float | None = None,
        logits_processor: LogitsProcessorList | None = None,
        **gen_kwargs: Any,
    ) -> tuple[Response, History]:
        """One chat turn: returns (response, history including this turn).

        Defaults (None) are the family's official ones (`families.Family`: max_length, top_p,
        temperature). `max_length` counts the prompt. `role` is for ChatGLM3 (user, system,
        observation, assistant). `history` is not modified.
        """
        options = GenerationOptions(max_length, num_beams, do_sample, top_p, temperature, logits_processor, gen_kwargs)
        family, history, inputs, kwargs = self._chat_request(tokenizer, query, history, role, options)
        outputs = self.generate(**inputs, **kwargs)
        generated = outputs[0, inputs["input_ids"].shape[1] :].tolist()
        _, response, new_history = self._chat_reply(family, tokenizer, generated, history, query, role)
        return response, new_history

    def stream_chat(
        self,
        tokenizer: Any,
        query: str,
        history: History | None = None,
        role: str = "user",
        max_length: int | None = None,
        do_sample: bool = True,
        top_p: float | None = None,
        temperature: float | None = None,
        logits_processor: LogitsProcessorList | None = None,
        **gen_kwargs: Any,
    ) -> Iterator[tuple[Response, History]]:
        """Like `chat()`, yielding (response so far, history) after each generated token.

        generate() runs on a worker thread and hands tokens over through `streamer=`. ChatGLM2/3 skip
        updates whose text ends in an incomplete character, as the originals do. The last value yielded
        always equals what `chat()` returns for the same generation. ChatGLM3 yields nothing before the
        reply's metadata line is complete, so a tool call is never shown as text first. Closing the
        generator early stops generation.
        """
        options = GenerationOptions(max_length, 1, do_sample, top_p, temperature, logits_processor, gen_kwargs)
        family, history, inputs, kwargs = self._chat_request(tokenizer, query, history, role, options)
        closed = _StopWhenClosed()
        kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []), closed])
        streamer = _TokenQueueStreamer()
        worker = threading.Thread(
            target=streamer.run, args=(self.generate, {**inputs, **kwargs, "streamer": streamer}), daemon=True
        )
        worker.start()
        generated: list[int] = []
        last: tuple[Response, History] | None = None
        try:
            for new_tokens in streamer:
                generated.extend(new_tokens)
                text, response, new_history = self._chat_reply(family, tokenizer, generated, history, query, role)
                if family.hold_partial_characters and (not text or text.endswith("\ufffd")):
                    continue
                if family.metadata_line and "\n" not in text:  # a tool name or a plain reply: not known yet
                    continue
                last = (response, new_history)
                yield last
            _, response, new_history = self._chat_reply(family, tokenizer, generated, history, query, role)
            if last != (response, new_history):
                yield response, new_history
        finally:
            closed.closed = True
            worker.join()
