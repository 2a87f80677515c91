"""ChatGLM3 tool use as text: the tool system message, the fenced `tool_call(...)` a function call is
written as, and reading such a call back safely.

The texts are those of THUDM/ChatGLM3's fine-tuning demo (`finetune_chatmodel_demo/preprocess_utils.py`:
`TOOL_DEFINITION_PREFIX`, `FUNCTION_CALL_PREFIX`/`POSTFIX`, `format_function_call`) and its chat
template (`build_chat_input` appends `"\\n" + json.dumps(tools, indent=4, ensure_ascii=False)` to a
system message carrying `tools`, which gives the same text). The original reads a call back with
`eval`; here `ast` accepts only `tool_call(name=<literal>, ...)`.
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

TOOL_SYSTEM_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"
FUNCTION_CALL_PREFIX = "```python\n"
FUNCTION_CALL_POSTFIX = "\n```"


def tools_system_content(tools: Any) -> str:
    """The system message text the original inserts first for a row's `tools`."""
    return TOOL_SYSTEM_PROMPT + "\n" + json.dumps(tools, indent=4, ensure_ascii=False)


def _literal(value: Any) -> str:
    """A value as `astunparse` writes an `ast.Constant` holding it: its `repr`, except that a float's
    infinity is written `1e309` (a JSON value holds only str, numbers, bools, None, lists and dicts)."""
    if isinstance(value, float) and math.isinf(value):
        return repr(value).replace("inf", "1e309")
    return repr(value)


def render_tool_call(parameters: dict[str, Any]) -> str:
    """The fenced call an assistant function-call message holds: ```` ```python\\ntool_call(k=v, ...)\\n``` ````,
    as the original's `FUNCTION_CALL_PREFIX + format_function_call("tool_call", parameters) + POSTFIX`."""
    arguments = ", ".join(f"{name}={_literal(value)}" for name, value in parameters.items())
    return f"{FUNCTION_CALL_PREFIX}tool_call({arguments}){FUNCTION_CALL_POSTFIX}"


def tool_call_arguments(code: str) -> dict[str, Any] | None:
    """The keyword arguments of `tool_call(k=<literal>, ...)` source code, or None when the code is
    anything else (positional arguments, `**`, names, calls: nothing is evaluated)."""
    try:
        call = ast.parse(code.strip(), mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
            return None
        if call.args or any(keyword.arg is None for keyword in call.keywords):
            return None
        return {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):  # not a literal-only call
        return None


def fenced_call_arguments(content: str) -> dict[str, Any] | None:
    """Arguments of a function-call message's content (first and last lines are the fence), or None."""
    return tool_call_arguments("\n".join(content.split("\n")[1:-1]))


_CALL_TEXT = re.compile(r"\s*([^\s`][^\n]*)\n\s*```[^\n]*\n(.*?)\n```", re.DOTALL)


def parse_call_text(text: str) -> tuple[str, dict[str, Any]] | None:
    """(name, arguments) of a decoded function-call step, `name\\n```python\\ntool_call(...)\\n```` (what
    follows the closing fence is ignored), or None when `text` is not such a call."""
    match = _CALL_TEXT.match(text)
    if not match:
        return None
    arguments = tool_call_arguments(match.group(2))
    return None if arguments is None else (match.group(1).strip(), arguments)
