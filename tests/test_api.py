"""The OpenAI-compatible API: a real server on loopback driven by the standard `openai` client and by
raw HTTP for every kind of bad request; the app in-process for API keys and failing generations."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator

import pytest
from servers import free_port, python_module, running_server, write_prefix_checkpoint

httpx = pytest.importorskip("httpx", reason="pip install gradio (brings httpx, fastapi, uvicorn)")
openai = pytest.importorskip("openai", reason="pip install openai (requirements-test.txt)")
import uvicorn
from fastapi.testclient import TestClient
from scripted_replies import ScriptedReplies, reply_ids

from chatglm_ptuning.api import Message, ServerLimits, Turn, conversation, create_app
from chatglm_ptuning.loading import load_model
from chatglm_ptuning.serving import ChatModel
from chatglm_ptuning.tools import TOOL_SYSTEM_PROMPT, render_tool_call

MODEL_ID = "tiny-chatglm2-pt"
MAX_TOKENS = 64  # the server's --max_tokens
MAX_BODY = 20_000  # the server's --max_body_bytes
CONTEXT = 256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_glm2_dir):
    return write_prefix_checkpoint(tmp_path_factory.mktemp("api-output") / "checkpoint-7", tiny_glm2_dir)


@pytest.fixture(scope="module")
def api_url(tmp_path_factory, tiny_glm2_dir, checkpoint):
    port = free_port()
    command = python_module(
        "chatglm_ptuning.api",
        "--model_name_or_path", str(tiny_glm2_dir),
        "--ptuning_checkpoint", str(checkpoint),
        "--port", str(port),
        "--served_model_name", MODEL_ID,
        "--max_tokens", str(MAX_TOKENS),
        "--max_body_bytes", str(MAX_BODY),
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/v1"
    with running_server(command, base + "/models", tmp_path_factory.mktemp("api-log") / "api.log"):
        yield base


@pytest.fixture(scope="module")
def client(api_url):
    return openai.OpenAI(base_url=api_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_glm2_dir, checkpoint):
    """The same model and prefix loaded here, to compare greedy replies with."""
    return load_model(tiny_glm2_dir, checkpoint)


def greedy(reference, query, history=(), max_new_tokens=24):
    model, tokenizer = reference
    response, _ = model.chat(tokenizer, query, list(history), do_sample=False, max_new_tokens=max_new_tokens)
    return response


@pytest.mark.slow
def test_models(client, checkpoint, tiny_glm2_dir):
    models = client.models.list().data
    assert [model.id for model in models] == [MODEL_ID]
    card = client.models.retrieve(MODEL_ID)
    info = card.model_extra["info"]
    assert card.owned_by == "chatglm-ptuning" and info["Checkpoint"] == checkpoint.name == "checkpoint-7"
    assert info["Base model"] == tiny_glm2_dir.name and info["Family"] == "ChatGLM2-6B"
    assert not any("/" in value for value in info.values()), info  # folder names, no local paths
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


@pytest.mark.slow
def test_completion_is_the_greedy_chat_reply_with_usage(client, reference):
    reply = client.chat.completions.create(
        model="any-name", messages=[{"role": "user", "content": "你好"}], temperature=0, max_tokens=24
    )
    choice = reply.choices[0]
    assert reply.model == MODEL_ID and reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == greedy(reference, "你好")
    tokenizer = reference[1]
    assert reply.usage.prompt_tokens == len(tokenizer(tokenizer.build_prompt("你好", []))["input_ids"])
    assert 0 < reply.usage.completion_tokens <= 24
    assert choice.finish_reason == ("length" if reply.usage.completion_tokens == 24 else "stop")


@pytest.mark.slow
def test_history_and_system_message(client, reference):
    messages = [
        {"role": "system", "content": "你是一个广告文案助手。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": [{"type": "text", "text": "写一句"}, {"type": "text", "text": "广告"}]},
    ]
    reply = client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0, max_tokens=16)
    # ChatGLM2 has no system role: the official openai_api.py puts the system text before the query.
    expected = greedy(reference, "你是一个广告文案助手。\n写一句广告", [("你好", "你好！")], max_new_tokens=16)
    assert reply.choices[0].message.content == expected


@pytest.mark.slow
def test_streaming_deltas_add_up_to_the_reply(client, api_url):
    request = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "介绍一下你自己"}],
        "temperature": 0,
        "max_tokens": 40,
    }
    whole = client.chat.completions.create(**request).choices[0].message.content
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for piece in pieces if piece) >= 3, "the reply should stream in several pieces"
    assert "".join(pieces) == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[:-1] == [None] * (len(finishes) - 1) and finishes[-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 40
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL_ID for c in chunks)
    raw = httpx.post(f"{api_url}/chat/completions", json={**request, "stream": True}, timeout=120)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert all(event.startswith("data: ") for event in events) and events[-1] == "data: [DONE]"


def message(role="user", content="你好"):
    return {"role": role, "content": content}


BAD_REQUESTS = {
    "bad JSON": (b'{"messages": [', 400, None, "not valid JSON"),
    "not an object": (b"[]", 400, None, "JSON object"),
    "no messages": ({"model": MODEL_ID}, 400, "messages", "Field required"),
    "empty messages": ({"messages": []}, 400, "messages", "at least 1"),
    "unknown role": ({"messages": [message("robot")]}, 400, "messages.0.role", "'robot'"),
    "tool role": ({"messages": [message("tool")]}, 400, "messages.0.role", "'tool'"),
    "content not text": ({"messages": [message(content=[{"type": "image_url", "image_url": {"url": "x"}}])]}, 400, "messages.0.content", "text"),
    "ends with assistant": ({"messages": [message(), message("assistant")]}, 400, "messages.1.role", "last message"),
    "two users in a row": ({"messages": [message(), message(), message("assistant"), message()]}, 400, "messages.1.role", "alternate"),
    "only a system message": ({"messages": [message("system")]}, 400, "messages", "user message"),
    "system message later": ({"messages": [message(), message("system"), message()]}, 400, "messages.1.role", "alternate"),
    "temperature too high": ({"messages": [message()], "temperature": 2.5}, 400, "temperature", "less than or equal to 2"),
    "negative top_p": ({"messages": [message()], "top_p": -0.1}, 400, "top_p", "greater than or equal to 0"),
    "top_p above 1": ({"messages": [message()], "top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
    "zero max_tokens": ({"messages": [message()], "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    "max_tokens over the limit": ({"messages": [message()], "max_tokens": MAX_TOKENS + 1}, 400, "max_tokens", f"at most {MAX_TOKENS}"),
    "max_completion_tokens over the limit": ({"messages": [message()], "max_completion_tokens": 10**6}, 400, "max_completion_tokens", "at most"),
    "max_tokens not a number": ({"messages": [message()], "max_tokens": "many"}, 400, "max_tokens", "integer"),
    "several choices": ({"messages": [message()], "n": 2}, 400, "n", "less than or equal to 1"),
    "prompt over the context": ({"messages": [message(content="很长的输入。" * 200)]}, 400, "messages", "maximum context length"),
    "body too large": ({"messages": [message(content="x" * (MAX_BODY + 1))]}, 413, None, "over the limit"),
    # OpenAI refuses what pydantic's lax mode would coerce
    "temperature as a string": ({"messages": [message()], "temperature": "0.5"}, 400, "temperature", "valid number"),
    "max_tokens as a boolean": ({"messages": [message()], "max_tokens": True}, 400, "max_tokens", "valid integer"),
    "stream as a string": ({"messages": [message()], "stream": "yes"}, 400, "stream", "valid boolean"),
    "include_usage as a number": ({"messages": [message()], "stream_options": {"include_usage": 1}}, 400, "stream_options.include_usage", "valid boolean"),
    "lone surrogate": (b'{"messages": [{"role": "user", "content": "ab\\ud800c"}]}', 400, "messages.0.content", "lone surrogate"),
    "lone surrogate in an ignored field": (b'{"messages": [{"role": "user", "content": "x"}], "user": "\\udfff"}', 400, "user", "lone surrogate"),
    "deep nesting": (b'{"messages": [{"role": "user", "content": "x"}], "metadata": ' + b"[" * 200 + b"]" * 200 + b"}", 400, None, "deeper than"),
    "nesting past the parser": (b'{"x": ' + b"[" * (MAX_BODY - 10) + b"}", 400, None, "deeper than"),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_a_clear_4xx(api_url, name):
    body, status, param, snippet = BAD_REQUESTS[name]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{api_url}/chat/completions", content=content, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert snippet in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"
    if name == "prompt over the context":
        assert error["code"] == "context_length_exceeded"


def test_chatglm3_keeps_system_messages_in_its_history():
    messages = [
        Message(role=r, content=c) for r, c in [("system", "s"), ("user", "q1"), ("assistant", "a1"), ("user", "q2")]
    ]
    assert conversation(messages, message_history=True) == Turn(
        "q2",
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "metadata": "", "content": "a1"},
        ],
    )
    assert conversation(messages, message_history=False) == Turn("s\nq2", [("q1", "a1")])


@pytest.mark.slow
def test_openai_client_sees_bad_requests_as_errors(client):
    with pytest.raises(openai.BadRequestError, match="alternate"):
        client.chat.completions.create(model=MODEL_ID, messages=[message(), message()])


@pytest.mark.slow
def test_wrong_path_and_method(api_url):
    missing = httpx.get(f"{api_url}/completions")
    assert missing.status_code == 404 and "Not Found" in missing.json()["error"]["message"]
    wrong_method = httpx.get(f"{api_url}/chat/completions")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


# ---- in-process app: API key and failures ----------------------------------------------------


@pytest.fixture()
def app_for(reference):
    def build(api_key=None):
        chat_model = ChatModel(*reference)
        return chat_model, TestClient(create_app(chat_model, MODEL_ID, ServerLimits(MAX_TOKENS, MAX_BODY, 1), api_key))

    return build


def test_api_key_is_required_when_set(app_for):
    _, app = app_for(api_key="secret")
    refused = app.get("/v1/models")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert app.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert app.get("/v1/models", headers={"Authorization": "Bearer secret"}).status_code == 200


def test_failed_generation_is_reported_and_the_server_keeps_serving(app_for, monkeypatch):
    chat_model, app = app_for()

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("simulated: CUDA out of memory")
        yield  # a generator, like stream_chat

    request = {"model": MODEL_ID, "messages": [message()], "max_tokens": 8}
    with monkeypatch.context() as patch:
        patch.setattr(chat_model.model, "stream_chat", out_of_memory)
        failed = app.post("/v1/chat/completions", json=request)
        assert failed.status_code == 500 and "out of memory" in failed.json()["error"]["message"]
        streamed = app.post("/v1/chat/completions", json={**request, "stream": True})
        events = [line.removeprefix("data: ") for line in streamed.text.split("\n\n") if line]
        assert "out of memory" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
    assert app.post("/v1/chat/completions", json=request).status_code == 200


# ---- a client that goes away ------------------------------------------------------------------

STEP_DELAY_S = 0.05  # per forward pass of the slowed model


@contextlib.contextmanager
def serving_in_thread(app) -> Iterator[str]:
    """`app` served by uvicorn on a free 127.0.0.1 port from a thread of this process; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture()
