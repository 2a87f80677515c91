"""The terminal chat: the real command with piped input, and `chat_loop` in-process for what needs
a look inside (greedy replies, `clear`, truncation, Ctrl-C during a reply)."""

from __future__ import annotations

import io
import subprocess

import pytest
from servers import REPO_ROOT, python_module, server_env, write_prefix_checkpoint

from chatglm_ptuning.cli_demo import chat_loop, main
from chatglm_ptuning.loading import load_model
from chatglm_ptuning.serving import ChatModel

NAME = "ChatGLM2-6B"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_glm2_dir):
    return write_prefix_checkpoint(tmp_path_factory.mktemp("cli-output") / "checkpoint-2", tiny_glm2_dir)


@pytest.fixture(scope="module")
def chat_model(tiny_glm2_dir, checkpoint):
    return ChatModel(*load_model(tiny_glm2_dir, checkpoint))


def run_loop(chat_model, lines, out=None, **kwargs) -> str:
    """Run chat_loop on `lines` as typed input (then end of input); returns what it printed."""
    queue = list(lines)

    def read(prompt: str) -> str:
        if not queue:
            raise EOFError
        return queue.pop(0)

    out = out or io.StringIO()
    chat_loop(chat_model, read=read, out=out, **kwargs)
    return out.getvalue()


def greedy(chat_model, query, history=(), max_length=48):
    return chat_model.model.chat(chat_model.tokenizer, query, list(history), max_length=max_length, do_sample=False)


@pytest.mark.slow
def test_command_line_session(tiny_glm2_dir, checkpoint):
    session = "你好\n\nclear\n再见\nexit\n这一行不会被读到\n"
    command = python_module(
        "chatglm_ptuning.cli_demo", "--model_name_or_path", str(tiny_glm2_dir), "--ptuning_checkpoint", str(checkpoint),
        "--max_length", "40",
    )  # fmt: skip
    result = subprocess.run(
        command,
        input=session,
        cwd=REPO_ROOT,
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(f"{NAME}, P-tuning v2 (pre_seq_len 4, with prefix projection)")
    assert out.count("User: ") == 5 and out.count(f"{NAME}: ") == 2 and "History cleared." in out


def test_bad_flags_end_in_one_line(tiny_glm2_dir, checkpoint, capsys):
    argv = ["--model_name_or_path", str(tiny_glm2_dir), "--ptuning_checkpoint", str(checkpoint), "--pre_seq_len", "8"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and "pre_seq_len 4" in lines[0] and "8" in lines[0], lines


def test_history_is_kept_and_clear_forgets_it(chat_model):
    """The tiny model never ends a reply early, so a kept first turn no longer fits the second prompt:
    the notice proves the history was kept; after `clear` no notice, and the same reply as the first."""
    first, _ = greedy(chat_model, "你好")
    alone, _ = greedy(chat_model, "再说一遍")
    kept = run_loop(chat_model, ["你好", "再说一遍"], max_length=48, temperature=0)
    notice = kept.index("[Input truncated: ")
    assert kept[:notice].endswith(f"\n{NAME}: {first}\n") and kept.endswith(f"]\n\n{NAME}: {alone}\n\n"), kept
    assert "the oldest turn of the conversation was left out" in kept
    cleared = run_loop(chat_model, ["你好", "clear", "你好", "stop", "你好"], max_length=48, temperature=0)
    assert cleared.endswith(f"\n{NAME}: {first}\nHistory cleared.\n\n{NAME}: {first}\n"), "stop quits at once"
    assert "Input truncated" not in cleared


def test_long_input_is_truncated_with_a_notice(chat_model):
    out = run_loop(chat_model, ["很长的输入。" * 100], max_length=64, temperature=0)
    assert "[Input truncated:" in out and "first" in out and f"{NAME}: " in out


class InterruptAfter(io.StringIO):
    """Output that raises KeyboardInterrupt on the nth reply write, as Ctrl-C during a reply does."""

    def __init__(self, writes: int) -> None:
        super().__init__()
        self.left = writes
        self.in_reply = False

    def write(self, text: str) -> int:
        if self.in_reply:
            self.left -= 1
            if self.left == 0:
                raise KeyboardInterrupt
        self.in_reply = self.in_reply or text.endswith(f"{NAME}: ")
        return super().write(text)


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(chat_model, monkeypatch):
    lengths = []
    generate = chat_model.model.generate

    def watched(*args, **kwargs):
        output = generate(*args, **kwargs)
        lengths.append(output.shape[1])
        return output

    monkeypatch.setattr(chat_model.model, "generate", watched)
    text = run_loop(chat_model, ["你好", "clear"], out=InterruptAfter(writes=3), max_length=256)
    assert "[stopped]" in text and "History cleared." in text, text
    assert lengths and lengths[0] < 200, f"generation went on after Ctrl-C: {lengths}"


def test_tool_call_is_printed_as_a_call_and_the_next_input_is_its_result(tiny_glm3_dir, tmp_path):
    """The tiny model's replies are scripted (forced tokens, see scripted_replies)."""
    from scripted_replies import ScriptedReplies, reply_ids

    from chatglm_ptuning.tools import TOOL_SYSTEM_PROMPT, render_tool_call

    chat_model = ChatModel(*load_model(tiny_glm3_dir))
    scripted = ScriptedReplies(chat_model.model)
    tools = [{"name": "get_weather", "description": "天气", "parameters": {"type": "object"}}]
    tokenizer = chat_model.tokenizer
    call = reply_ids(tokenizer, "get_weather", render_tool_call({"city": "北京", "days": 2}), "<|observation|>")
    scripted.script(call)
    prompts: list[str] = []
    out = io.StringIO()

    def read(prompt: str) -> str:
        prompts.append(prompt)
        if len(prompts) == 2:
            scripted.script(reply_ids(tokenizer, "", "北京晴。", "<|user|>"))
        return ["北京天气？", '{"weather": "晴"}', "exit"][len(prompts) - 1]

    chat_loop(chat_model, read=read, out=out, max_length=200, temperature=0, tools=tools)
    printed = out.getvalue()
    assert 'Tool call: get_weather {"city": "北京", "days": 2}' in printed and "Tools: get_weather" in printed
    assert prompts[1].strip() == "Result of the tool call:" and printed.rstrip().endswith("北京晴。")
    system = {"role": "system", "content": TOOL_SYSTEM_PROMPT, "tools": tools}
    assert scripted.prompts[0] == tokenizer.build_chat_input("北京天气？", history=[system])["input_ids"][0].tolist()
    assert scripted.roles == ["user", "observation"]


def test_tools_flag_needs_chatglm3(tiny_glm2_dir, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text('[{"name": "f"}]')
    command = python_module("chatglm_ptuning.cli_demo", "--model_name_or_path", str(tiny_glm2_dir), "--tools", str(tools))
    result = subprocess.run(command, input="", cwd=REPO_ROOT, env=server_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --tools: tool calls need a ChatGLM3 model; the loaded model is ChatGLM2-6B"
    ]
