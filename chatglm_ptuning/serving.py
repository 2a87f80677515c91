"""What the chat front ends share: loading flags, the loaded model with its description, fitting a
prompt into the model's context, and streaming a reply as append-only text.

`web_demo`, `cli_demo` and `api` each parse `add_model_arguments` flags, call `load_chat_model`, and
talk to the model only through `ChatModel`.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .checkpoint import CheckpointError, has_method_settings, read_checkpoint_settings
from .configuration import ARCH_GLM2
from .families import FAMILIES, Family, History, Response, family_of
from .prompt_learning import METHOD_REGISTRY
from .tools import TOOL_SYSTEM_PROMPT

# ---- command line -----------------------------------------------------------------------------


def _flag_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, found {text!r}")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The loading flags every front end takes (the names of the training CLI)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model_name_or_path", help="local ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B folder (required)")
    group.add_argument(
        "--ptuning_checkpoint",
        help="checkpoint folder (any method: soft prompt, LoRA adapter or full fine-tune): this toolkit's "
        "(ptuning_config.json beside the weights) or an official P-tuning v2 one (pytorch_model.bin + config.json)",
    )
    group.add_argument(
        "--pre_seq_len", type=int, help="virtual tokens (soft prompts); only for checkpoints that do not record it (official ones do)"
    )
    group.add_argument(
        "--prefix_projection",
        type=_flag_bool,
        nargs="?",
        const=True,
        help="MLP-reparameterised prefix; only for checkpoints that do not record it",
    )
    group.add_argument(
        "--quantization_bit", type=int, choices=(4, 8), help="quantize the backbone to INT4/INT8 while loading"
    )
    group.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    group.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="backbone dtype (default: half on GPU, float32 on CPU)",
    )
    group.add_argument(
        "--chatglm_version",
        type=int,
        choices=[family.version for family in FAMILIES if family.architecture == ARCH_GLM2],
        help="ChatGLM2 (2) or ChatGLM3 (3) template for a folder that does not say",
    )


def server_parser(prog: str, description: str, port: int) -> tuple[argparse.ArgumentParser, Any]:
    """A server front end's parser and its "server" group: the model flags, --host (127.0.0.1) and --port."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_model_arguments(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=port)
    return parser, server


def parse_model_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse; without --model_name_or_path, say how to get the default model served."""
    args = parser.parse_args(argv)
    if args.model_name_or_path is None:
        parser.error(
            "--model_name_or_path is required. To chat with the embedded tiny model P-tuned by `bash train.sh`, "
            "run `bash web_demo.sh` (after `bash train.sh`)."
        )
    return args


def exit_on_user_error(error: Exception) -> None:
    """Expected user mistakes (a wrong path, a mismatched checkpoint) end in one line, not a traceback."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


# ---- the loaded model -------------------------------------------------------------------------


def context_length(config: Any) -> int:
    """Tokens the model was built for: `seq_length` (ChatGLM2/3) or `max_sequence_length` (ChatGLM-6B)."""
    for name in ("seq_length", "max_sequence_length"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise ValueError(f"{type(config).__name__} has neither seq_length nor max_sequence_length")


def is_tool_call(response: Response) -> bool:
    """True for a ChatGLM3 reply that is a parsed tool call (`{"name", "parameters"}`)."""
    return isinstance(response, dict) and "parameters" in response


def response_text(response: Response) -> str:
    """A chat response as display text: a tool call as `Tool call: name {arguments as JSON}`; a
    ChatGLM3 reply with metadata that is not a call as its name and content; text as it is."""
    if isinstance(response, str):
        return response
    if is_tool_call(response):
        return f"Tool call: {response['name']} {json.dumps(response['parameters'], ensure_ascii=False, default=repr)}"
    return f"{response.get('name', '')}\n{response.get('content', '')}"


def add_tools_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tools",
        help="JSON file holding a list of tool definitions (ChatGLM3 only; {name, description, parameters} or "
        "OpenAI's {type: function, function: {...}}): the model may answer with a tool call, shown as a call, and "
        "the next input is then the call's result",
    )


