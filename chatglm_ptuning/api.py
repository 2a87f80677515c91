"""OpenAI-compatible HTTP server for a (P-tuned) ChatGLM model: `python -m chatglm_ptuning.api`.

Endpoints: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions` (with `stream`:
server-sent events ending in `data: [DONE]`). Any `model` name is accepted (clients often send a
fixed one); replies carry the served id. Errors use OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with 400 for invalid requests (bad JSON, JSON
nested deeper than 64 levels, text with a lone surrogate, missing or misordered messages, unknown
roles, values of the wrong JSON type (strict, as OpenAI: `"0.5"` is not a number), out-of-range
parameters, prompts longer than the context), 401 for a wrong API key, 413 for an oversized body and
500 for a failed generation. A non-streaming request whose client disconnects stops generating at
the next token, freeing the model for the requests waiting. `/v1/models` names the model folders,
never their local paths.

Function calling (ChatGLM3 models only; the others answer `tools` with a 400): `tools` become
ChatGLM3's tool system message, a reply that is a tool call comes back as `message.tool_calls` with
`finish_reason: "tool_calls"` (streamed as `delta.tool_calls`), and assistant `tool_calls` with the
`tool` messages answering them go back to the model as its function-call and observation turns, as
ChatGLM3's openai_api_demo maps them; `tool_choice` "auto" or "none".

Reference: the official ChatGLM2-6B openai_api.py (system message prepended to the query, history
from user/assistant pairs); this server adds validation, limits, usage counts and finish reasons.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request  # fastapi, uvicorn and pydantic come with gradio
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .serving import (
    ChatModel,
    GenerationWatch,
    TextDeltas,
    load_or_exit,
    parse_model_arguments,
    response_text,
    server_parser,
)
from .tools import TOOL_SYSTEM_PROMPT, render_tool_call

logger = logging.getLogger(__name__)

# ---- request schema ---------------------------------------------------------------------------


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str
    arguments: str  # a JSON object, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None  # OpenAI's list of text parts is joined into one string; null only beside tool_calls
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this is the result of

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, content: Any) -> Any:
        if not isinstance(content, list):
            return content
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(
                    f"only text content parts ({{'type': 'text', 'text': ...}}) are supported, found {part!r}"
                )
            texts.append(part["text"])
        return "".join(texts)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # description, parameters, ...: passed on as given
    name: str = Field(min_length=1)


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields this server uses; other OpenAI fields are accepted and ignored.

    Strict types, as OpenAI checks them: `"temperature": "0.5"`, `"max_tokens": true` or
    `"stream": "yes"` are refused rather than coerced (an integer is still a valid float).
    """

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)  # 0: greedy
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # newer name of max_tokens; wins when both are set
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None  # ChatGLM3 only
    tool_choice: Any = None  # "none" or "auto" (the default when tools are given)


class RequestError(Exception):
    """An invalid request: answered with `status` and OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def error_body(
    message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _validation_message(error: ValidationError) -> tuple[str, str]:
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or "body"
    if first["type"] == "value_error":  # our own validators: the message says it all
        return f"{param}: {first['ctx']['error']}", param
    found = f" (found {first['input']!r})" if first["type"] != "missing" and "input" in first else ""
    return f"{param}: {first['msg']}{found}", param


MAX_JSON_DEPTH = 64  # deeper request bodies are refused (OpenAI's own requests nest a handful of levels)


def check_json_text(value: Any) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH and strings holding a lone UTF-16 surrogate
    (`"\\ud800"` parses, but it is not Unicode text: no tokenizer or UTF-8 writer takes it).

    Walks iteratively, so no depth can overflow the stack; errors name the JSON path.
    """
    pending: list[tuple[Any, tuple, int]] = [(value, (), 0)]
    while pending:
        item, path, depth = pending.pop()
        param = ".".join(map(str, path)) or None
        if depth > MAX_JSON_DEPTH:
            raise RequestError(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, str):
            surrogate = _SURROGATE.search(item)
            if surrogate:
                raise RequestError(
                    f"{param or 'body'}: the text holds a lone surrogate (\\u{ord(surrogate.group()):04x} at character "
                    f"{surrogate.start()}), which is not valid Unicode",
                    param,
                )
        elif isinstance(item, dict):
            for key, child in item.items():
                pending.append((key, path, depth + 1))
                pending.append((child, (*path, key), depth + 1))
        elif isinstance(item, list):
            pending.extend((child, (*path, index), depth + 1) for index, child in enumerate(item))


_SURROGATE = re.compile(r"[\ud800-\udfff]")