def slow_model(reference):
    """The tiny model slowed to STEP_DELAY_S per token and never ending a reply by itself (stop tokens
    masked), so only max_tokens or a cancel ends generation; `steps` records when each pass ran."""
    model, tokenizer = reference
    chat_model = ChatModel(model, tokenizer)
    stops = chat_model.family.stop_token_ids(tokenizer)
    steps: list[float] = []
    forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(STEP_DELAY_S)
        steps.append(time.monotonic())
        output = forward(*args, **kwargs)
        output.logits[..., stops] = float("-inf")
        return output

    model.forward = slow_forward
    try:
        yield chat_model, steps
    finally:
        del model.forward


def test_client_that_disconnects_stops_generation_and_the_next_request_is_served(slow_model):
    chat_model, steps = slow_model
    app = create_app(chat_model, MODEL_ID, ServerLimits(max_tokens=200, max_body_bytes=MAX_BODY, concurrency=1))
    request = {"model": MODEL_ID, "messages": [message()], "temperature": 0}
    with serving_in_thread(app) as base:
        with pytest.raises(httpx.ReadTimeout):  # 200 tokens take >= 10 s; the client gives up after 1 s
            httpx.post(f"{base}/chat/completions", json={**request, "max_tokens": 200}, timeout=1.0)
        gone = time.monotonic()
        started = time.monotonic()
        reply = httpx.post(f"{base}/chat/completions", json={**request, "max_tokens": 4}, timeout=30)
        waited = time.monotonic() - started
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
    assert waited < 3.0, f"the next request waited {waited:.1f} s behind the abandoned one"
    abandoned = [t for t in steps if t <= started]
    assert len(abandoned) < 60, "the abandoned request kept generating"
    assert abandoned[-1] - gone < 1.0, f"generation went on {abandoned[-1] - gone:.1f} s after the client left"


