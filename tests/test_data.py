"""Tests for chatglm_ptuning.data: reading, validation and the per-family token layouts.

Token ids written out below come from the real tokenizer files by the official procedure:
ChatGLM-6B "你好" -> [5, 74874] (+ [gMASK 130001, <sop> 130004]); ChatGLM2 "你好" as a whole
text -> [36474, 54591]; ChatGLM2's "[Round 1]\\n\\n问：你好\\n\\n答：" with its prefix is ROUND1 below;
ChatGLM3's chat input for "你好" is [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796].
"""

import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from chatglm_ptuning.arguments import DataTrainingArguments
from chatglm_ptuning.data import (
    FAMILY_GLM1,
    FAMILY_GLM2,
    FAMILY_GLM3,
    IGNORE_INDEX,
    DataError,
    build_preprocess_function,
    load_rows,
    preprocess_eval,
    preprocess_train,
    read_json_records,
    tokenizer_family,
    validate_records,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data_samples"
X = IGNORE_INDEX

# Ids computed with the real tokenizer files by the official procedure.
GLM1_NIHAO = [5, 74874]
GLM1_GMASK, GLM1_SOP, GLM1_EOP, GLM1_PAD = 130001, 130004, 130005, 3
GLM2_NIHAO = [36474, 54591]
GLM2_PREFIX = [64790, 64792]  # [gMASK, sop]
ROUND1 = GLM2_PREFIX + [790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211, 39701, 13, 13, 55437, 31211]
EOS = 2
GLM3_USER, GLM3_ASSISTANT, GLM3_SYSTEM = 64795, 64796, 64794
NEWLINE = [30910, 13]  # sp.encode("\n"): dummy-prefix piece then the newline byte


# ------------------------------------------------------------------------------ fixtures


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    import chatglm_ptuning  # noqa: F401  (registers the ChatGLM tokenizer)

    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def glm1(shared_tokenizers):
    return load_tokenizer(shared_tokenizers / "chatglm-6b")


@pytest.fixture(scope="module")
def glm2(shared_tokenizers):
    return load_tokenizer(shared_tokenizers / "chatglm2-6b")


@pytest.fixture(scope="module")
def glm3(shared_tokenizers):
    return load_tokenizer(shared_tokenizers / "chatglm3-6b")


def data_args(**overrides):
    defaults = {"train_file": "train.json", "prompt_column": "prompt", "response_column": "response"}
    return DataTrainingArguments(**{**defaults, **overrides})


def batch(*rows):
    """A datasets.map batch (column -> list) from row dicts."""
    return {key: [row[key] for row in rows] for key in rows[0]}


# ------------------------------------------------------------------------------ families


def test_tokenizer_family(glm1, glm2, glm3):
    assert [tokenizer_family(t) for t in (glm1, glm2, glm3)] == [FAMILY_GLM1, FAMILY_GLM2, FAMILY_GLM3]
    with pytest.raises(ValueError, match="not a ChatGLM tokenizer"):
        tokenizer_family(object())


# ------------------------------------------------------------------------------ ChatGLM-6B


def test_glm1_train_layout(glm1):
    args = data_args(max_source_length=4, max_target_length=5, pad_to_max_length=True)
    features = preprocess_train(glm1, batch({"prompt": "你好", "response": "你好"}), args)
    # a + [gMASK, sop] + b + [eop], right-padded with pad 3 to 4 + 5 = 9.
    assert features["input_ids"] == [GLM1_NIHAO + [GLM1_GMASK, GLM1_SOP] + GLM1_NIHAO + [GLM1_EOP, GLM1_PAD, GLM1_PAD]]
    # -100 up to and including gMASK; from <sop> on labelled; pads -100.
    assert features["labels"] == [[X, X, X, GLM1_SOP] + GLM1_NIHAO + [GLM1_EOP, X, X]]
    # By default the row is not padded: the collator pads each batch.
    features = preprocess_train(glm1, batch({"prompt": "你好", "response": "你好"}), replace(args, pad_to_max_length=False))
    assert features["input_ids"] == [GLM1_NIHAO + [GLM1_GMASK, GLM1_SOP] + GLM1_NIHAO + [GLM1_EOP]]
    assert features["labels"] == [[X, X, X, GLM1_SOP] + GLM1_NIHAO + [GLM1_EOP]]


def test_glm1_truncation_and_pad_labels(glm1):
    # a keeps max_source - 1 = 1 token, b keeps max_target - 2 = 1 token; 5 = 2 + 3: no padding.
    args = data_args(max_source_length=2, max_target_length=3)
    features = preprocess_train(glm1, batch({"prompt": "你好", "response": "你好"}), args)
    assert features["input_ids"] == [[5, GLM1_GMASK, GLM1_SOP, 5, GLM1_EOP]]
    assert features["labels"] == [[X, X, GLM1_SOP, 5, GLM1_EOP]]
    # Without ignore_pad_token_for_loss the label padding stays the pad id (3), the prompt stays -100.
    args = data_args(max_source_length=4, max_target_length=5, ignore_pad_token_for_loss=False, pad_to_max_length=True)
    features = preprocess_train(glm1, batch({"prompt": "你好", "response": "你好"}), args)
    assert features["labels"] == [[X, X, X, GLM1_SOP] + GLM1_NIHAO + [GLM1_EOP, GLM1_PAD, GLM1_PAD]]


def test_glm1_history_column_uses_round_template_even_when_empty(glm1):
    args = data_args(history_column="history", max_source_length=64, max_target_length=8)
    row = {"prompt": "你好", "response": "你好", "history": []}
    features = preprocess_train(glm1, batch(row), args)
    a = glm1.encode("[Round 0]\n问：你好\n答：", add_special_tokens=False)
    assert features["input_ids"][0][: len(a) + 5] == a + [GLM1_GMASK, GLM1_SOP] + GLM1_NIHAO + [GLM1_EOP]
    # Eval uses the raw query for an empty history ...
    eval_features = preprocess_eval(glm1, batch(row), args)
    assert eval_features["input_ids"] == [GLM1_NIHAO + [GLM1_GMASK, GLM1_SOP]]
    # ... and the round template once there is history.
    row = {"prompt": "再见", "response": "拜拜", "history": [["你好", "嗨"]]}
    text = "[Round 0]\n问：你好\n答：嗨\n[Round 1]\n问：再见\n答："
    assert preprocess_eval(glm1, batch(row), args)["input_ids"] == [glm1.encode(text)]
    assert preprocess_train(glm1, batch(row), args)["input_ids"][0][: len(glm1.encode(text))] == glm1.encode(text)


def test_glm1_eval_left_pads_and_labels_with_specials(glm1):
    args = data_args(max_source_length=64, max_target_length=8)
    rows = batch({"prompt": "你好", "response": "你好"}, {"prompt": "今天天气怎么样", "response": "晴"})
    features = preprocess_eval(glm1, rows, args)
    first, second = features["input_ids"]
    assert len(first) == len(second) > 4
    assert first == [GLM1_PAD] * (len(second) - 4) + GLM1_NIHAO + [GLM1_GMASK, GLM1_SOP]
    assert second[-2:] == [GLM1_GMASK, GLM1_SOP]
    assert features["labels"][0] == GLM1_NIHAO + [GLM1_GMASK, GLM1_SOP]  # text_target adds the suffix too
    assert {"attention_mask", "position_ids"} <= features.keys()


# ------------------------------------------------------------------------------ ChatGLM2-6B


def test_glm2_train_layout(glm2):
    args = data_args(max_source_length=17, max_target_length=3, pad_to_max_length=True)
    features = preprocess_train(glm2, batch({"prompt": "你好", "response": "你好"}), args)
    # build_prompt gives "[Round 1]\n\n问：你好\n\n答："; ids = a + b + [eos], padded with 0 to 17 + 3 + 1.
    assert features["input_ids"] == [ROUND1 + GLM2_NIHAO + [EOS, 0]]
    assert features["labels"] == [[X] * 17 + GLM2_NIHAO + [EOS, X]]
    features = preprocess_train(glm2, batch({"prompt": "你好", "response": "你好"}), replace(args, pad_to_max_length=False))
    assert features["input_ids"] == [ROUND1 + GLM2_NIHAO + [EOS]]
    assert features["labels"] == [[X] * 17 + GLM2_NIHAO + [EOS]]


def test_glm2_truncation_counts_specials_and_pad_labels(glm2):
    args = data_args(max_source_length=10, max_target_length=1, ignore_pad_token_for_loss=False)
    features = preprocess_train(glm2, batch({"prompt": "你好", "response": "你好"}), args)
    # The prompt keeps its first 10 tokens, [gMASK, sop] included; the response its first token.
    assert features["input_ids"] == [ROUND1[:10] + [36474, EOS]]
    # Without ignore_pad_token_for_loss the prompt positions are labelled with the pad id 0 (reference).
    assert features["labels"] == [[0] * 10 + [36474, EOS]]


def test_glm2_history_and_source_prefix(glm2):
    args = data_args(history_column="history", source_prefix="请回答：", max_source_length=128, max_target_length=8)
    row = {"prompt": "再见", "response": "拜拜", "history": [["你好", "嗨"]]}
    text = "请回答：[Round 1]\n\n问：你好\n\n答：嗨\n\n[Round 2]\n\n问：再见\n\n答："
    a = glm2.encode(text)
    b = glm2.encode("拜拜", add_special_tokens=False)
    features = preprocess_train(glm2, batch(row), args)
    assert a[:2] == GLM2_PREFIX
    assert features["input_ids"][0][: len(a) + len(b) + 1] == a + b + [EOS]
    assert features["labels"][0][: len(a) + len(b) + 1] == [X] * len(a) + b + [EOS]
    assert preprocess_eval(glm2, batch(row), args)["input_ids"] == [a]


def test_glm2_eval(glm2):
    args = data_args(max_source_length=64, max_target_length=8)
    rows = batch({"prompt": "你好", "response": "你好"}, {"prompt": "今天天气怎么样？", "response": "晴"})
    features = preprocess_eval(glm2, rows, args)
    first, second = features["input_ids"]
    pad = len(second) - len(ROUND1)
    assert pad > 0 and first == [0] * pad + ROUND1  # left padding with id 0
    assert features["attention_mask"][0] == [0] * pad + [1] * len(ROUND1)
    assert features["position_ids"][0] == [0] * pad + list(range(len(ROUND1)))
    assert features["labels"][0] == GLM2_PREFIX + GLM2_NIHAO


def test_glm2_all_turns_expands_each_turn(glm2):
    args = data_args(history_column="history", all_turns=True, max_source_length=128, max_target_length=8)
    row = {"prompt": "再见", "response": "拜拜", "history": [["你好", "你好"], ["", "空问题的轮次被跳过"]]}
    features = preprocess_train(glm2, batch(row), args)
    assert len(features["input_ids"]) == 2
    # The first turn on its own is exactly the one-turn layout.
    assert features["input_ids"][0][: len(ROUND1) + 3] == ROUND1 + GLM2_NIHAO + [EOS]
    last = glm2.encode(glm2.build_prompt("再见", row["history"]))
    assert features["input_ids"][1][: len(last)] == last
    # Without all_turns: the reference's single (last) turn.
    assert len(preprocess_train(glm2, batch(row), replace(args, all_turns=False))["input_ids"]) == 1


# ------------------------------------------------------------------------------ ChatGLM3-6B


def test_glm3_input_output_uses_raw_prompt(glm3):
    args = data_args(max_source_length=4, max_target_length=2)
    features = preprocess_train(glm3, batch({"prompt": "你好", "response": "你好"}), args)
    assert features["input_ids"] == [GLM2_PREFIX + GLM2_NIHAO + GLM2_NIHAO + [EOS]]
    assert features["labels"] == [[X] * 4 + GLM2_NIHAO + [EOS]]
    eval_features = preprocess_eval(glm3, batch({"prompt": "你好", "response": "你好"}), args)
    assert eval_features["input_ids"] == [GLM2_PREFIX + GLM2_NIHAO]


def conversation(*messages):
    return {"conversations": [{"role": r, "content": c, "loss": None} for r, c in messages]}


def test_glm3_conversation_layout(glm3):
    args = data_args(train_format="conversations", max_source_length=8, max_target_length=6, pad_to_max_length=True)
    features = preprocess_train(glm3, batch(conversation(("user", "你好"), ("assistant", "你好"))), args)
    ids = GLM2_PREFIX + [GLM3_USER] + NEWLINE + GLM2_NIHAO + [GLM3_ASSISTANT] + NEWLINE + GLM2_NIHAO + [EOS]
    assert len(ids) == 13
    # Padded to 8 + 6 + 1 = 15 with pad 0 / -100.
    assert features["input_ids"] == [ids + [0, 0]]
    # A token is a target when the token before it is in the assistant message: not the role token,
    # but every token after it and the eos.
    assert features["labels"] == [[X] * 8 + NEWLINE + GLM2_NIHAO + [EOS] + [X, X]]


def test_glm3_conversation_multi_turn_system_and_truncation(glm3):
    args = data_args(train_format="conversations", max_source_length=20, max_target_length=10, pad_to_max_length=True)
    row = conversation(
        ("system", "你好"), ("user", "你好"), ("assistant", "你好"), ("user", "你好"), ("assistant", "你好")
    )
    ids = GLM2_PREFIX
    for role in (GLM3_SYSTEM, GLM3_USER, GLM3_ASSISTANT, GLM3_USER, GLM3_ASSISTANT):
        ids = ids + [role] + NEWLINE + GLM2_NIHAO
    ids = ids + [EOS]
    answer = NEWLINE + GLM2_NIHAO
    # Targets: the tokens after each <|assistant|> (positions 13-16 and 23-26), the <|user|> after
    # the first answer (17) and the eos (27).
    labels = [X] * 13 + answer + [GLM3_USER] + [X] * 5 + answer + [EOS]
    assert len(ids) == len(labels) == 28
    features = preprocess_train(glm3, batch(row), args)
    # Both answers are learned, and the token after the first answer (<|user|>) too.
    assert features["input_ids"] == [ids + [0, 0, 0]]
    assert features["labels"] == [labels + [X, X, X]]
    # "loss": false opts an answer out.
    row["conversations"][2]["loss"] = False
    assert preprocess_train(glm3, batch(row), args)["labels"][0][:28] == [X] * 23 + answer + [EOS]
    # Truncation keeps the head.
    short = replace(args, max_source_length=10, max_target_length=5)
    features = preprocess_train(glm3, batch(row), short)
    assert features["input_ids"] == [ids[:16]]


def test_glm3_chat_layout_labels_last_turn_or_all_turns(glm3):
    args = data_args(history_column="history", max_source_length=40, max_target_length=10)
    row = {"prompt": "你好", "response": "你好", "history": [["你好", "你好"]]}
    answer = NEWLINE + GLM2_NIHAO
    features = preprocess_train(glm3, batch(row), args)
    turn = [GLM3_USER] + NEWLINE + GLM2_NIHAO + [GLM3_ASSISTANT] + answer
    assert features["input_ids"][0][:23] == GLM2_PREFIX + turn + turn + [EOS]
    assert features["labels"][0][:23] == [X] * 18 + answer + [EOS]
    features = preprocess_train(glm3, batch(row), replace(args, all_turns=True))
    assert features["labels"][0][:23] == [X] * 8 + answer + [GLM3_USER] + [X] * 5 + answer + [EOS]
    # Eval input: the chat input ending with <|assistant|> (the official build_chat_input for a one-turn chat).
    eval_features = preprocess_eval(glm3, batch({"prompt": "你好", "response": "你好", "history": []}), args)
    assert eval_features["input_ids"] == [[64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]]
    assert eval_features["labels"] == [GLM2_PREFIX + GLM2_NIHAO]


def test_glm3_conversation_eval_keeps_the_end_when_truncating(glm3):
    args = data_args(train_format="conversations", max_source_length=12, max_target_length=4)
    row = conversation(("user", "你好"), ("assistant", "你好"), ("user", "你好"), ("assistant", "你好"))
    features = preprocess_eval(glm3, batch(row), args)
    # Prompt = the messages before the last answer + <|assistant|>: 2 + 16 tokens. Over 12, so
    # [gMASK, sop] stays and the last 10 tokens of the rest are kept.
    kept = NEWLINE + GLM2_NIHAO + [GLM3_USER] + NEWLINE + GLM2_NIHAO + [GLM3_ASSISTANT]
    assert features["input_ids"] == [GLM2_PREFIX + kept]
    assert features["labels"] == [GLM2_PREFIX + GLM2_NIHAO]


def test_glm3_observation_loss_and_source_prefix(glm3):
    args = data_args(train_format="conversations", source_prefix="你好", max_source_length=20, max_target_length=10)
    row = conversation(("user", "你好"), ("observation", "你好"), ("assistant", "你好"))
    features = preprocess_train(glm3, batch(row), args)
    # The prefix goes before the first message's content: "你好你好".
    first = glm3.build_single_message("user", "", "你好你好")
    assert features["input_ids"][0][: 2 + len(first)] == GLM2_PREFIX + first
    start = 2 + len(first)  # the observation message [<|observation|>, ▁, \n, 你, 好] starts here
    # Learned by default, as the original's format_conversation learns every message but system/user.
    assert features["labels"][0][start : start + 6] == [X] + NEWLINE + GLM2_NIHAO + [GLM3_ASSISTANT]
    row["conversations"][1]["loss"] = False
    unlearned = preprocess_train(glm3, batch(row), args)["labels"][0]
    assert unlearned[start : start + 6] == [X] * 6


def test_glm1_source_prefix_comes_before_the_template(glm1):
    args = data_args(history_column="history", source_prefix="你好", max_source_length=64, max_target_length=8)
    features = preprocess_train(glm1, batch({"prompt": "你好", "response": "你好", "history": []}), args)
    a = glm1.encode("你好[Round 0]\n问：你好\n答：", add_special_tokens=False)
    assert features["input_ids"][0][: len(a) + 2] == a + [GLM1_GMASK, GLM1_SOP]


def test_conversations_need_glm3(glm2):
    args = data_args(train_format="conversations")
    with pytest.raises(ValueError, match="needs a ChatGLM3 tokenizer"):
        preprocess_train(glm2, batch(conversation(("user", "a"), ("assistant", "b"))), args)


def test_empty_rows_produce_nothing(glm2):
    args = data_args(max_source_length=32, max_target_length=8)
    rows = batch(
        {"prompt": "", "response": "a"}, {"prompt": "你好", "response": None}, {"prompt": "你好", "response": "你好"}
    )
    assert len(preprocess_train(glm2, rows, args)["input_ids"]) == 1
    assert len(preprocess_eval(glm2, rows, args)["input_ids"]) == 1


# ------------------------------------------------------------------------------ datasets.map


def test_map_over_sample_files(glm2):
    args = data_args(prompt_column="content", response_column="summary", max_source_length=64, max_target_length=64)
    loaded = load_rows(SAMPLES / "adgen_dev.json", args)
    dataset = loaded.to_dataset()
    train = dataset.map(
        build_preprocess_function(glm2, args, train=True), batched=True, remove_columns=dataset.column_names
    )
    assert len(train) == len(loaded.rows) == 40
    lengths = [len(ids) for ids in train["input_ids"]]
    assert max(lengths) <= 129 and min(lengths) < 100  # unpadded: each row its own length
    fixed = dataset.map(
        build_preprocess_function(glm2, replace(args, pad_to_max_length=True), train=True), batched=True,
        remove_columns=dataset.column_names,
    )
    assert {len(ids) for ids in fixed["input_ids"]} == {129}
    evaluation = dataset.map(
        build_preprocess_function(glm2, args, train=False), batched=True, remove_columns=dataset.column_names
    )
    assert set(evaluation.column_names) == {"input_ids", "attention_mask", "position_ids", "labels"}
    label_text = glm2.decode(evaluation[0]["labels"], skip_special_tokens=True)
    assert len(label_text) > 20 and loaded.rows[0]["summary"].startswith(label_text)


# ------------------------------------------------------------------------------ reading and validation


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_json_lines_and_arrays_with_line_numbers(tmp_path):
    lines = write(tmp_path, "a.json", '{"prompt": "1", "response": "x"}\n\n{"prompt": "2", "response": "y"}\n')
    assert [line for line, _ in read_json_records(lines)] == [1, 3]
    array = write(
        tmp_path, "b.json", '[\n  {"prompt": "1",\n   "response": "x"},\n  {"prompt": "2", "response": "y"}\n]\n'
    )
    assert read_json_records(array) == [(2, {"prompt": "1", "response": "x"}), (4, {"prompt": "2", "response": "y"})]
    assert read_json_records(write(tmp_path, "c.json", "[]")) == []
    jsonl = write(tmp_path, "d.jsonl", '\ufeff{"prompt": "1", "response": "x"}\n')  # a BOM is tolerated
    assert read_json_records(jsonl) == [(1, {"prompt": "1", "response": "x"})]


@pytest.mark.parametrize(
    "name,text,message",
    [
        (
            "a.json",
            '{"prompt": "1", "response": "x"}\n{"prompt": "2", "response": }\n',
            "a.json:2: invalid JSON: Expecting value",
        ),
        (
            "b.json",
            '[\n {"prompt": "1", "response": "x"},\n {"prompt": "2" "response": "y"}\n]',
            "b.json:3: invalid JSON",
        ),
        ("c.json", '[{"prompt": "1", "response": "x"},]', "c.json:1: invalid JSON: Expecting value"),
        ("d.json", '[{"prompt": "1", "response": "x"}] []', "d.json:1: invalid JSON: extra data"),
        ("e.csv", "prompt,response\n", "e.csv: expected a .json or .jsonl file, found .csv"),
    ],
)
def test_invalid_json_names_file_and_line(tmp_path, name, text, message):
    with pytest.raises(DataError, match=message.replace(".", r"\.")) as error:
        read_json_records(write(tmp_path, name, text))
    assert str(error.value).startswith(str(tmp_path))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"missing\.json: cannot read the file \(No such file or directory\)"):
        read_json_records(tmp_path / "missing.json")