def load_tools(path: str | None, chat_model: ChatModel) -> list[dict[str, Any]] | None:
    """The tool definitions of a `--tools` file (OpenAI's function wrappers unwrapped); ValueError
    naming the file for anything else, or when the model is not ChatGLM3."""
    if path is None:
        return None
    if not chat_model.family.tool_calls:
        raise ValueError(f"--tools: tool calls need a ChatGLM3 model; the loaded model is {chat_model.family.display_name}")
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--tools {path}: cannot read a JSON file ({error})") from None
    if not isinstance(tools, list):
        raise ValueError(f"--tools {path}: expected a JSON array of tool definitions, found {type(tools).__name__}")
    unwrapped = []
    for index, tool in enumerate(tools):
        if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict):
            tool = tool["function"]
        if not (isinstance(tool, dict) and isinstance(tool.get("name"), str) and tool["name"]):
            raise ValueError(f"--tools {path}: tool {index} must be an object with a \"name\", found {str(tool)[:60]}")
        unwrapped.append(tool)
    return unwrapped


def tools_history(tools: list[dict[str, Any]] | None) -> History:
    """The history a ChatGLM3 chat with `tools` starts from: the tool system message (empty without tools)."""
    return [{"role": "system", "content": TOOL_SYSTEM_PROMPT, "tools": tools}] if tools else []


@dataclass
class FittedPrompt:
    query: str
    history: History
    prompt_tokens: int
    notice: str | None = None  # set when turns were dropped or the query was cut


