"""chat() / stream_chat(): per-family prompts, defaults, stop tokens and reply post-processing.

Two kinds of model: a scripted stand-in whose generate() replays given token ids (checks exactly
what chat() sends and how it turns ids into (response, history)), and tiny random ChatGLM models
with the real tokenizers (checks the whole path through transformers' generate()).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from chatglm_ptuning import (
    ChatGLM2Config,
    ChatGLM2ForConditionalGeneration,
    ChatGLM6BConfig,
    ChatGLMForConditionalGeneration,
)
from chatglm_ptuning.chat import ChatMixin, InvalidScoreLogitsProcessor
from chatglm_ptuning.families import FAMILIES, family_of, parse_chatglm3_response, postprocess_chatglm6b
from chatglm_ptuning.configuration import ARCH_GLM1, ARCH_GLM2
from chatglm_ptuning.tokenization import ChatGLMTokenizer

NAMES = ("chatglm-6b", "chatglm2-6b", "chatglm3-6b")


@pytest.fixture(scope="module")
def tokenizers(shared_tokenizers) -> dict[str, ChatGLMTokenizer]:
    return {name: ChatGLMTokenizer.from_pretrained(shared_tokenizers / name, local_files_only=True) for name in NAMES}


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    glm1 = ChatGLMForConditionalGeneration(
        ChatGLM6BConfig(
            vocab_size=130528,
            hidden_size=32,
            inner_hidden_size=64,
            num_layers=2,
            num_attention_heads=4,
            max_sequence_length=512,
            bos_token_id=130004,
            eos_token_id=130005,
            mask_token_id=130000,
            gmask_token_id=130001,
            pad_token_id=3,
            # Tied random embeddings make greedy decoding repeat the last input token (<sop>, which decodes to "").
            tie_word_embeddings=False,
        )
    ).eval()
    glm2 = ChatGLM2ForConditionalGeneration(
        ChatGLM2Config(
            padded_vocab_size=65024,
            hidden_size=32,
            ffn_hidden_size=64,
            kv_channels=8,
            num_layers=2,
            num_attention_heads=4,
            multi_query_attention=True,
            multi_query_group_num=2,
            add_qkv_bias=True,
            seq_length=2048,
        )
    ).eval()
    return {"chatglm-6b": glm1, "chatglm2-6b": glm2, "chatglm3-6b": glm2}


class ScriptedModel(ChatMixin):
    """Stands in for a ChatGLM LM: generate() appends `reply` to the prompt and records its arguments."""

    device = torch.device("cpu")

    def __init__(self, architecture: str, reply: list[int]):
        self.config = SimpleNamespace(architecture=architecture)
        self.reply = reply
        self.calls: list[dict] = []

    def generate(self, input_ids: torch.Tensor, streamer=None, **kwargs) -> torch.Tensor:
        self.calls.append({"input_ids": input_ids, **kwargs})
        if streamer is not None:
            streamer.put(input_ids)
            for token in self.reply:
                streamer.put(torch.tensor([token]))
            streamer.end()
        return torch.cat([input_ids, torch.tensor([self.reply])], dim=1)


def scripted(tokenizers, name: str, reply_text: str, extra: list[int] = ()) -> ScriptedModel:
    architecture = ARCH_GLM1 if name == "chatglm-6b" else ARCH_GLM2
    return ScriptedModel(architecture, tokenizers[name].encode(reply_text, add_special_tokens=False) + list(extra))


# ---- what chat() sends ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, max_length, top_p, temperature, eos",
    [
        ("chatglm-6b", 2048, 0.7, 0.95, [130005]),
        ("chatglm2-6b", 8192, 0.8, 0.8, [2]),
        ("chatglm3-6b", 8192, 0.8, 0.8, [2, 64795, 64797]),
    ],
)
def test_official_defaults_and_prompt(tokenizers, name, max_length, top_p, temperature, eos):
    tok = tokenizers[name]
    model = scripted(tokenizers, name, "好的")
    model.chat(tok, "你好", history=[("a", "b")] if name != "chatglm3-6b" else [{"role": "user", "content": "a"}])
    call = model.calls[0]
    assert (call["max_length"], call["top_p"], call["temperature"]) == (max_length, top_p, temperature)
    assert call["eos_token_id"] == eos and call["num_beams"] == 1 and call["do_sample"] is True
    assert isinstance(call["logits_processor"][-1], InvalidScoreLogitsProcessor)
    prompts = {
        "chatglm-6b": lambda: tok("[Round 0]\n问：a\n答：b\n[Round 1]\n问：你好\n答：")["input_ids"],
        "chatglm2-6b": lambda: tok("[Round 1]\n\n问：a\n\n答：b\n\n[Round 2]\n\n问：你好\n\n答：")["input_ids"],
        "chatglm3-6b": lambda: [
            64790,
            64792,
            *tok.build_single_message("user", "", "a"),
            *tok.build_single_message("user", "", "你好"),
            64796,
        ],
    }
    expected = prompts[name]()
    assert call["input_ids"].tolist() == [expected]
    if name != "chatglm-6b":  # the ChatGLM2/3 tokenizers also return the 1/0 mask and positions
        assert call["position_ids"].tolist() == [list(range(len(expected)))]


def test_greedy_and_max_new_tokens_send_no_sampling_or_length_defaults(tokenizers):
    model = scripted(tokenizers, "chatglm2-6b", "好的")
    model.chat(tokenizers["chatglm2-6b"], "你好", do_sample=False, max_new_tokens=5)
    call = model.calls[0]
    assert "top_p" not in call and "temperature" not in call and "max_length" not in call
    assert call["max_new_tokens"] == 5 and call["do_sample"] is False


def test_family_comes_from_the_tokenizer_class(tokenizers):
    assert [family_of(tokenizers[name]) for name in NAMES] == list(FAMILIES)
    assert [family.display_name for family in FAMILIES] == ["ChatGLM-6B", "ChatGLM2-6B", "ChatGLM3-6B"]
    assert [family_of(tokenizers[name]).name for name in NAMES] == ["chatglm", "chatglm2", "chatglm3"]
    with pytest.raises(TypeError, match="ChatGLM tokenizer"):
        family_of(object())
    with pytest.raises(ValueError, match="architecture"):
        scripted(tokenizers, "chatglm2-6b", "x").chat(tokenizers["chatglm-6b"], "你好")
    with pytest.raises(ValueError, match="role"):
        scripted(tokenizers, "chatglm2-6b", "x").chat(tokenizers["chatglm2-6b"], "你好", role="system")


# ---- how replies become (response, history) ----------------------------------------------------


def test_chatglm6b_reply_post_processing(tokenizers):
    model = scripted(tokenizers, "chatglm-6b", " 我在[[训练时间]]训练,很开心!ok? ", extra=[130005, 5, 74874])
    response, history = model.chat(tokenizers["chatglm-6b"], "你好")
    assert response == "我在2023年训练，很开心！ok?"  # text after <eop> ignored
    assert history == [("你好", response)]
    assert postprocess_chatglm6b("a,b 中,文:x;y") == "a,b 中，文：x;y"


def test_chatglm2_reply_and_history_are_new_lists(tokenizers):
    model = scripted(tokenizers, "chatglm2-6b", " [[训练时间]]的数据 ", extra=[2, 100])
    history = [("a", "b")]
    response, new_history = model.chat(tokenizers["chatglm2-6b"], "你好", history=history)
    assert response == "2023年的数据"
    assert new_history == [("a", "b"), ("你好", response)] and history == [("a", "b")]


def test_chatglm3_stops_on_role_tokens_and_keeps_message_history(tokenizers):
    tok = tokenizers["chatglm3-6b"]
    model = scripted(tokenizers, "chatglm3-6b", "\n 你好！", extra=[64795, 100, 200])
    history = [{"role": "system", "content": "be nice"}]
    response, new_history = model.chat(tok, "hi", history=history)
    assert response == "你好！"
    assert new_history == [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "metadata": "", "content": "你好！"},
    ]
    assert history == [{"role": "system", "content": "be nice"}]
    observation = model.chat(tok, '{"price": 1}', history=new_history, role="observation")
    assert model.calls[-1]["input_ids"][0, -1].item() == 64796 and observation[1][-2]["role"] == "observation"


def test_chatglm3_tool_call_parsing():
    tools = [{"name": "track", "parameters": {}}]
    system = {"role": "system", "content": "use tools", "tools": tools}
    output = "track\n ```python\ntool_call(symbol='10111', days=[1, 2])\n```"
    response, history = parse_chatglm3_response(output, [system, {"role": "user", "content": "q"}])
    assert response == {"name": "track", "parameters": {"symbol": "10111", "days": [1, 2]}}
    assert history[-1] == {"role": "assistant", "metadata": "track", "content": output.split("\n", 1)[1]}
    # Not parseable as a tool_call(...) literal call, or no tools declared: name + raw content.
    unsafe = "track\n```python\ntool_call(x=__import__('os').getcwd())\n```"
    assert parse_chatglm3_response(unsafe, [system])[0]["name"] == "track"
    assert "content" in parse_chatglm3_response(unsafe, [system])[0]
    assert parse_chatglm3_response("calc\n1+1", [{"role": "user", "content": "q"}])[0] == {
        "name": "calc",
        "content": "1+1",
    }
    # Several assistant segments: the last one is the response, all go to history.
    response, history = parse_chatglm3_response("\n first<|assistant|>\n second", [])
    assert response == "second" and [m["content"] for m in history] == ["first", "second"]
    assert parse_chatglm3_response("no newline", [])[0] == "no newline"


def test_invalid_score_processor():
    scores = torch.tensor([[0.0, float("nan"), 1.0, 2.0, 3.0, 4.0, 5.0]])
    out = InvalidScoreLogitsProcessor()(torch.zeros(1, 1, dtype=torch.long), scores)
    assert out.tolist() == [[0.0, 0.0, 0.0, 0.0, 0.0, 5e4, 0.0]]
    finite = torch.tensor([[1.0, 2.0]])
    assert InvalidScoreLogitsProcessor()(torch.zeros(1, 1, dtype=torch.long), finite.clone()).equal(finite)


def test_scripted_stream_ends_with_the_chat_result(tokenizers):
    for name, reply, extra in (("chatglm-6b", "你好,世界", [130005]), ("chatglm3-6b", "\n 你好", [64797])):
        model = scripted(tokenizers, name, reply, extra=extra)
        streamed = list(model.stream_chat(tokenizers[name], "hi"))
        assert streamed[-1] == model.chat(tokenizers[name], "hi")


# ---- tiny random models through transformers' generate() --------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_chat_and_stream_chat_with_tiny_model(tokenizers, models, name):
    tok, model = tokenizers[name], models[name]
    response, history = model.chat(tok, "你好", do_sample=False, max_new_tokens=6)
    assert isinstance(response, (str, dict)) and len(history) == (1 if name != "chatglm3-6b" else 2)
    if name != "chatglm3-6b":
        assert isinstance(response, str) and response and history == [("你好", response)]
    else:
        assert history[0] == {"role": "user", "content": "你好"} and history[1]["role"] == "assistant"

    streamed = list(model.stream_chat(tok, "你好", do_sample=False, max_new_tokens=6))
    assert streamed[-1] == (response, history)
    if isinstance(response, str):
        texts = [partial for partial, _ in streamed]
        assert all(response.startswith(text.rstrip("\ufffd")) for text in texts), texts
        assert [len(text) for text in texts] == sorted(len(text) for text in texts)

    second, longer = model.chat(tok, "再来", history=history, max_new_tokens=4)  # sampled, with history
    assert longer[: len(history)] == history and len(longer) == len(history) + (1 if name != "chatglm3-6b" else 2)


def test_closing_the_stream_stops_generation(tokenizers, models):
    class CountSteps(StoppingCriteria):
        steps = 0

        def __call__(self, input_ids, scores, **kwargs):
            CountSteps.steps += 1
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    tok, model = tokenizers["chatglm2-6b"], models["chatglm2-6b"]
    stream = model.stream_chat(
        tok,
        "你好",
        do_sample=False,
        max_new_tokens=1000,
        min_new_tokens=1000,
        stopping_criteria=StoppingCriteriaList([CountSteps()]),
    )
    next(stream)
    stream.close()
    assert CountSteps.steps < 1000
