"""Browser chat with a (P-tuned) ChatGLM model: `python -m chatglm_ptuning.web_demo` or `bash web_demo.sh`.

The page follows the reference ptuning/web_demo.py (chat with history, Submit, Clear History,
sliders for maximum length, top-p and temperature with the same defaults), adds Stop, shows what is
loaded, and serves every user from one queue with a bounded number of generations at a time; each
browser session keeps its own history. The page is titled by the loaded model. With `--tools
tools.json` (ChatGLM3) a tool call is shown as a call (name and arguments) and the next message is
sent as the call's result (ChatGLM3's observation).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from typing import Any

from .serving import (
    ChatModel,
    GenerationWatch,
    add_tools_argument,
    exit_on_user_error,
    is_tool_call,
    load_or_exit,
    load_tools,
    parse_model_arguments,
    response_text,
    server_parser,
    tools_history,
)

# gradio reports usage to its servers unless told not to; a local demo should not.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import gradio as gr

logger = logging.getLogger(__name__)


# Fenced code blocks and inline code spans: kept as they are in a user's message.
_CODE = re.compile(r"(```.*?(?:```|$)|`[^`\n]+`)", re.DOTALL)
_MARKDOWN_PUNCTUATION = re.compile(r"([\\*_{}\[\]()#+\-.!|~<>])")


def literal_markdown(text: str) -> str:
    """A user's message for the Markdown chatbot: code blocks and code spans render as code, everything
    else shows as typed (ADGEN inputs such as `类型#裙*风格#学院*...` would otherwise turn italic)."""
    parts = _CODE.split(text)  # odd indices are code
    return "".join(part if i % 2 else _MARKDOWN_PUNCTUATION.sub(r"\\\1", part) for i, part in enumerate(parts))


def _new_session(tools: list[dict] | None = None) -> dict[str, Any]:
    # "history" is what the model is conditioned on; "messages" is what the page shows (notices included);
    # "role" is the next message's: "observation" right after a tool call.
    return {"history": tools_history(tools), "messages": [], "role": "user"}


RESULT_LABEL = "Result of the tool call:"


def reply_markdown(response: Any) -> str:
    """A reply for the chatbot: text as it is, a tool call as the tool's name and its arguments."""
    if is_tool_call(response):
        arguments = json.dumps(response["parameters"], ensure_ascii=False, indent=2, default=repr)
        return f"🛠️ Tool call: `{response['name']}`\n```json\n{arguments}\n```"
    return response_text(response)


