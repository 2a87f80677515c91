"""The web demo: `bash web_demo.sh` serving a trained prefix, driven through gradio's Python client and
a real headless Chromium (Debian's `chromium` through Playwright), plus an in-process server whose
model can be made to fail or be watched while Stop is pressed."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from servers import REPO_ROOT, free_port, running_server, server_env, write_prefix_checkpoint

gradio_client = pytest.importorskip("gradio_client", reason="pip install gradio (requirements.txt)")
from chatglm_ptuning import web_demo
from chatglm_ptuning.families import SliderDefaults
from chatglm_ptuning.loading import load_model
from chatglm_ptuning.serving import ChatModel, load_chat_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# No network, no sandbox (tests run as root), nothing phoning home.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CONTEXT = 256  # the tiny model's seq_length
SCREENSHOT_COPY = Path("/tmp/web_demo.png")  # for a person to look at after the run


def turns(messages: list[dict]) -> list[tuple[str, str]]:
    """(role, text) of gradio 6 chatbot messages, whose content is a list of {'text', 'type'} parts."""
    out = []
    for message in messages:
        content = message["content"]
        text = content if isinstance(content, str) else "".join(part.get("text", "") for part in content)
        out.append((message["role"], text))
    return out


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory, tiny_glm2_dir):
    """What `train.sh` leaves: complete checkpoints, and a newer one without trainer state (incomplete)."""
    out = tmp_path_factory.mktemp("web-output")
    write_prefix_checkpoint(out / "checkpoint-3", tiny_glm2_dir, projection=False)
    write_prefix_checkpoint(out / "checkpoint-5", tiny_glm2_dir)
    (out / "checkpoint-9").mkdir()
    return out


@pytest.fixture(scope="module")
def web_server(tmp_path_factory, tiny_glm2_dir, output_dir):
    """`bash web_demo.sh` as after `bash train.sh`: MODEL_PATH and OUTPUT_DIR as train.sh had them."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = server_env(MODEL_PATH=str(tiny_glm2_dir), OUTPUT_DIR=str(output_dir), QUANTIZATION_BIT="", CHECKPOINT="")
    log = tmp_path_factory.mktemp("web-log") / "web_demo.log"
    with running_server(["bash", "web_demo.sh", "--port", str(port)], url, log, env):
        yield url


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements-test.txt)")
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"Debian chromium not found at {CHROMIUM}: apt-get install -y chromium (bash scripts/install.sh --test)"
        )
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    hosts = []
    page.on("request", lambda request: hosts.append(request.url.split("/")[2]))
    page.goto(url, wait_until="load")
    page.wait_for_selector("#user-input textarea", timeout=60_000)
    return page, hosts


def bot_texts(page) -> list[str]:
    return page.locator("#chatbot [data-testid='bot']").all_inner_texts()


