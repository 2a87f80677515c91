"""Terminal chat with a (P-tuned) ChatGLM model: `python -m chatglm_ptuning.cli_demo`.

Replies stream as they are generated. Commands: `clear` forgets the conversation, `stop` or `exit`
(or end of input) quits; Ctrl-C during a reply stops that reply. With `--tools tools.json` (ChatGLM3)
the model may answer with a tool call, printed as `Tool call: name {arguments}`; the next input is
then the call's result (sent as ChatGLM3's observation).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TextIO

from .serving import (
    ChatModel,
    GenerationWatch,
    TextDeltas,
    add_model_arguments,
    add_tools_argument,
    exit_on_user_error,
    is_tool_call,
    load_or_exit,
    load_tools,
    parse_model_arguments,
    response_text,
    tools_history,
)

CLEAR_COMMANDS = ("clear",)
EXIT_COMMANDS = ("stop", "exit")


def chat_loop(
    chat_model: ChatModel,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
    max_length: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
    tools: list[dict] | None = None,
) -> None:
    """Read queries with `read(prompt)` until an exit command or EOF; stream replies to `out`.
    With `tools` (ChatGLM3) a tool call is printed as a call and the next input is its result."""
    max_length = chat_model.capped_max_length(max_length)
    name = chat_model.family.display_name

    def say(text: str = "", end: str = "\n") -> None:
        out.write(text + end)
        out.flush()

    method = chat_model.info.get("Method")
    say(f"{name}, {method}" if method else name)
    say("Type to chat; 'clear' forgets the conversation, 'stop' or 'exit' quits, Ctrl-C stops a reply.")
    if tools:
        say("Tools: " + ", ".join(tool["name"] for tool in tools))
    history: list = tools_history(tools)
    role = "user"
    while True:
        try:
            query = read("\nUser: " if role == "user" else "\nResult of the tool call: ")
        except (EOFError, KeyboardInterrupt):
            say()
            return
        command = query.strip()
        if command in EXIT_COMMANDS:
            return
        if command in CLEAR_COMMANDS:
            history, role = tools_history(tools), "user"
            say("History cleared.")
            continue
        if not command:
            continue
        try:
            fitted = chat_model.fit(query, history, max_length, role)
        except ValueError as error:
            say(f"[{error}]")
            continue
        if fitted.notice:
            say(f"[{fitted.notice}]")
        say(f"\n{name}: ", end="")
        deltas, response, watch = TextDeltas(), "", GenerationWatch()
        try:
            for response, history in chat_model.replies(
                fitted.query,
                fitted.history,
                role=role,
                max_length=max_length,
                top_p=top_p,
                temperature=temperature,
                watch=watch,
            ):
                if isinstance(response, str):  # a tool call is printed whole once complete
                    say(deltas.update(response), end="")
            say(deltas.finish(response_text(response)))
            role = "observation" if tools and is_tool_call(response) else "user"
        except KeyboardInterrupt:
            watch.cancel()
            say(deltas.finish(response_text(response)) + " [stopped]")
        except Exception as error:  # noqa: BLE001 - report it and keep chatting
            say(f"\n[generation failed: {type(error).__name__}: {error}]")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m chatglm_ptuning.cli_demo", description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    generation = parser.add_argument_group("generation (defaults: the family's chat() defaults)")
    generation.add_argument("--max_length", type=int, help="prompt + reply tokens (capped at the model's context)")
    generation.add_argument("--top_p", type=float)
    generation.add_argument("--temperature", type=float, help="0: greedy")
    add_tools_argument(generation)
    return parse_model_arguments(parser, argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    chat_model = load_or_exit(args)
    try:
        tools = load_tools(args.tools, chat_model)
    except ValueError as error:
        exit_on_user_error(error)
        raise  # unreachable: exit_on_user_error exits
    chat_loop(chat_model, max_length=args.max_length, top_p=args.top_p, temperature=args.temperature, tools=tools)


if __name__ == "__main__":
    main()
