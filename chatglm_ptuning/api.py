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

from .serving import ChatModel, GenerationWatch, TextDeltas, add_model_arguments, load_or_exit, parse_model_arguments

logger = logging.getLogger(__name__)

# ---- request schema ---------------------------------------------------------------------------


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str  # OpenAI's list of text parts is joined into one string

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


def conversation(messages: list[Message], message_history: bool) -> tuple[str, list]:
    """Split OpenAI messages into the query and the family's history.

    Leading system messages are allowed; then user and assistant must alternate, ending with user.
    ChatGLM3 (`message_history`) keeps system messages in its history; ChatGLM-6B/2 have no system
    role, so their text is put before the query, as the official openai_api.py does.
    """
    system = []
    start = 0
    while start < len(messages) and messages[start].role == "system":
        system.append(messages[start].content)
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
    if turns[-1].role != "user":
        raise RequestError(
            f"the last message must have role 'user', found {turns[-1].role!r}", f"messages.{len(messages) - 1}.role"
        )
    query = turns[-1].content
    previous = turns[:-1]
    if message_history:
        history = [{"role": "system", "content": text} for text in system]
        history += [{"role": message.role, "content": message.content} for message in previous]
        return query, history
    history = [(previous[i].content, previous[i + 1].content) for i in range(0, len(previous), 2)]
    if system:
        query = "\n".join(system) + "\n" + query if query else "\n".join(system)
    return query, history


# ---- the app ----------------------------------------------------------------------------------


@dataclass
class ServerLimits:
    max_tokens: int  # the most tokens one reply may ask for
    max_body_bytes: int
    concurrency: int  # generations running at once; further requests wait


@dataclass
class Completion:
    query: str
    history: list
    prompt_tokens: int
    max_new_tokens: int


def _plan(chat_model: ChatModel, request: ChatCompletionRequest, limits: ServerLimits) -> Completion:
    query, history = conversation(request.messages, "system" in chat_model.family.roles)
    asked = request.max_completion_tokens or request.max_tokens
    param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
    if asked is not None and asked > limits.max_tokens:
        raise RequestError(f"{param} must be at most {limits.max_tokens}, found {asked}", param)
    prompt_tokens = chat_model.prompt_tokens(query, history)
    context = chat_model.context_length
    if prompt_tokens + (asked or 1) > context:
        raise RequestError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + (asked or 1)} tokens ({prompt_tokens} in the messages, {asked or 1} in the completion). "
            "Please reduce the length of the messages or completion.",
            "messages",
            "context_length_exceeded",
        )
    return Completion(query, history, prompt_tokens, asked or min(limits.max_tokens, context - prompt_tokens))


def _finish_reason(chat_model: ChatModel, watch: GenerationWatch, completion: Completion) -> tuple[str, int]:
    generated = max(0, watch.length - completion.prompt_tokens)
    stops = set(chat_model.family.stop_token_ids(chat_model.tokenizer))
    ran_out = generated >= completion.max_new_tokens and watch.last_token not in stops
    return ("length" if ran_out else "stop"), generated


def _generation(chat_model: ChatModel, completion: Completion, request: ChatCompletionRequest, watch: GenerationWatch):
    """The reply's snapshots: an iterator of (text so far, history)."""
    return chat_model.stream(
        completion.query,
        completion.history,
        max_new_tokens=completion.max_new_tokens,
        top_p=request.top_p,
        temperature=request.temperature,
        watch=watch,
    )


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

        def run() -> str:
            text = ""
            for text, _ in _generation(chat_model, completion, body, watch):
                pass
            return text

        async with semaphore:
            if await request.is_disconnected():  # gave up while waiting for its turn
                return JSONResponse(error_body("the client disconnected", kind="client_disconnected"), 499)
            try:
                text = await _run_until_disconnected(request, run, watch)
            except Exception as error:  # reported to the client; the server keeps serving
                logger.exception("generation failed")
                return JSONResponse(
                    error_body(f"generation failed: {type(error).__name__}: {error}", kind="server_error"), 500
                )
            finally:
                watch.cancel()
        reason, generated = _finish_reason(chat_model, watch, completion)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": reason,
                }
            ],
            "usage": _usage(completion, generated),
        }

    return app


DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks that its client is still there


async def _run_until_disconnected(request: Request, run: Callable[[], str], watch: GenerationWatch) -> str:
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
            deltas, text = TextDeltas(), ""
            async for text, _ in iterate_in_threadpool(_generation(chat_model, completion, request, watch)):
                piece = deltas.update(text)
                if piece:
                    yield _sse(chunk({"content": piece}))
            piece = deltas.finish(text)
            if piece:
                yield _sse(chunk({"content": piece}))
            reason, generated = _finish_reason(chat_model, watch, completion)
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
    parser = argparse.ArgumentParser(prog="python -m chatglm_ptuning.api", description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=8000)
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