# ---- messages -> (query, history) -------------------------------------------------------------


@dataclass
class Turn:
    """What the model is asked: the query, its role (ChatGLM3: user or observation) and the history."""

    query: str
    history: list
    role: str = "user"


def _text(message: Message, index: int) -> str:
    if message.content is None:
        raise RequestError(f"messages[{index}].content: expected a string, found null", f"messages.{index}.content")
    return message.content


def conversation(messages: list[Message], message_history: bool, tools: list[dict] | None = None) -> Turn:
    """Split OpenAI messages into the query and the family's history.

    Leading system messages are allowed; then user and assistant must alternate, ending with user.
    ChatGLM3 (`message_history`) keeps system messages in its history; ChatGLM-6B/2 have no system
    role, so their text is put before the query, as the official openai_api.py does. ChatGLM3 also
    takes function calling (see `_chatglm3_turn`); the other families refuse it.
    """
    if message_history:
        return _chatglm3_turn(messages, tools)
    for index, message in enumerate(messages):
        if message.role == "tool" or message.tool_calls:
            what = "'tool' messages" if message.role == "tool" else "tool_calls"
            param = f"messages.{index}.role" if message.role == "tool" else f"messages.{index}.tool_calls"
            raise RequestError(
                f"messages[{index}]: {what} (function calling) need a ChatGLM3 model; this server's model has no "
                f"tool calls (found role {message.role!r})",
                param,
            )
    system = []
    start = 0
    while start < len(messages) and messages[start].role == "system":
        system.append(_text(messages[start], start))
        start += 1
    turns = messages[start:]
    if not turns:
        raise RequestError("messages must contain a user message after the system message(s)", "messages")
    for index, message in enumerate(turns, start):
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        if message.role != expected:
            raise RequestError(
                f"messages[{index}].role: expected {expected!r} (after any leading system messages, user and assistant "
                f"alternate), found {message.role!r}",
                f"messages.{index}.role",
            )
        _text(message, index)
    if turns[-1].role != "user":
        raise RequestError(
            f"the last message must have role 'user', found {turns[-1].role!r}", f"messages.{len(messages) - 1}.role"
        )
    query = turns[-1].content
    previous = turns[:-1]
    history = [(previous[i].content, previous[i + 1].content) for i in range(0, len(previous), 2)]
    if system:
        query = "\n".join(system) + "\n" + query if query else "\n".join(system)
    return Turn(query, history)


def _call_message(call: ToolCall, where: str) -> dict[str, Any]:
    """An OpenAI tool call as ChatGLM3's function-call message (metadata = name, the fenced call)."""
    try:
        arguments = json.loads(call.function.arguments)
    except json.JSONDecodeError as error:
        arguments = error
    if not isinstance(arguments, dict):
        raise RequestError(
            f"{where}.function.arguments: expected a JSON object as a string, found {call.function.arguments[:80]!r}",
            f"{where}.function.arguments",
        )
    return {"role": "assistant", "metadata": call.function.name, "content": render_tool_call(arguments)}