def test_not_utf8(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad\.json:2: not UTF-8 text"):
        read_json_records(path)


CHAT = {"history_column": "history"}


@pytest.mark.parametrize(
    "row,overrides,message",
    [
        ('["a", "b"]', {}, ":1: expected a JSON object per row, found array"),
        ('{"prompt": "a"}', {}, ':1: missing column "response" \\(found columns: prompt\\)'),
        ('{"prompt": 3, "response": "b"}', {}, ':1: "prompt": expected a string, found number 3'),
        ('{"prompt": "a", "response": ["b"]}', {}, ':1: "response": expected a string, found array'),
        ('{"prompt": "a", "response": "b"}', CHAT, ':1: missing column "history"'),
        (
            '{"prompt": "a", "response": "b", "history": "q"}',
            CHAT,
            ':1: "history": expected an array of \\[query, response\\] pairs, found string',
        ),
        (
            '{"prompt": "a", "response": "b", "history": [["q", "r"], ["q"]]}',
            CHAT,
            ':1: "history"\\[1\\]: expected a \\[query, response\\] pair of strings, found \\["q"\\]',
        ),
        (
            '{"prompt": "a", "response": "b", "history": [["q", 1]]}',
            CHAT,
            ':1: "history"\\[0\\]: expected a \\[query, response\\] pair of strings',
        ),
        (
            '{"conversations": {"role": "user"}}',
            {"train_format": "conversations"},
            ':1: "conversations": expected an array of messages, found object',
        ),
        (
            '{"conversations": [{"role": "robot", "content": "x"}]}',
            {"train_format": "conversations"},
            ':1: "conversations"\\[0\\]."role": expected one of system, user, assistant, observation, tool, found "robot"',
        ),
        (
            '{"conversations": [{"role": "user", "content": 5}]}',
            {"train_format": "conversations"},
            ':1: "conversations"\\[0\\]."content": expected a string, found number',
        ),
        (
            '{"conversations": [{"role": "assistant", "content": "x", "loss": 1}]}',
            {"train_format": "conversations"},
            '"loss": expected true or false, found number',
        ),
        (
            '{"conversations": ["hi"]}',
            {"train_format": "conversations"},
            '"conversations"\\[0\\]: expected an object with role and content, found string',
        ),
        (
            '{"tools": "get_weather", "conversations": []}',
            {"train_format": "conversations"},
            ':1: "tools": expected an array of tool definitions, found string',
        ),
        ('{"messages": []}', {"train_format": "conversations"}, 'missing column "conversations"'),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, row, overrides, message):
    path = write(tmp_path, "data.jsonl", row + "\n")
    with pytest.raises(DataError, match=message) as error:
        load_rows(path, data_args(**overrides))
    assert str(error.value).startswith(f"{path}:1: ")
    assert error.value.line == 1 and error.value.path == str(path)


def test_empty_rows_are_skipped_and_counted(tmp_path, caplog):
    rows = [
        {"prompt": "a", "response": "b", "history": None},
        {"prompt": "", "response": "b", "history": []},
        {"prompt": "a", "response": None, "history": []},
        {"prompt": "c", "response": "d", "history": [["q", "r"]], "extra": 1},
    ]
    path = write(tmp_path, "data.json", "\n".join(json.dumps(r) for r in rows))
    with caplog.at_level(logging.WARNING, logger="chatglm_ptuning.data"):
        loaded = load_rows(path, data_args(**CHAT))
    assert loaded.skipped == 2 and loaded.skipped_lines == [2, 3]
    assert loaded.rows == [
        {"prompt": "a", "response": "b", "history": []},
        {"prompt": "c", "response": "d", "history": [["q", "r"]]},
    ]
    assert "skipped 2 of 4 rows with an empty prompt or response (lines 2, 3)" in caplog.text


def test_file_with_no_usable_rows(tmp_path):
    path = write(tmp_path, "data.json", '{"prompt": "", "response": "b"}\n')
    with pytest.raises(
        DataError, match=r"data\.json: no usable rows \(1 rows read, 1 skipped for an empty prompt or response\)"
    ):
        load_rows(path, data_args())
    with pytest.raises(DataError, match="no usable rows"):
        load_rows(write(tmp_path, "empty.json", "\n"), data_args())
    conversations = write(tmp_path, "c.json", '{"conversations": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match="no assistant message with content"):
        load_rows(conversations, data_args(train_format="conversations"))


def test_columns_must_be_given(tmp_path):
    path = write(tmp_path, "data.json", '{"prompt": "a", "response": "b"}\n')
    with pytest.raises(ValueError, match="give --prompt_column and --response_column"):
        validate_records(read_json_records(path), data_args(prompt_column=None), path)


# ------------------------------------------------------------------------------ sample datasets


def test_sample_files_load_and_splits_are_disjoint():
    adgen = data_args(prompt_column="content", response_column="summary")
    adgen_train = load_rows(SAMPLES / "adgen_train.json", adgen)
    adgen_dev = load_rows(SAMPLES / "adgen_dev.json", adgen)
    assert (len(adgen_train.rows), len(adgen_dev.rows), adgen_train.skipped) == (300, 40, 0)
    assert not {r["content"] for r in adgen_train.rows} & {r["content"] for r in adgen_dev.rows}
    assert all(r["content"].startswith("类型#") for r in adgen_train.rows)
    chat = data_args(**CHAT)
    chat_train = load_rows(SAMPLES / "chat_train.json", chat)
    chat_dev = load_rows(SAMPLES / "chat_dev.json", chat)
    assert len(chat_train.rows) >= 140 and len(chat_dev.rows) >= 15
    assert any(r["history"] for r in chat_train.rows)
    assert not {r["prompt"] for r in chat_train.rows} & {r["prompt"] for r in chat_dev.rows}
    conversations = load_rows(SAMPLES / "conversations_train.json", data_args(train_format="conversations"))
    roles = {m["role"] for row in conversations.rows for m in row["conversations"]}
    assert roles == {"system", "user", "assistant"}


def test_sample_files_match_their_generator(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_data_samples.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    names = ("adgen_train.json", "adgen_dev.json", "chat_train.json", "chat_dev.json", "conversations_train.json")
    for name in (*names, "tools_train.json", "tools_dev.json"):
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes(), name


def test_eval_labels_round_trip_through_trainer_metrics(glm1, glm2, glm3):
    """Eval labels, padded with -100 as the collator and the Trainer do, decode back to the
    responses, so a perfect prediction scores 100 on every metric (BLEU needs 4+ characters)."""
    import numpy as np

    from chatglm_ptuning.metrics import build_trainer_metrics

    responses = ["这件衬衫很好看，真的。", "Hello world 2024"]
    args = data_args(max_source_length=32, max_target_length=32)
    for tokenizer in (glm1, glm2, glm3):
        labels = preprocess_eval(tokenizer, batch(*({"prompt": "你好", "response": r} for r in responses)), args)[
            "labels"
        ]
        width = max(map(len, labels))
        label_ids = np.array([row + [X] * (width - len(row)) for row in labels])
        if tokenizer is not glm1:  # ChatGLM-6B's NFKC normaliser turns "，" into ","
            decoded = tokenizer.batch_decode(np.where(label_ids == X, 0, label_ids).tolist(), skip_special_tokens=True)
            assert decoded == responses
        scores = build_trainer_metrics(tokenizer)((label_ids, label_ids))
        assert scores == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}, tokenizer