# ---- function calling (ChatGLM3) --------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询城市天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL_ARGUMENTS = {"city": "北京", "days": 2}


@pytest.fixture(scope="module")
def glm3_chat(tiny_glm3_dir):
    """The tiny random ChatGLM3 model with scripted replies (it cannot call a tool by itself: the
    output tokens are forced, see scripted_replies); `prompts` records each prompt's input ids."""
    chat_model = ChatModel(*load_model(tiny_glm3_dir))
    scripted = ScriptedReplies(chat_model.model)
    return chat_model, scripted.script, scripted.prompts


@pytest.fixture(scope="module")
def glm3_server(glm3_chat):
    chat_model = glm3_chat[0]
    with serving_in_thread(create_app(chat_model, "tiny-chatglm3", ServerLimits(64, MAX_BODY, 1))) as base:
        yield base, openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)


def tools_system(tokenizer):
    return {"role": "system", "content": TOOL_SYSTEM_PROMPT, "tools": [WEATHER_TOOL["function"]]}


def test_tools_in_and_tool_call_out(glm3_chat, glm3_server):
    chat_model, script, prompts = glm3_chat
    tokenizer, (_, client) = chat_model.tokenizer, glm3_server
    script(reply_ids(tokenizer, "get_weather", render_tool_call(CALL_ARGUMENTS), "<|observation|>"))
    messages = [{"role": "user", "content": "北京天气？"}]
    reply = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL], max_tokens=60)
    # The prompt: ChatGLM3's tool system message (the function definitions), then the question.
    assert prompts[-1] == tokenizer.build_chat_input("北京天气？", history=[tools_system(tokenizer)])["input_ids"][0].tolist()
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == CALL_ARGUMENTS

    chunks = list(client.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL], stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    pieces = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert pieces[0].id.startswith("call_") and pieces[0].function.name == "get_weather" and pieces[0].index == 0
    assert json.loads("".join(p.function.arguments or "" for p in pieces)) == CALL_ARGUMENTS
    assert not any(d.content for d in deltas) and chunks[-1].choices[0].finish_reason == "tool_calls"

    # The call and its result go back as ChatGLM3's function-call and observation turns.
    script(reply_ids(tokenizer, "", "北京晴。", "<|user|>"))
    followup = messages + [  # the reply message sent back as it came, as clients do
        reply.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"weather": "晴"}'},
    ]
    answer = client.chat.completions.create(model="m", messages=followup, tools=[WEATHER_TOOL], max_tokens=60)
    history = [
        tools_system(tokenizer),
        {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "metadata": "get_weather", "content": render_tool_call(CALL_ARGUMENTS)},
    ]
    expected = tokenizer.build_chat_input('{"weather": "晴"}', history=history, role="observation")
    assert prompts[-1] == expected["input_ids"][0].tolist()
    assert answer.choices[0].message.content == "北京晴。" and answer.choices[0].finish_reason == "stop"
    assert not answer.choices[0].message.tool_calls