def _chatglm3_turn(messages: list[Message], tools: list[dict] | None) -> Turn:
    """ChatGLM3 messages, as its openai_api_demo maps them: `tools` -> a first system message carrying
    them; an assistant message with `tool_calls` -> its text (if any) and one function-call message
    per call, each followed by the observation of the `tool` message answering it (by tool_call_id).

    Order: system messages, then user; an assistant reply (text, calls, or both) after each user
    message or after the tool results; `tool` messages right after the calls they answer, all of
    them. The last message is the query: a user message, or a tool result (role observation).
    """
    out: list[dict[str, Any]] = []
    if tools is not None:
        out.append({"role": "system", "content": TOOL_SYSTEM_PROMPT, "tools": tools})
    index = 0
    while index < len(messages) and messages[index].role == "system":
        out.append({"role": "system", "content": _text(messages[index], index)})
        index += 1
    expected = ("user",)
    while index < len(messages):
        message = messages[index]
        if message.role not in expected:
            raise RequestError(
                f"messages[{index}].role: expected {' or '.join(map(repr, expected))} (after any leading system "
                "messages, a user message, then the assistant's reply: text, tool_calls with a 'tool' message for "
                f"each, or both), found {message.role!r}",
                f"messages.{index}.role",
            )
        if message.role == "user":
            out.append({"role": "user", "content": _text(message, index)})
            expected, index = ("assistant",), index + 1
            continue
        if message.role == "tool":  # a result without a call before it
            raise RequestError(
                f"messages[{index}]: a 'tool' message must follow an assistant message with tool_calls",
                f"messages.{index}.role",
            )
        if not message.tool_calls:
            out.append({"role": "assistant", "metadata": "", "content": _text(message, index)})
            expected, index = ("user",), index + 1
            continue
        if message.content:
            out.append({"role": "assistant", "metadata": "", "content": message.content})
        where = f"messages.{index}.tool_calls"
        calls = {call.id: (_call_message(call, f"{where}.{n}"), n) for n, call in enumerate(message.tool_calls)}
        if len(calls) != len(message.tool_calls):
            raise RequestError(f"messages[{index}].tool_calls: two calls share an id", where)
        results: dict[str, str] = {}
        index += 1
        while index < len(messages) and messages[index].role == "tool" and len(results) < len(calls):
            result = messages[index]
            if result.tool_call_id not in calls or result.tool_call_id in results:
                raise RequestError(
                    f"messages[{index}].tool_call_id: expected one of the unanswered calls "
                    f"{sorted(set(calls) - set(results))}, found {result.tool_call_id!r}",
                    f"messages.{index}.tool_call_id",
                )
            results[result.tool_call_id] = _text(result, index)
            index += 1
        if len(results) < len(calls):
            missing = sorted(set(calls) - set(results))
            raise RequestError(
                f"messages[{index - 1}]: every tool call needs a 'tool' message with its tool_call_id; missing {missing}",
                "messages",
            )
        for call_id, (call, _) in sorted(calls.items(), key=lambda item: item[1][1]):
            out += [call, {"role": "observation", "content": results[call_id]}]
        expected = ("assistant",)
    last = out[-1]
    if last["role"] not in ("user", "observation"):
        raise RequestError(
            f"the last message must be a user message or a tool result, found {messages[-1].role!r}",
            f"messages.{len(messages) - 1}.role",
        )
    if not any(message["role"] == "user" for message in out):
        raise RequestError("messages must contain a user message after the system message(s)", "messages")
    return Turn(last["content"], out[:-1], last["role"])


# ---- the app ----------------------------------------------------------------------------------


@dataclass
class ServerLimits:
    max_tokens: int  # the most tokens one reply may ask for
    max_body_bytes: int
    concurrency: int  # generations running at once; further requests wait


@dataclass
class Completion:
    turn: Turn
    prompt_tokens: int
    max_new_tokens: int
    tools_offered: bool  # a tool call in the reply is returned as tool_calls


def _offered_tools(chat_model: ChatModel, request: ChatCompletionRequest) -> list[dict] | None:
    """The request's function definitions for ChatGLM3's tool system message, or None (no tools, or
    tool_choice "none"). Other families and other tool_choice values are refused."""
    choice = request.tool_choice
    if choice is not None and choice not in ("none", "auto"):
        raise RequestError(
            f"tool_choice: only \"none\" and \"auto\" are supported (ChatGLM3 decides itself whether to call a "
            f"tool), found {json.dumps(choice)[:80]}",
            "tool_choice",
        )
    if request.tools is None:
        return None
    if not chat_model.family.tool_calls:
        raise RequestError(
            f"tools: function calling needs a ChatGLM3 model; this server's model is {chat_model.family.display_name}, "
            "which was not trained for tool calls",
            "tools",
        )
    if choice == "none" or not request.tools:
        return None
    return [tool.function.model_dump() for tool in request.tools]


def _plan(chat_model: ChatModel, request: ChatCompletionRequest, limits: ServerLimits) -> Completion:
    tools = _offered_tools(chat_model, request)
    turn = conversation(request.messages, chat_model.family.tool_calls, tools)
    asked = request.max_completion_tokens or request.max_tokens
    param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
    if asked is not None and asked > limits.max_tokens:
        raise RequestError(f"{param} must be at most {limits.max_tokens}, found {asked}", param)
    prompt_tokens = chat_model.prompt_tokens(turn.query, turn.history, turn.role)
    context = chat_model.context_length
    if prompt_tokens + (asked or 1) > context:
        raise RequestError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + (asked or 1)} tokens ({prompt_tokens} in the messages, {asked or 1} in the completion). "
            "Please reduce the length of the messages or completion.",
            "messages",
            "context_length_exceeded",
        )
    max_new_tokens = asked or min(limits.max_tokens, context - prompt_tokens)
    return Completion(turn, prompt_tokens, max_new_tokens, tools is not None)


def _finish_reason(chat_model: ChatModel, watch: GenerationWatch, completion: Completion) -> tuple[str, int]:
    generated = max(0, watch.length - completion.prompt_tokens)
    stops = set(chat_model.family.stop_token_ids(chat_model.tokenizer))
    ran_out = generated >= completion.max_new_tokens and watch.last_token not in stops
    return ("length" if ran_out else "stop"), generated