class ActiveGenerations:
    """The generation running for each browser session, so that Stop and Clear end it at once.

    gradio's own cancel closes the handler only while it is suspended between updates, and a
    streaming handler is almost always inside the next token, so generation would run to its end.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watches: dict[str, GenerationWatch] = {}

    def start(self, session_id: str) -> GenerationWatch:
        watch = GenerationWatch()
        with self._lock:
            self._watches[session_id] = watch
        return watch

    def finish(self, session_id: str, watch: GenerationWatch) -> None:
        watch.cancel()
        with self._lock:
            if self._watches.get(session_id) is watch:
                del self._watches[session_id]

    def stop(self, session_id: str) -> None:
        with self._lock:
            watch = self._watches.pop(session_id, None)
        if watch is not None:
            watch.cancel()


def make_respond(chat_model: ChatModel, active: ActiveGenerations):
    """The chat event handler: (message, max_length, top_p, temperature, session) -> stream of
    (chatbot messages, session, textbox)."""

    def respond(
        message: str, max_length: float, top_p: float, temperature: float, session: dict[str, Any], request: gr.Request
    ) -> Iterator[tuple[Any, Any, Any]]:
        if not message or not message.strip():
            yield gr.skip(), gr.skip(), gr.skip()
            return
        history, role = session["history"], session.get("role", "user")
        shown = literal_markdown(message)
        if role == "observation":
            shown = f"{RESULT_LABEL}\n\n{shown}"
        messages = [*session["messages"], {"role": "user", "content": shown}]

        def state(new_history: list, next_role: str = role) -> dict[str, Any]:
            return {"history": new_history, "messages": messages, "role": next_role}

        def notice(text: str) -> None:
            messages.append({"role": "assistant", "content": f"⚠️ {text}"})

        limit = chat_model.capped_max_length(max_length)
        try:
            fitted = chat_model.fit(message, history, limit, role)
        except ValueError as error:
            notice(f"{error}: raise Maximum length.")
            yield messages, state(history), ""
            return
        if fitted.notice:
            notice(fitted.notice)
        messages.append({"role": "assistant", "content": ""})
        yield messages, state(history), ""

        watch = active.start(request.session_hash or "")
        try:
            for response, new_history in chat_model.replies(
                fitted.query,
                fitted.history,
                role=role,
                max_length=limit,
                top_p=top_p,
                temperature=temperature,
                watch=watch,
            ):
                messages[-1] = {"role": "assistant", "content": reply_markdown(response)}
                yield messages, state(new_history, "observation" if is_tool_call(response) else "user"), gr.skip()
        except Exception as error:  # shown in the chat; the server keeps serving
            logger.exception("generation failed")
            messages[-1] = {"role": "assistant", "content": f"⚠️ Generation failed: {type(error).__name__}: {error}"}
            yield messages, state(history), gr.skip()
        finally:
            active.finish(request.session_hash or "", watch)

    return respond


def _info_markdown(chat_model: ChatModel) -> str:
    return "\n".join(f"- **{key}**: `{value}`" for key, value in chat_model.info.items())


def build_demo(chat_model: ChatModel, tools: list[dict] | None = None) -> gr.Blocks:
    """The page for `chat_model` (with `tools`: ChatGLM3 tool calls); its chat event is exposed to
    gradio clients as `/chat`."""
    defaults = chat_model.family.sliders
    with gr.Blocks(title=f"{chat_model.title} P-tuning demo") as demo:
        gr.HTML(f'<h1 style="text-align: center">{html.escape(chat_model.title)}</h1>', elem_id="title")
        with gr.Accordion("Loaded model", open=True):
            gr.Markdown(_info_markdown(chat_model), elem_id="model-info")
            if tools:
                names = ", ".join(f"`{tool['name']}`" for tool in tools)
                gr.Markdown(f"**Tools**: {names}. After a tool call, send its result.", elem_id="tools")
        chatbot = gr.Chatbot(
            height=480, show_label=False, feedback_options=None, buttons=["copy", "copy_all"], elem_id="chatbot"
        )
        with gr.Row():
            with gr.Column(scale=4):
                user_input = gr.Textbox(
                    show_label=False,
                    placeholder="Input... (Enter sends, Shift+Enter adds a line)",
                    lines=4,
                    elem_id="user-input",
                )
                with gr.Row():
                    submit = gr.Button("Submit", variant="primary", elem_id="submit")
                    stop = gr.Button("Stop", elem_id="stop")
            with gr.Column(scale=1):
                clear = gr.Button("Clear History", elem_id="clear")
                max_length = gr.Slider(
                    0,
                    defaults.max_length_limit,
                    value=defaults.max_length,
                    step=1,
                    label=f"Maximum length (capped at the model's context, {chat_model.context_length})",
                )
                top_p = gr.Slider(0, 1, value=defaults.top_p, step=0.01, label="Top P")
                temperature = gr.Slider(0, 1, value=defaults.temperature, step=0.01, label="Temperature (0: greedy)")
        session = gr.State(_new_session(tools))

        active = ActiveGenerations()
        respond = make_respond(chat_model, active)
        inputs = [user_input, max_length, top_p, temperature, session]
        outputs = [chatbot, session, user_input]
        chat_events = [
            submit.click(respond, inputs, outputs, api_name="chat"),
            user_input.submit(respond, inputs, outputs, api_visibility="private"),
        ]

        def stop_generation(request: gr.Request) -> None:
            active.stop(request.session_hash or "")

        def clear_history(request: gr.Request) -> tuple[list, dict[str, Any], str]:
            active.stop(request.session_hash or "")
            return [], _new_session(tools), ""

        stop.click(stop_generation, None, None, cancels=chat_events, queue=False, api_name="stop")
        clear.click(clear_history, None, outputs, cancels=chat_events, queue=False, api_name="clear")
        # The chatbot's own trash icon clears the history too.
        chatbot.clear(clear_history, None, outputs, cancels=chat_events, queue=False, api_visibility="private")
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser, server = server_parser("python -m chatglm_ptuning.web_demo", __doc__.split("\n")[0], port=7860)
    server.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs network)")
    server.add_argument(
        "--concurrency", type=int, default=1, help="generations running at once; the rest wait in the queue"
    )
    server.add_argument("--max_queue", type=int, default=64, help="requests waiting at most; later ones are refused")
    add_tools_argument(parser)
    return parse_model_arguments(parser, argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.concurrency < 1 or args.max_queue < 1:
        print("error: --concurrency and --max_queue must be at least 1", file=sys.stderr)
        sys.exit(2)
    chat_model = load_or_exit(args)
    try:
        tools = load_tools(args.tools, chat_model)
    except ValueError as error:
        exit_on_user_error(error)
        raise  # unreachable: exit_on_user_error exits
    for key, value in chat_model.info.items():
        print(f"{key}: {value}")
    demo = build_demo(chat_model, tools)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.max_queue)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, inbrowser=False, show_error=False)


if __name__ == "__main__":
    main()