def test_a_call_json_cannot_hold_is_returned_as_text(glm3_chat, glm3_server):
    chat_model, script, _ = glm3_chat
    script(reply_ids(chat_model.tokenizer, "get_weather", "```python\ntool_call(city={1, 2})\n```", "<|observation|>"))
    reply = glm3_server[1].chat.completions.create(model="m", messages=[message()], tools=[WEATHER_TOOL], max_tokens=60)
    assert reply.choices[0].finish_reason == "stop" and not reply.choices[0].message.tool_calls
    assert reply.choices[0].message.content == "Tool call: get_weather {\"city\": \"{1, 2}\"}"


def test_tool_choice_none_offers_no_tools_and_others_are_refused(glm3_chat, glm3_server):
    chat_model, script, prompts = glm3_chat
    tokenizer, (base, client) = chat_model.tokenizer, glm3_server
    script(reply_ids(tokenizer, "get_weather", render_tool_call(CALL_ARGUMENTS), "<|observation|>"))
    messages = [{"role": "user", "content": "北京天气？"}]
    reply = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL], tool_choice="none")
    assert prompts[-1] == tokenizer.build_chat_input("北京天气？")["input_ids"][0].tolist()
    assert reply.choices[0].finish_reason != "tool_calls" and not reply.choices[0].message.tool_calls
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        with pytest.raises(openai.BadRequestError, match='only "none" and "auto"'):
            client.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL], tool_choice=choice)


BAD_TOOL_REQUESTS = {
    "tool type": ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    "arguments not an object": ({"messages": [message(), {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}, {"role": "tool", "tool_call_id": "c1", "content": "x"}]}, "messages.1.tool_calls.0.function.arguments"),
    "unknown tool_call_id": ({"messages": [message(), {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "c2", "content": "x"}]}, "messages.2.tool_call_id"),
    "missing tool result": ({"messages": [message(), {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages"),
    "tool result without a call": ({"messages": [message(), {"role": "tool", "tool_call_id": "c1", "content": "x"}]}, "messages.1.role"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD_TOOL_REQUESTS))
def test_bad_function_calling_requests_get_400(glm3_server, name):
    body, param = BAD_TOOL_REQUESTS[name]
    response = httpx.post(f"{glm3_server[0]}/chat/completions", json={"messages": [message()], **body}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_other_families_refuse_tools(client):
    with pytest.raises(openai.BadRequestError, match="function calling needs a ChatGLM3 model; .* ChatGLM2-6B"):
        client.chat.completions.create(model=MODEL_ID, messages=[message()], tools=[WEATHER_TOOL])