def _generation(chat_model: ChatModel, completion: Completion, request: ChatCompletionRequest, watch: GenerationWatch):
    """The reply's snapshots: an iterator of (response so far, history); a tool call is a dict."""
    return chat_model.replies(
        completion.turn.query,
        completion.turn.history,
        role=completion.turn.role,
        max_new_tokens=completion.max_new_tokens,
        top_p=request.top_p,
        temperature=request.temperature,
        watch=watch,
    )


def _tool_call(response: Any, completion: Completion) -> dict[str, Any] | None:
    """A parsed ChatGLM3 tool call as an OpenAI `tool_calls` entry, when tools were offered."""
    if not (completion.tools_offered and isinstance(response, dict) and "parameters" in response):
        return None
    try:  # a Python literal JSON cannot hold (a set, bytes, 1e999) leaves the reply as text
        arguments = json.dumps(response["parameters"], ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": response["name"], "arguments": arguments}}


def _usage(completion: Completion, generated: int) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": generated,
        "total_tokens": completion.prompt_tokens + generated,
    }


class ApiKeyCheck:
    """ASGI middleware answering 401 unless `Authorization: Bearer <api_key>` is sent. A plain ASGI
    wrapper (not `@app.middleware`), so the endpoint still sees the client's disconnect message."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and Headers(scope=scope).get("authorization") != self.expected:
            body = error_body("missing or wrong API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")
            await JSONResponse(body, 401)(scope, receive, send)
            return
        await self.app(scope, receive, send)


_PATH_FIELDS = ("Base model", "Checkpoint")


def public_info(info: dict[str, str]) -> dict[str, str]:
    """The model description for clients: folders by their names only, never local paths."""
    return {key: Path(value).name if key in _PATH_FIELDS and value != "none" else value for key, value in info.items()}


def create_app(chat_model: ChatModel, model_id: str, limits: ServerLimits, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `chat_model` under `model_id`."""
    app = FastAPI(title="chatglm-ptuning OpenAI-compatible API", docs_url="/docs", redoc_url=None)
    semaphore = asyncio.Semaphore(limits.concurrency)
    created = int(time.time())
    card = {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "chatglm-ptuning",
        "info": public_info(chat_model.info),
    }

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(f"{request.method} {request.url.path}: {error.detail}", kind=kind), error.status_code
        )

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:  # logged by the server
        return JSONResponse(error_body(f"internal error: {type(error).__name__}: {error}", kind="server_error"), 500)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse(error_body(str(error), error.param, error.code), error.status)

    if api_key is not None:
        app.add_middleware(ApiKeyCheck, api_key=api_key)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        if name != model_id:
            raise RequestError(
                f"the model {name!r} does not exist; this server serves {model_id!r}", "model", "model_not_found", 404
            )
        return card

    async def read_request(request: Request) -> ChatCompletionRequest:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise RequestError(
                f"request body of {declared} bytes is over the limit of {limits.max_body_bytes}", status=413
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise RequestError(f"request body is over the limit of {limits.max_body_bytes} bytes", status=413)
        try:
            raw = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(f"the request body is not valid JSON: {error}") from None
        except RecursionError:
            raise RequestError(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels") from None
        if not isinstance(raw, dict):
            raise RequestError(f"the request body must be a JSON object, found {type(raw).__name__}")
        check_json_text(raw)
        try:
            return ChatCompletionRequest.model_validate(raw)
        except ValidationError as error:
            message, param = _validation_message(error)
            raise RequestError(message, param) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_request(request)
        completion = _plan(chat_model, body, limits)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            events = _event_stream(chat_model, completion, body, model_id, completion_id, semaphore)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        watch = GenerationWatch()

        def run() -> Any:
            response: Any = ""
            for response, _ in _generation(chat_model, completion, body, watch):
                pass
            return response

        async with semaphore:
            if await request.is_disconnected():  # gave up while waiting for its turn
                return JSONResponse(error_body("the client disconnected", kind="client_disconnected"), 499)
            try:
                response = await _run_until_disconnected(request, run, watch)
            except Exception as error:  # reported to the client; the server keeps serving
                logger.exception("generation failed")
                return JSONResponse(
                    error_body(f"generation failed: {type(error).__name__}: {error}", kind="server_error"), 500
                )
            finally:
                watch.cancel()
        reason, generated = _finish_reason(chat_model, watch, completion)
        call = _tool_call(response, completion)
        if call is None:
            message = {"role": "assistant", "content": response_text(response)}
        else:
            message, reason = {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_id,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reason}],
            "usage": _usage(completion, generated),
        }

    return app


DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks that its client is still there


async def _run_until_disconnected(request: Request, run: Callable[[], Any], watch: GenerationWatch) -> Any:
    """`run()` in a worker thread; if the client goes away meanwhile, `watch` stops the generation at
    the next token, and this returns once the thread has ended (so the next request starts on a free model)."""
    task = asyncio.ensure_future(run_in_threadpool(run))
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            logger.info("client disconnected: generation stopped after %d tokens", watch.length)
            watch.cancel()
            break
    return await task


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _event_stream(
    chat_model: ChatModel,
    completion: Completion,
    request: ChatCompletionRequest,
    model_id: str,
    completion_id: str,
    semaphore: asyncio.Semaphore,
) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, content deltas, a finish chunk, optionally usage, `[DONE]`."""
    created = int(time.time())

    def chunk(delta: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id,
            "choices": [choice],
        }

    watch = GenerationWatch()
    async with semaphore:
        try:
            yield _sse(chunk({"role": "assistant", "content": ""}))
            deltas, response = TextDeltas(), ""
            async for response, _ in iterate_in_threadpool(_generation(chat_model, completion, request, watch)):
                if isinstance(response, str):  # a tool call (a dict) is sent whole at the end
                    piece = deltas.update(response)
                    if piece:
                        yield _sse(chunk({"content": piece}))
            reason, generated = _finish_reason(chat_model, watch, completion)
            call = _tool_call(response, completion)
            if call is None:
                piece = deltas.finish(response_text(response))
                if piece:
                    yield _sse(chunk({"content": piece}))
            else:  # as OpenAI streams a call: id, type and name first, then the arguments
                function = call["function"]
                opening = {**call, "function": {"name": function["name"], "arguments": ""}}
                yield _sse(chunk({"tool_calls": [{"index": 0, **opening}]}))
                yield _sse(chunk({"tool_calls": [{"index": 0, "function": {"arguments": function["arguments"]}}]}))
                reason = "tool_calls"
            yield _sse(chunk({}, reason))
            if request.stream_options and request.stream_options.include_usage:
                usage_chunk = chunk({})
                usage_chunk["choices"], usage_chunk["usage"] = [], _usage(completion, generated)
                yield _sse(usage_chunk)
        except Exception as error:  # headers are sent: report it in the stream, keep serving
            logger.exception("generation failed")
            yield _sse(error_body(f"generation failed: {type(error).__name__}: {error}", kind="server_error"))
        finally:
            watch.cancel()  # also when the client went away mid-stream
    yield _sse("[DONE]")


# ---- command line -----------------------------------------------------------------------------


def default_model_id(model_name_or_path: str, ptuning_checkpoint: str | None) -> str:
    """`<base folder name>` or `<base folder name>+<checkpoint folder name>`."""
    name = Path(model_name_or_path).resolve().name
    return f"{name}+{Path(ptuning_checkpoint).resolve().name}" if ptuning_checkpoint else name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser, server = server_parser("python -m chatglm_ptuning.api", __doc__.split("\n")[0], port=8000)
    server.add_argument("--served_model_name", help="model id in replies and /v1/models (default: <base>+<checkpoint>)")
    server.add_argument("--api_key", help="require 'Authorization: Bearer <key>' on every request")
    server.add_argument(
        "--max_tokens", type=int, help="most tokens one reply may ask for (default: the model's context)"
    )
    server.add_argument(
        "--max_body_bytes", type=int, default=1 << 20, help="largest request body accepted (default 1 MiB)"
    )
    server.add_argument("--concurrency", type=int, default=1, help="generations running at once; the rest wait")
    return parse_model_arguments(parser, argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    for name in ("max_tokens", "max_body_bytes", "concurrency"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name} must be at least 1, found {value}")
    chat_model = load_or_exit(args)
    limits = ServerLimits(
        max_tokens=min(args.max_tokens or chat_model.context_length, chat_model.context_length),
        max_body_bytes=args.max_body_bytes,
        concurrency=args.concurrency,
    )
    model_id = args.served_model_name or default_model_id(args.model_name_or_path, args.ptuning_checkpoint)
    for key, value in chat_model.info.items():
        print(f"{key}: {value}")
    print(f"Serving {model_id!r} at http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(
        create_app(chat_model, model_id, limits, args.api_key), host=args.host, port=args.port, log_level="info"
    )


if __name__ == "__main__":
    main()
