"""Chat prompt templates per ChatGLM family, and `chat()` / `stream_chat()` for the LM classes.

The family comes from the tokenizer class: a model folder cannot tell ChatGLM2-6B from ChatGLM3-6B
(same architecture and weights layout), but their prompts differ. Each family is one `ChatFamily`
row: how to build the model input, what ends a reply, how to post-process it into
(response, history), and the official sampling defaults.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import BatchEncoding, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .configuration import ARCH_GLM1, ARCH_GLM2
from .tokenization import ChatGLM2Tokenizer, ChatGLM3Tokenizer, ChatGLM6BTokenizer
from .tools import fenced_call_arguments

Response = Any  # str, or for a ChatGLM3 tool call a dict {"name", "parameters"} / {"name", "content"}
History = list  # ChatGLM-6B/2: [(query, response), ...]; ChatGLM3: [{"role", "content", ...}, ...]


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """The official guard: if any score is NaN or Inf, zero all scores and put 5e4 on token 5."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if torch.isnan(scores).any() or torch.isinf(scores).any():
            scores.zero_()
            scores[..., 5] = 5e4
        return scores


# ---- per-family pieces ------------------------------------------------------------------------

_CJK = "\u4e00-\u9fff"
# ice_text.model normalises full-width punctuation to ASCII (NFKC); ChatGLM-6B's chat() puts it back next to CJK.
_FULL_WIDTH = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}


def postprocess_chatglm6b(response: str) -> str:
    """Strip, `[[训练时间]]` -> `2023年`, and ASCII `,!:;?` next to a CJK character -> full width."""
    response = response.strip().replace("[[训练时间]]", "2023年")
    for mark, full_width in _FULL_WIDTH.items():
        response = re.sub(f"([{_CJK}]){re.escape(mark)}", rf"\g<1>{full_width}", response)
        response = re.sub(f"{re.escape(mark)}([{_CJK}])", rf"{full_width}\g<1>", response)
    return response


def postprocess_chatglm2(response: str) -> str:
    """Strip and `[[训练时间]]` -> `2023年`."""
    return response.strip().replace("[[训练时间]]", "2023年")


def parse_chatglm3_response(output: str, history: list[dict[str, Any]]) -> tuple[Response, list[dict[str, Any]]]:
    """Split ChatGLM3 output into assistant messages and return (last response, history + those messages).

    Each `<|assistant|>` segment is `metadata \\n content`. Empty metadata: a plain reply (stripped
    text). Otherwise a tool call: with a system message carrying "tools" the fenced `tool_call(k=v, ...)`
    is parsed with `ast` (the original used `eval`) into `{"name", "parameters"}`; else
    `{"name", "content"}`. A segment without a newline is taken as plain content (the original raised).
    """
    history = [dict(message) for message in history]
    response: Response = ""
    for segment in output.split("<|assistant|>"):
        metadata, newline, content = segment.partition("\n")
        if not newline:
            metadata, content = "", segment
        if not metadata.strip():
            content = content.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            response = content.replace("[[训练时间]]", "2023年")
            continue
        history.append({"role": "assistant", "metadata": metadata, "content": content})
        name = metadata.strip()
        parameters = fenced_call_arguments(content) if history[0]["role"] == "system" and "tools" in history[0] else None
        response = (
            {"name": name, "parameters": parameters} if parameters is not None else {"name": name, "content": content}
        )
    return response, history


def _round_prompt_inputs(tokenizer: Any, query: str, history: History, role: str) -> BatchEncoding:
    return tokenizer([tokenizer.build_prompt(query, history)], return_tensors="pt")


def _chatglm3_inputs(tokenizer: Any, query: str, history: History, role: str) -> BatchEncoding:
    return tokenizer.build_chat_input(query, history=history, role=role)


def _pairs_finish(postprocess: Callable[[str], str]) -> Callable[[str, History, str, str], tuple[Response, History]]:
    def finish(text: str, history: History, query: str, role: str) -> tuple[Response, History]:
        response = postprocess(text)
        return response, [*history, (query, response)]

    return finish


def _chatglm3_finish(text: str, history: History, query: str, role: str) -> tuple[Response, History]:
    return parse_chatglm3_response(text, [*history, {"role": role, "content": query}])


@dataclass(frozen=True)
class ChatFamily:
    """Everything chat() needs to know about one ChatGLM generation."""

    name: str
    architecture: str  # the model architecture the tokenizer belongs to (configuration.ARCH_*)
    max_length: int  # official chat() defaults
    top_p: float
    temperature: float
    roles: tuple[str, ...]  # accepted `role` values
    build_inputs: Callable[[Any, str, History, str], BatchEncoding]  # (tokenizer, query, history, role)
    stop_tokens: tuple[str, ...]  # get_command names ending a reply (besides eos)
    finish: Callable[[str, History, str, str], tuple[Response, History]]  # (decoded reply, history, query, role)
    hold_partial_characters: bool  # stream_chat: wait while the text ends in an incomplete character (U+FFFD)
    metadata_line: bool = False  # replies open with a metadata line (a tool name or ""): stream_chat waits for it

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        return [tokenizer.eos_token_id] + [tokenizer.get_command(token) for token in self.stop_tokens]


