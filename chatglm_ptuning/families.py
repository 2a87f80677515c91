"""The ChatGLM families, one row each: every fact that differs between ChatGLM-6B, ChatGLM2-6B and
ChatGLM3-6B outside the model code (which lives in modeling_chatglm.py / modeling_chatglm2.py).

A row holds the family's name (as checkpoints and data.py write it), the tokenizer's
`chatglm_version`, the model architecture, the chat template (how to build the model input, what
ends a reply, how to turn the decoded reply into (response, history)), the official `chat()`
sampling defaults and the reference web demo's slider defaults. The tokenizer class carries the
version (`tokenization.ChatGLM*Tokenizer.chatglm_version`), so `family_of(tokenizer)` finds the row.
A model folder cannot tell ChatGLM2-6B from ChatGLM3-6B (same architecture and weights layout);
their tokenizers, and so their rows, differ.

This module imports neither the tokenizers nor chat.py, so both can read it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .configuration import ARCH_GLM1, ARCH_GLM2
from .tools import fenced_call_arguments

Response = Any  # str, or for a ChatGLM3 tool call a dict {"name", "parameters"} / {"name", "content"}
History = list  # ChatGLM-6B/2: [(query, response), ...]; ChatGLM3: [{"role", "content", ...}, ...]

# The ChatGLM3 role tokens `<|system|>` ... (ChatGLM3's tokenization_chatglm.py: `role_special_tokens`).
CHATGLM3_ROLES = ("system", "user", "assistant", "observation")


# ---- reply post-processing (the originals' `process_response`) ---------------------------------

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


# ---- template hooks ------------------------------------------------------------------------------


def _round_prompt_inputs(tokenizer: Any, query: str, history: History, role: str) -> Any:
    return tokenizer([tokenizer.build_prompt(query, history)], return_tensors="pt")


def _chatglm3_inputs(tokenizer: Any, query: str, history: History, role: str) -> Any:
    return tokenizer.build_chat_input(query, history=history, role=role)


def _pairs_finish(postprocess: Callable[[str], str]) -> Callable[[str, History, str, str], tuple[Response, History]]:
    def finish(text: str, history: History, query: str, role: str) -> tuple[Response, History]:
        response = postprocess(text)
        return response, [*history, (query, response)]

    return finish


def _chatglm3_finish(text: str, history: History, query: str, role: str) -> tuple[Response, History]:
    return parse_chatglm3_response(text, [*history, {"role": role, "content": query}])


# ---- the table -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliderDefaults:
    """The reference web demo's sliders: Maximum length 0..max_length_limit, Top P, Temperature."""

    max_length_limit: int
    max_length: int
    top_p: float
    temperature: float


@dataclass(frozen=True)
class Family:
    """One ChatGLM generation."""

    name: str  # "chatglm", "chatglm2", "chatglm3": what data.py and checkpoint settings write
    display_name: str  # "ChatGLM-6B", ... : what pages and messages show
    version: int  # the tokenizer's `chatglm_version`
    architecture: str  # the model architecture (configuration.ARCH_*)
    max_length: int  # official chat() defaults (each repository's modeling_chatglm.py: chat)
    top_p: float
    temperature: float
    finish: Callable[[str, History, str, str], tuple[Response, History]]  # (decoded reply, history, query, role)
    sliders: SliderDefaults  # ChatGLM-6B/2: their ptuning/web_demo.py; ChatGLM3-6B: its basic_demo/web_demo.py
    roles: tuple[str, ...] = ("user",)  # accepted chat() `role` values
    # (tokenizer, query, history, role) -> BatchEncoding [1, n]: default, the tokenizer's build_prompt text
    build_inputs: Callable[[Any, str, History, str], Any] = _round_prompt_inputs
    stop_tokens: tuple[str, ...] = ()  # get_command names ending a reply (besides eos)
    hold_partial_characters: bool = True  # stream_chat: wait while the text ends in an incomplete character (U+FFFD)
    metadata_line: bool = False  # replies open with a metadata line (a tool name or ""): stream_chat waits for it

    @property
    def tool_calls(self) -> bool:
        """Role-message history (a system message carrying tools, observations) and tool-call replies."""
        return "system" in self.roles

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        return [tokenizer.eos_token_id] + [tokenizer.get_command(token) for token in self.stop_tokens]


CHATGLM = Family(
    "chatglm",
    "ChatGLM-6B",
    version=1,
    architecture=ARCH_GLM1,
    max_length=2048,
    top_p=0.7,
    temperature=0.95,
    finish=_pairs_finish(postprocess_chatglm6b),
    sliders=SliderDefaults(4096, 2048, 0.7, 0.95),
    hold_partial_characters=False,
)
CHATGLM2 = Family(
    "chatglm2",
    "ChatGLM2-6B",
    version=2,
    architecture=ARCH_GLM2,
    max_length=8192,
    top_p=0.8,
    temperature=0.8,
    finish=_pairs_finish(postprocess_chatglm2),
    sliders=SliderDefaults(32768, 8192, 0.8, 0.95),
)
# ChatGLM3-6B: the ChatGLM2 model and chat() defaults, role tokens, tool calls, its own demo defaults.
CHATGLM3 = replace(
    CHATGLM2,
    name="chatglm3",
    display_name="ChatGLM3-6B",
    version=3,
    finish=_chatglm3_finish,
    sliders=SliderDefaults(32768, 8192, 0.8, 0.6),
    roles=CHATGLM3_ROLES,
    build_inputs=_chatglm3_inputs,
    stop_tokens=("<|user|>", "<|observation|>"),
    metadata_line=True,
)
FAMILIES: tuple[Family, ...] = (CHATGLM, CHATGLM2, CHATGLM3)
_BY_VERSION = {family.version: family for family in FAMILIES}


def family_of(tokenizer: Any) -> Family:
    """The family of a tokenizer instance, from its `chatglm_version`."""
    family = _BY_VERSION.get(getattr(tokenizer, "chatglm_version", None))
    if family is None:
        raise TypeError(
            f"need a ChatGLM tokenizer from chatglm_ptuning (ChatGLM6BTokenizer, ChatGLM2Tokenizer or "
            f"ChatGLM3Tokenizer; AutoTokenizer returns one after `import chatglm_ptuning`); got {type(tokenizer).__name__}"
        )
    return family
