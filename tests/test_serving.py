"""What the front ends share (serving.py), for every family: fitting prompts into the context,
streaming, and append-only deltas of post-processed replies."""

from __future__ import annotations

import pytest

from chatglm_ptuning.families import postprocess_chatglm6b
from chatglm_ptuning.loading import load_model
from chatglm_ptuning.serving import ChatModel, GenerationWatch, TextDeltas, _without_oldest_turn


@pytest.fixture(scope="module", params=["glm1", "glm2", "glm3"])
def chat_model(request):
    folder = request.getfixturevalue(f"tiny_{request.param}_dir")
    return ChatModel(*load_model(folder))


def history_for(chat_model, turns):
    if chat_model.family.tool_calls:  # ChatGLM3: messages
        history = [{"role": "system", "content": "你是助手。"}]
        for query, reply in turns:
            history += [{"role": "user", "content": query}, {"role": "assistant", "content": reply}]
        return history
    return list(turns)


def test_fit_leaves_short_prompts_alone(chat_model):
    history = history_for(chat_model, [("你好", "你好！")])
    fitted = chat_model.fit("今天天气怎么样", history, 200)
    assert (fitted.query, fitted.history, fitted.notice) == ("今天天气怎么样", history, None)
    assert fitted.prompt_tokens == chat_model.prompt_tokens("今天天气怎么样", history)


def test_fit_drops_oldest_turns_first(chat_model):
    history = history_for(chat_model, [("第一个问题" * 10, "第一个回答" * 10), ("第二个问题", "第二个回答")])
    limit = chat_model.prompt_tokens("问题", history_for(chat_model, [("第二个问题", "第二个回答")]))
    max_length = next(m for m in range(limit, 2 * limit) if m - m // 4 == limit)  # a quarter is kept for the reply
    fitted = chat_model.fit("问题", history, max_length)
    # ChatGLM3 keeps the system message.
    assert fitted.history == history_for(chat_model, [("第二个问题", "第二个回答")])
    assert fitted.query == "问题" and fitted.prompt_tokens <= limit
    assert "the oldest turn of the conversation was left out" in fitted.notice


def test_fit_cuts_a_long_query_to_its_beginning(chat_model):
    query = "一二三四五六七八九十" * 30
    fitted = chat_model.fit(query, history_for(chat_model, [("你好", "你好！")]), 40)
    assert fitted.prompt_tokens <= 30 and query.startswith(fitted.query) and len(fitted.query) < len(query)
    assert "oldest turn" in fitted.notice and "the message was cut to its first" in fitted.notice


def test_fit_refuses_a_maximum_length_without_room(chat_model):
    with pytest.raises(ValueError, match="A maximum length of 4 tokens leaves too little room"):
        chat_model.fit("你好", [], 4)
    assert chat_model.capped_max_length(10**6) == chat_model.context_length
    assert chat_model.capped_max_length(None) == min(chat_model.family.max_length, chat_model.context_length)


def test_stream_yields_growing_text_and_watch_counts_tokens(chat_model):
    watch = GenerationWatch()
    prompt_tokens = chat_model.prompt_tokens("你好", [])
    snapshots = [text for text, _ in chat_model.stream("你好", [], max_new_tokens=6, temperature=0, watch=watch)]
    reply, history = chat_model.model.chat(chat_model.tokenizer, "你好", [], do_sample=False, max_new_tokens=6)
    assert snapshots[-1] == reply and watch.length - prompt_tokens == 6
    assert len(history) >= 1


def test_watch_cancel_stops_generation(chat_model):
    watch = GenerationWatch()
    watch.cancel()
    list(chat_model.stream("你好", [], max_new_tokens=50, temperature=0, watch=watch))
    assert watch.length - chat_model.prompt_tokens("你好", []) == 1  # stopped after the first token


def test_without_oldest_turn_for_messages():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "observation", "content": "o1"},
        {"role": "user", "content": "q2"},
    ]
    assert _without_oldest_turn(messages) == [messages[0], messages[4]]
    assert _without_oldest_turn([("q1", "a1"), ("q2", "a2")]) == [("q2", "a2")]


def test_deltas_add_up_when_post_processing_rewrites_the_tail():
    """ChatGLM-6B's reply text changes behind the cursor (full-width punctuation, `[[训练时间]]`)."""
    raw = "我是模型,训练于[[训练时间]]。Hello, world!你好?好的"
    deltas = TextDeltas()
    pieces = [deltas.update(postprocess_chatglm6b(raw[:end])) for end in range(1, len(raw) + 1)]
    pieces.append(deltas.finish(postprocess_chatglm6b(raw)))
    assert "".join(pieces) == postprocess_chatglm6b(raw) == "我是模型，训练于2023年。Hello, world！你好？好的"
    assert sum(1 for piece in pieces if piece) > 10, "pieces should still flow while the tail is held back"


def _describe_method(model_dir, checkpoint) -> str:  # noqa: ANN001
    from chatglm_ptuning.families import family_of
    from chatglm_ptuning.serving import describe

    model, tokenizer = load_model(model_dir, ptuning_checkpoint=checkpoint, device="cpu")
    return describe(model, family_of(tokenizer), str(model_dir), str(checkpoint) if checkpoint else None, None)["Method"]


def test_describe_names_the_method_of_a_bare_peft_folder_and_of_a_toolkit_checkpoint(tmp_path, tiny_glm2_dir):
    from chatglm_ptuning.checkpoint import PromptSettings
    from chatglm_ptuning.lora import LoraOptions

    model, _ = load_model(tiny_glm2_dir, method="lora", lora_options=LoraOptions(rank=4), device="cpu")
    bare = tmp_path / "peft"
    model.save_pretrained(str(bare))  # PEFT's own files only: adapter_config.json + weights
    assert not (bare / "ptuning_config.json").exists()
    assert _describe_method(tiny_glm2_dir, bare) == "LoRA"
    PromptSettings(model.config.architecture, method="lora").save(bare)
    assert _describe_method(tiny_glm2_dir, bare) == "LoRA"
    assert _describe_method(tiny_glm2_dir, None) == "none (base model)"
