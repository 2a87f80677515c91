"""Terminal chat with a (P-tuned) ChatGLM model: `python -m chatglm_ptuning.cli_demo`.

Replies stream as they are generated. Commands: `clear` forgets the conversation, `stop` or `exit`
(or end of input) quits; Ctrl-C during a reply stops that reply.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TextIO

from .serving import ChatModel, GenerationWatch, TextDeltas, add_model_arguments, load_or_exit, parse_model_arguments

CLEAR_COMMANDS = ("clear",)
EXIT_COMMANDS = ("stop", "exit")


def chat_loop(
    chat_model: ChatModel,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
    max_length: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
) -> None:
    """Read queries with `read(prompt)` until an exit command or EOF; stream replies to `out`."""
    max_length = chat_model.capped_max_length(max_length)
    name = chat_model.family.name

    def say(text: str = "", end: str = "\n") -> None:
        out.write(text + end)
        out.flush()

    method = chat_model.info.get("Method")
    say(f"{name}, {method}" if method else name)
    say("Type to chat; 'clear' forgets the conversation, 'stop' or 'exit' quits, Ctrl-C stops a reply.")
    history: list = []
    while True:
        try:
            query = read("\nUser: ")
        except (EOFError, KeyboardInterrupt):
            say()
            return
        command = query.strip()
        if command in EXIT_COMMANDS:
            return
        if command in CLEAR_COMMANDS:
            history = []
            say("History cleared.")
            continue
        if not command:
            continue
        try:
            fitted = chat_model.fit(query, history, max_length)
        except ValueError as error:
            say(f"[{error}]")
            continue
        if fitted.notice:
            say(f"[{fitted.notice}]")
        say(f"\n{name}: ", end="")
        deltas, text, watch = TextDeltas(), "", GenerationWatch()
        try:
            for text, history in chat_model.stream(
                fitted.query, fitted.history, max_length=max_length, top_p=top_p, temperature=temperature, watch=watch
            ):
                say(deltas.update(text), end="")
            say(deltas.finish(text))
        except KeyboardInterrupt:
            watch.cancel()
            say(deltas.finish(text) + " [stopped]")
        except Exception as error:  # noqa: BLE001 - report it and keep chatting
            say(f"\n[generation failed: {type(error).__name__}: {error}]")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m chatglm_ptuning.cli_demo", description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    generation = parser.add_argument_group("generation (defaults: the family's chat() defaults)")
    generation.add_argument("--max_length", type=int, help="prompt + reply tokens (capped at the model's context)")
    generation.add_argument("--top_p", type=float)
    generation.add_argument("--temperature", type=float, help="0: greedy")
    return parse_model_arguments(parser, argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    chat_model = load_or_exit(args)
    chat_loop(chat_model, max_length=args.max_length, top_p=args.top_p, temperature=args.temperature)


if __name__ == "__main__":
    main()