@pytest.mark.slow
def test_web_demo_sh_without_a_checkpoint_says_how_to_make_one(tmp_path):
    env = server_env(OUTPUT_DIR=str(tmp_path), CHECKPOINT="")
    env.pop("MODEL_PATH", None)
    result = subprocess.run(
        ["bash", "web_demo.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode != 0
    assert "bash train.sh" in result.stderr and str(tmp_path) in result.stderr


def test_module_without_model_says_what_to_run(capsys):
    with pytest.raises(SystemExit) as exit_info:
        web_demo.parse_args([])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--model_name_or_path is required" in error and "bash web_demo.sh" in error


@pytest.mark.slow
def test_serves_the_last_complete_checkpoint_greedy_as_loaded_here(web_server, tiny_glm2_dir, output_dir):
    """The page's reply at temperature 0 is the greedy chat() reply of base + checkpoint-5 (not -3, not -9)."""
    client = gradio_client.Client(web_server, verbose=False)
    messages, _ = client.predict("你好", 96, 0.8, 0.0, api_name="/chat")
    model, tokenizer = load_model(tiny_glm2_dir, output_dir / "checkpoint-5")
    expected, _ = model.chat(tokenizer, "你好", max_length=96, do_sample=False)
    assert turns(messages) == [("user", "你好"), ("assistant", expected)]
    assert expected


@pytest.mark.slow
def test_chat_streams_and_keeps_history_per_session(web_server):
    alice = gradio_client.Client(web_server, verbose=False)
    bob = gradio_client.Client(web_server, verbose=False)
    job_a = alice.submit("你好", 64, 0.8, 0.95, api_name="/chat")
    job_b = bob.submit("介绍一下你自己", 64, 0.8, 0.95, api_name="/chat")  # queued behind alice (concurrency 1)
    partial = [turns(output[0])[-1][1] for output in job_a if isinstance(output[0], list)]
    assert len(set(partial)) >= 3, "the reply should arrive in several growing pieces"
    assert partial[-1] == turns(job_a.outputs()[-1][0])[-1][1] != ""
    job_b.result()
    second = turns(alice.predict("再说一遍", 256, 0.8, 0.95, api_name="/chat")[0])  # room for the first turn
    assert [role for role, _ in second] == ["user", "assistant", "user", "assistant"]
    assert (second[0][1], second[2][1]) == ("你好", "再说一遍")
    bob_turns = turns(job_b.outputs()[-1][0])
    assert [text for role, text in bob_turns if role == "user"] == ["介绍一下你自己"]


@pytest.mark.slow
def test_empty_input_does_nothing_and_clear_forgets(web_server):
    client = gradio_client.Client(web_server, verbose=False)
    chatbot, _ = client.predict("   ", 64, 0.8, 0.95, api_name="/chat")
    assert not isinstance(chatbot, list), "an empty message must not change the chat"
    client.predict("你好", 64, 0.8, 0.95, api_name="/chat")
    client.predict(api_name="/clear")
    after_clear = turns(client.predict("你好", 64, 0.8, 0.95, api_name="/chat")[0])
    assert [role for role, _ in after_clear] == ["user", "assistant"]


@pytest.mark.slow
def test_long_input_is_truncated_with_a_visible_notice(web_server):
    client = gradio_client.Client(web_server, verbose=False)
    long_message = "这是一段很长的输入。" * 80  # several hundred tokens, over the 256-token context
    shown = turns(client.predict(long_message, 8192, 0.8, 0.95, api_name="/chat")[0])
    assert shown[0] == ("user", long_message)
    assert (
        shown[1][0] == "assistant"
        and "Input truncated" in shown[1][1]
        and f"the model's context is {CONTEXT}" in shown[1][1]
    )
    assert shown[2][0] == "assistant" and len(shown) == 3


@pytest.mark.slow
def test_page_in_chromium_answers_and_renders_markdown(web_server, browser, output_dir, tmp_path):
    page, hosts = open_page(browser, web_server)
    info = page.locator("#model-info").inner_text()
    assert str(output_dir / "checkpoint-5") in info and "P-tuning v2" in info and "ChatGLM2-6B" in info
    page.locator("#user-input textarea").fill("类型#裙*风格#学院*颜色#黑色\n```python\nprint('你好')\n```")
    page.locator("#submit").click()
    seen: list[str] = []  # each distinct state of the reply, until it has not changed for 1.5 s
    changed = deadline = time.monotonic()
    while time.monotonic() < deadline + 60 and not (seen and time.monotonic() - changed > 1.5):
        texts = bot_texts(page)
        if texts and (not seen or texts[-1] != seen[-1]):
            seen.append(texts[-1])
            changed = time.monotonic()
        time.sleep(0.05)
    assert len(seen) >= 2 and seen[-1].strip(), f"no streamed reply in the page: {seen}"
    user_bubble = page.locator("#chatbot [data-testid='user']").last
    assert "print('你好')" in user_bubble.locator("pre code").inner_text(), "code fences render as code blocks"
    assert "类型#裙*风格#学院*颜色#黑色" in user_bubble.inner_text(), "the rest of a message shows as typed"
    assert user_bubble.locator("em").count() == 0
    assert page.locator("#user-input textarea").input_value() == "", "the input box is cleared on Submit"
    shot = tmp_path / "web_demo.png"
    page.screenshot(path=str(shot), full_page=True)
    shutil.copy(shot, SCREENSHOT_COPY)
    assert shot.stat().st_size > 20_000
    assert set(hosts) == {web_server.split("/")[2]}, f"the page must not load anything from elsewhere: {set(hosts)}"
    page.close()


# ---- in-process server: failures and Stop ----------------------------------------------------


class WatchedGenerate:
    """Wraps model.generate to record each call's final sequence length."""

    def __init__(self, generate):
        self.generate = generate
        self.lengths: list[int] = []
        self.done = threading.Event()

    def __call__(self, *args, **kwargs):
        try:
            output = self.generate(*args, **kwargs)
            self.lengths.append(int(output.shape[1]))
            return output
        finally:
            self.done.set()


@pytest.fixture(scope="module")
def inprocess(tiny_glm2_dir, output_dir):
    args = web_demo.parse_args(
        ["--model_name_or_path", str(tiny_glm2_dir), "--ptuning_checkpoint", str(output_dir / "checkpoint-5")]
    )
    chat_model = load_chat_model(args)
    demo = web_demo.build_demo(chat_model)
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield chat_model, f"http://127.0.0.1:{port}/"
    demo.close()


def test_generation_error_shows_in_the_chat_and_the_server_keeps_serving(inprocess, monkeypatch):
    chat_model, url = inprocess

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("simulated: CUDA out of memory")
        yield  # a generator, like stream_chat

    client = gradio_client.Client(url, verbose=False)
    with monkeypatch.context() as patch:
        patch.setattr(chat_model.model, "stream_chat", out_of_memory)
        failed = turns(client.predict("你好", 64, 0.8, 0.95, api_name="/chat")[0])
    assert failed[-1][0] == "assistant" and "Generation failed" in failed[-1][1] and "out of memory" in failed[-1][1]
    after = turns(client.predict("你好", 64, 0.8, 0.95, api_name="/chat")[0])
    assert after[-1][0] == "assistant" and "Generation failed" not in after[-1][1] and after[-1][1]


@pytest.mark.slow
def test_replies_render_markdown_and_code_blocks(inprocess, browser, monkeypatch):
    chat_model, url = inprocess
    reply = "用 **Python**：\n\n```python\nprint('你好')\n```"

    def markdown_reply(tokenizer, query, history, **kwargs):
        for end in (5, len(reply)):
            yield reply[:end], [*history, (query, reply[:end])]

    monkeypatch.setattr(chat_model.model, "stream_chat", markdown_reply)
    page, _ = open_page(browser, url)
    page.locator("#user-input textarea").fill("怎么打印你好？")
    page.locator("#submit").click()
    code = page.locator("#chatbot [data-testid='bot'] pre code")
    code.wait_for(timeout=30_000)
    assert code.inner_text().strip() == "print('你好')"
    assert page.locator("#chatbot [data-testid='bot'] strong").inner_text() == "Python"
    page.close()


def test_literal_markdown_keeps_code_and_escapes_the_rest():
    text = "类型#裙*风格#学院*\n```python\nprint('a*b')\n```\n用 `x_y` 1. a_b"
    assert web_demo.literal_markdown(text) == (
        "类型\\#裙\\*风格\\#学院\\*\n```python\nprint('a*b')\n```\n用 `x_y` 1\\. a\\_b"
    )


@pytest.mark.slow
def test_stop_button_ends_generation(inprocess, browser, monkeypatch):
    chat_model, url = inprocess
    watched = WatchedGenerate(chat_model.model.generate)
    monkeypatch.setattr(chat_model.model, "generate", watched)
    forward = chat_model.model.forward

    def slow_forward(*args, **kwargs):  # >= 5 s for a full reply, so Stop surely comes first on a busy machine
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(chat_model.model, "forward", slow_forward)
    page, _ = open_page(browser, url)
    page.locator("#user-input textarea").fill("你好")
    page.locator("#submit").click()
    deadline = time.monotonic() + 30
    while not (bot_texts(page) and len(bot_texts(page)[-1]) > 3) and time.monotonic() < deadline:
        time.sleep(0.02)
    page.locator("#stop").click()
    assert watched.done.wait(30), "generation did not end after Stop"
    # The slider's 8192 is capped at the 256-token context: a full reply would run to 256 tokens.
    assert watched.lengths and watched.lengths[-1] < CONTEXT - 20, (
        f"Stop did not cut generation short: {watched.lengths}"
    )
    page.close()


# ---- other families: the page's handler without a server ------------------------------------


class FakeRequest:
    session_hash = "test-session"


@pytest.mark.parametrize("family", ["glm1", "glm3"])
def test_other_families_chat_with_their_own_defaults_and_history(request, family):
    chat_model = ChatModel(*load_model(request.getfixturevalue(f"tiny_{family}_dir")))
    defaults = chat_model.family.sliders
    assert (family, defaults) in {
        ("glm1", SliderDefaults(4096, 2048, 0.7, 0.95)),
        ("glm3", SliderDefaults(32768, 8192, 0.8, 0.6)),
    }
    web_demo.build_demo(chat_model)  # the page builds for this family
    respond = web_demo.make_respond(chat_model, web_demo.ActiveGenerations())
    session = web_demo._new_session()
    for query in ("你好", "再说一遍"):
        *_, (messages, session, _) = respond(query, 40, defaults.top_p, 0.0, session, FakeRequest())
    assert [m["role"] for m in messages if not m["content"].startswith("⚠️")] == ["user", "assistant"] * 2
    history = session["history"]
    if family == "glm3":
        assert history[-2] == {"role": "user", "content": "再说一遍"} and history[-1]["role"] == "assistant"
    else:
        assert history[-1][0] == "再说一遍"


# ---- title and tool calls ---------------------------------------------------------------------


def _title_html(demo) -> str:
    return next(block.value for block in demo.blocks.values() if getattr(block, "elem_id", None) == "title")


def test_page_is_titled_by_the_loaded_model(tiny_glm3_dir):
    embedded = load_chat_model(web_demo.parse_args(["--model_name_or_path", str(REPO_ROOT / "chatglm_ptuning" / "embedded")]))
    demo = web_demo.build_demo(embedded)
    assert demo.title == "Embedded tiny model (ChatGLM2-6B template) P-tuning demo"
    assert "Embedded tiny model (ChatGLM2-6B template)" in _title_html(demo)
    glm3 = load_chat_model(web_demo.parse_args(["--model_name_or_path", str(tiny_glm3_dir)]))
    assert f"{tiny_glm3_dir.name} (ChatGLM3-6B template)" in _title_html(web_demo.build_demo(glm3))


def test_tool_call_is_shown_as_a_call_and_the_next_message_is_its_result(tiny_glm3_dir, tmp_path):
    """The tiny model's replies are scripted (forced tokens, see scripted_replies)."""
    from scripted_replies import ScriptedReplies, reply_ids

    from chatglm_ptuning.serving import load_tools
    from chatglm_ptuning.tools import render_tool_call

    chat_model = ChatModel(*load_model(tiny_glm3_dir))
    scripted = ScriptedReplies(chat_model.model)
    tools_file = tmp_path / "tools.json"
    tools_file.write_text('[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]')
    tools = load_tools(str(tools_file), chat_model)
    assert tools == [{"name": "get_weather", "parameters": {}}]
    web_demo.build_demo(chat_model, tools)
    respond = web_demo.make_respond(chat_model, web_demo.ActiveGenerations())
    tokenizer = chat_model.tokenizer
    scripted.script(reply_ids(tokenizer, "get_weather", render_tool_call({"city": "北京"}), "<|observation|>"))
    *_, (messages, session, _) = respond("北京天气？", 200, 0.8, 0.0, web_demo._new_session(tools), FakeRequest())
    assert messages[-1]["content"] == 'Tool call: `get_weather`\n```json\n{\n  "city": "北京"\n}\n```'.replace("T", "🛠️ T", 1)
    assert session["role"] == "observation" and session["history"][0]["tools"] == tools
    scripted.script(reply_ids(tokenizer, "", "北京晴。", "<|user|>"))
    *_, (messages, session, _) = respond('{"weather": "晴"}', 200, 0.8, 0.0, session, FakeRequest())
    assert scripted.roles == ["user", "observation"] and session["role"] == "user"
    assert messages[-2]["content"].startswith(web_demo.RESULT_LABEL) and messages[-1]["content"] == "北京晴。"