class GenerationWatch(StoppingCriteria):
    """A stopping criterion that never stops by itself: it records how far generation got and stops
    when `cancel()` is called (from any thread, e.g. a client that went away)."""

    def __init__(self) -> None:
        self.length = 0  # prompt + generated tokens at the last step
        self.last_token: int | None = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.length = int(input_ids.shape[1])
        self.last_token = int(input_ids[0, -1])
        return torch.full((input_ids.shape[0],), self._cancelled.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class ChatModel:
    """A loaded model and tokenizer, what they are (for display), and chat with context limits."""

    model: Any
    tokenizer: Any
    family: Family = field(init=False)
    context_length: int = field(init=False)
    info: dict[str, str] = field(default_factory=dict)  # "Base model", "Method", "Checkpoint", ... for display
    title: str = ""  # what the pages call the model (default: the family's name)

    def __post_init__(self) -> None:
        self.family = family_of(self.tokenizer)
        self.context_length = context_length(self.model.config)
        self.title = self.title or self.family.display_name

    def prompt_tokens(self, query: str, history: History, role: str = "user") -> int:
        return int(self.family.build_inputs(self.tokenizer, query, history, role)["input_ids"].shape[1])

    def capped_max_length(self, max_length: int | None) -> int:
        """`max_length` (prompt + reply tokens; None: the family's chat default) within the context."""
        return min(int(max_length if max_length is not None else self.family.max_length), self.context_length)

    def fit(self, query: str, history: History, max_length: int | None = None, role: str = "user") -> FittedPrompt:
        """Make the prompt for `query` after `history` short enough to leave a quarter of
        `max_length` (capped at the context) for the reply.

        The oldest turns go first; if the query alone is still too long it keeps its first tokens.
        The notice says what was left out. ValueError when even an empty query would not fit.
        """
        max_length = self.capped_max_length(max_length)
        budget = max_length - max(1, max_length // 4)
        history = list(history)
        full = length = self.prompt_tokens(query, history, role)
        dropped = 0
        while length > budget:
            shorter = _without_oldest_turn(history)
            if len(shorter) == len(history):  # nothing left to drop (ChatGLM3 keeps system messages)
                break
            history, dropped = shorter, dropped + 1
            length = self.prompt_tokens(query, history, role)
        kept_tokens = None
        if length > budget:
            ids = self.tokenizer.encode(query, add_special_tokens=False)
            keep = budget - (length - len(ids))
            while keep > 0:  # the template may tokenize a cut query a little differently: shrink until it fits
                query = self.tokenizer.decode(ids[:keep]).rstrip("\ufffd")
                length = self.prompt_tokens(query, history, role)
                if length <= budget:
                    break
                keep -= length - budget
            if keep <= 0 or not query.strip():  # nothing of the message would be left
                raise ValueError(
                    f"A maximum length of {max_length} tokens leaves too little room for the prompt "
                    f"({budget} tokens, the chat template alone needs {length - len(ids)})"
                )
            kept_tokens = keep
        if not dropped and kept_tokens is None:
            return FittedPrompt(query, history, length)
        parts = []
        if dropped:
            turns = "the oldest turn" if dropped == 1 else f"the {dropped} oldest turns"
            parts.append(f"{turns} of the conversation {'was' if dropped == 1 else 'were'} left out")
        if kept_tokens is not None:
            parts.append(f"the message was cut to its first {kept_tokens} tokens")
        notice = (
            f"Input truncated: the prompt came to {full} tokens; a maximum length of {max_length} "
            f"(the model's context is {self.context_length}) leaves {budget} for it, so {' and '.join(parts)}."
        )
        return FittedPrompt(query, history, length, notice)

    def replies(
        self,
        query: str,
        history: History,
        *,
        role: str = "user",
        max_length: int | None = None,
        max_new_tokens: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        watch: GenerationWatch | None = None,
    ) -> Iterator[tuple[Response, History]]:
        """Yield (response so far, history with this turn) as tokens arrive; a ChatGLM3 tool call is
        a dict (see `families.parse_chatglm3_response`). `role` is the query's (ChatGLM3: user or observation).

        Temperature 0 means greedy decoding (sampling needs a positive temperature).
        """
        kwargs: dict[str, Any] = {"top_p": top_p, "temperature": temperature, "max_length": max_length}
        if temperature is not None and temperature <= 0:
            kwargs.update(do_sample=False, top_p=None, temperature=None)
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
        if watch is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([watch])
        if role != "user":
            kwargs["role"] = role
        yield from self.model.stream_chat(self.tokenizer, query, history, **kwargs)

    def stream(self, query: str, history: History, **kwargs: Any) -> Iterator[tuple[str, History]]:
        """`replies` as display text (a tool call as JSON)."""
        for response, new_history in self.replies(query, history, **kwargs):
            yield response_text(response), new_history


def _without_oldest_turn(history: History) -> History:
    """`history` less its oldest turn: one (query, response) pair, or for ChatGLM3 messages the first
    user message and the replies after it (leading system messages stay, so this may drop nothing)."""
    if not history or not isinstance(history[0], dict):
        return history[1:]
    start = next((i for i, message in enumerate(history) if message.get("role") != "system"), len(history))
    end = start + 1
    while end < len(history) and history[end].get("role") != "user":
        end += 1
    return history[:start] + history[end:]


def describe(
    model: Any,
    family: Family,
    model_name_or_path: str,
    ptuning_checkpoint: str | None,
    quantization_bit: int | None,
) -> dict[str, str]:
    """What is being served, for the page and the API's model card."""
    config = model.config
    settings = None
    if ptuning_checkpoint and has_method_settings(ptuning_checkpoint):
        settings = read_checkpoint_settings(ptuning_checkpoint)  # any method's, a bare PEFT folder included
    # Without settings the checkpoint is an official P-tuning v2 one, whose settings the config now holds.
    method = settings.method if settings else ("ptuning_v2" if config.pre_seq_len else None)
    if method is None:
        method_text = "none (base model)"
    else:
        details = []
        pre_seq_len = settings.pre_seq_len if settings else config.pre_seq_len
        if pre_seq_len:
            details.append(f"pre_seq_len {pre_seq_len}")
        if method == "ptuning_v2":
            details.append(f"{'with' if config.prefix_projection else 'without'} prefix projection")
        method_text = METHOD_REGISTRY[method].display_name + (f" ({', '.join(details)})" if details else "")
    bits = quantization_bit or getattr(config, "quantization_bit", 0)
    return {
        "Base model": str(model_name_or_path),
        "Family": family.display_name,
        "Method": method_text,
        "Checkpoint": str(ptuning_checkpoint) if ptuning_checkpoint else "none",
        "Weights": f"INT{bits}" if bits else str(next(model.parameters()).dtype).replace("torch.", ""),
        "Device": str(model.device),
        "Context": f"{context_length(config)} tokens",
    }


EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "embedded"


def model_title(model_name_or_path: str, family: Family) -> str:
    """The loaded model by name: the embedded default as such, otherwise the base folder's name;
    with the chat template in use (e.g. `chatglm3-6b (ChatGLM3-6B template)`)."""
    path = Path(model_name_or_path)
    name = "Embedded tiny model" if path.resolve() == EMBEDDED_MODEL_DIR else (path.name or str(model_name_or_path))
    return f"{name} ({family.display_name} template)"


def load_chat_model(args: argparse.Namespace) -> ChatModel:
    """Load what `add_model_arguments` flags name; user mistakes raise CheckpointError/ValueError/OSError."""
    from .loading import load_model

    model, tokenizer = load_model(
        args.model_name_or_path,
        ptuning_checkpoint=args.ptuning_checkpoint,
        pre_seq_len=args.pre_seq_len,
        prefix_projection=args.prefix_projection,
        quantization_bit=args.quantization_bit,
        device=args.device,
        dtype=args.dtype,
        chatglm_version=args.chatglm_version,
    )
    chat_model = ChatModel(model, tokenizer)
    chat_model.title = model_title(args.model_name_or_path, chat_model.family)
    chat_model.info = describe(
        model, chat_model.family, args.model_name_or_path, args.ptuning_checkpoint, args.quantization_bit
    )
    return chat_model


def load_or_exit(args: argparse.Namespace) -> ChatModel:
    try:
        return load_chat_model(args)
    except (CheckpointError, ValueError, OSError) as error:
        exit_on_user_error(error)
        raise  # unreachable: exit_on_user_error exits


# ---- streaming as append-only text ------------------------------------------------------------

_REWRITTEN_MARKER = "[[训练时间]]"  # replaced by "2023年" once complete
_REWRITTEN_MARKS = ",!:;?"  # ChatGLM-6B makes these full width once a CJK character follows


def _stable_length(text: str) -> int:
    """How much of a partial reply later tokens cannot rewrite through the families' post-processing."""
    for size in range(min(len(_REWRITTEN_MARKER) - 1, len(text)), 0, -1):
        if _REWRITTEN_MARKER.startswith(text[-size:]):
            return len(text) - size
    if text and text[-1] in _REWRITTEN_MARKS:
        return len(text) - 1
    return len(text)


class TextDeltas:
    """Turns successive whole-reply snapshots into appended pieces (terminal output, SSE deltas).

    A snapshot's tail may still change (post-processing rewrites `[[训练时间]]` and, for ChatGLM-6B,
    punctuation next to CJK), so that tail is held back until the next snapshot or `finish`.
    """

    def __init__(self) -> None:
        self.sent = ""

    def update(self, snapshot: str) -> str:
        return self._advance(snapshot[: _stable_length(snapshot)])

    def finish(self, snapshot: str) -> str:
        return self._advance(snapshot)

    def _advance(self, stable: str) -> str:
        if len(stable) <= len(self.sent):
            return ""
        piece = stable[len(self.sent) :]
        self.sent = stable
        return piece