CHAT_FAMILIES: dict[type, ChatFamily] = {
    ChatGLM6BTokenizer: ChatFamily(
        name="ChatGLM-6B",
        architecture=ARCH_GLM1,
        max_length=2048,
        top_p=0.7,
        temperature=0.95,
        roles=("user",),
        build_inputs=_round_prompt_inputs,
        stop_tokens=(),
        finish=_pairs_finish(postprocess_chatglm6b),
        hold_partial_characters=False,
    ),
    ChatGLM2Tokenizer: ChatFamily(
        name="ChatGLM2-6B",
        architecture=ARCH_GLM2,
        max_length=8192,
        top_p=0.8,
        temperature=0.8,
        roles=("user",),
        build_inputs=_round_prompt_inputs,
        stop_tokens=(),
        finish=_pairs_finish(postprocess_chatglm2),
        hold_partial_characters=True,
    ),
    ChatGLM3Tokenizer: ChatFamily(
        name="ChatGLM3-6B",
        architecture=ARCH_GLM2,
        max_length=8192,
        top_p=0.8,
        temperature=0.8,
        roles=ChatGLM3Tokenizer.ROLES,
        build_inputs=_chatglm3_inputs,
        stop_tokens=("<|user|>", "<|observation|>"),
        finish=_chatglm3_finish,
        hold_partial_characters=True,
        metadata_line=True,
    ),
}


def chat_family(tokenizer: Any) -> ChatFamily:
    """The `ChatFamily` of a tokenizer instance (most specific class first: ChatGLM3 before ChatGLM2)."""
    for cls in type(tokenizer).__mro__:
        if cls in CHAT_FAMILIES:
            return CHAT_FAMILIES[cls]
    raise TypeError(
        f"chat() needs a ChatGLM tokenizer from chatglm_ptuning (ChatGLM6BTokenizer, ChatGLM2Tokenizer or "
        f"ChatGLM3Tokenizer; AutoTokenizer returns one after `import chatglm_ptuning`); got {type(tokenizer).__name__}"
    )


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
        self,
        tokenizer: Any,
        query: str,
        history: History | None,
        role: str,
        max_length: int | None,
        num_beams: int,
        do_sample: bool,
        top_p: float | None,
        temperature: float | None,
        logits_processor: LogitsProcessorList | None,
        gen_kwargs: dict[str, Any],
    ) -> tuple[ChatFamily, History, BatchEncoding, dict[str, Any]]:
        """Family, history copy, model inputs [1, n] and generate() keyword arguments for one turn."""
        family = chat_family(tokenizer)
        architecture = getattr(getattr(self, "config", None), "architecture", family.architecture)
        if architecture != family.architecture:
            raise ValueError(
                f"{type(tokenizer).__name__} is the {family.name} tokenizer but the model architecture is "
                f"{architecture!r}; load the tokenizer of the same checkpoint"
            )
        if role not in family.roles:
            raise ValueError(f"{family.name} chat accepts role in {family.roles}, found {role!r}")
        history = list(history or [])
        inputs = family.build_inputs(tokenizer, query, history, role).to(self.device)
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(InvalidScoreLogitsProcessor())
        kwargs: dict[str, Any] = {
            "num_beams": num_beams,
            "do_sample": do_sample,
            "logits_processor": processors,
            "eos_token_id": family.stop_token_ids(tokenizer),
        }
        if do_sample:  # greedy/beam search ignore them and transformers warns when they are set
            kwargs["top_p"] = family.top_p if top_p is None else top_p
            kwargs["temperature"] = family.temperature if temperature is None else temperature
        if max_length is not None or "max_new_tokens" not in gen_kwargs:
            kwargs["max_length"] = family.max_length if max_length is None else max_length
        kwargs.update(gen_kwargs)
        return family, history, inputs, kwargs

    @staticmethod
    def _chat_reply(
        family: ChatFamily, tokenizer: Any, generated: list[int], history: History, query: str, role: str
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

        Defaults (None) are the family's official ones: ChatGLM-6B max_length 2048, top_p 0.7,
        temperature 0.95; ChatGLM2/3 8192, 0.8, 0.8. `max_length` counts the prompt. `role` is for
        ChatGLM3 (user, system, observation, assistant). `history` is not modified.
        """
        family, history, inputs, kwargs = self._chat_request(
            tokenizer,
            query,
            history,
            role,
            max_length,
            num_beams,
            do_sample,
            top_p,
            temperature,
            logits_processor,
            gen_kwargs,
        )
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
        family, history, inputs, kwargs = self._chat_request(
            tokenizer,
            query,
            history,
            role,
            max_length,
            1,
            do_sample,
            top_p,
            temperature,
            logits_processor,
            gen_kwargs,
        )
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
