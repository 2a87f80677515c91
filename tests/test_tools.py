"""ChatGLM3 tool use in training data: a row's `tools` and `tool` steps give the ids and labels of the
original preprocessing (THUDM/ChatGLM3 finetune_chatmodel_demo/preprocess_utils.py, format_conversation);
the evaluation of tool steps (tool name and arguments)."""

from __future__ import annotations

import ast
import json

import pytest
from official_layout import REPO_ROOT
from test_data import batch, data_args, load_tokenizer, write

from chatglm_ptuning.data import DataError, IGNORE_INDEX, load_rows, preprocess_eval, preprocess_train
from chatglm_ptuning.metrics import compute_metrics, tool_call_scores
from chatglm_ptuning.tools import TOOL_SYSTEM_PROMPT, parse_call_text, render_tool_call

X = IGNORE_INDEX
TOOLS = [
    {
        "name": "get_weather",
        "description": "查询城市天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    {"name": "book_ticket", "description": "订火车票", "parameters": {"type": "object"}},
]
PARAMETERS = {"city": "北京", "days": 3, "detail": True, "unit": None, "hours": [6.5, 12], "extra": {"k": "it's"}}
OBSERVATION = {"temperature": 23, "weather": "晴"}


@pytest.fixture(scope="module")
def glm3(shared_tokenizers):
    return load_tokenizer(shared_tokenizers / "chatglm3-6b")


def tool_row(**tool_step):
    return {
        "tools": TOOLS,
        "conversations": [
            {"role": "user", "content": "北京天气怎么样？"},
            {"role": "assistant", "content": "我来查一下。"},
            {"role": "tool", "name": "get_weather", "parameters": PARAMETERS, "observation": OBSERVATION, **tool_step},
            {"role": "assistant", "content": "北京今天晴，23度。"},
        ],
    }


def original_fenced_call(parameters: dict) -> str:
    """The original renders the call with astunparse (`format_function_call`); that package is the oracle."""
    astunparse = pytest.importorskip("astunparse", reason="pip install astunparse (the original's renderer)")
    keywords = [ast.keyword(arg=name, value=ast.Constant(value)) for name, value in parameters.items()]
    call = ast.Call(func=ast.Name(id="tool_call"), args=[], keywords=keywords)
    return "```python\n" + astunparse.unparse(call).strip() + "\n```"


@pytest.mark.parametrize(
    "parameters",
    [PARAMETERS, {}, {"q": "line\nbreak \"quoted\" \\ back"}, {"x": float("inf"), "y": -1e-7, "z": 10**30}],
)
def test_the_call_is_rendered_as_the_original_renders_it(parameters):
    assert render_tool_call(parameters) == original_fenced_call(parameters)
    assert parse_call_text("f\n" + render_tool_call(parameters)) == ("f", parameters)


def expected_features(tokenizer, call_loss=True):
    """Ids from the chat template (build_chat_input: the same messages, an independent path) and the
    original's labels: a token is a target when the one before it is in a message with loss
    (assistant, function call, by default; never system/user or the observation after a call)."""
    messages = [
        ({"role": "system", "content": TOOL_SYSTEM_PROMPT, "tools": TOOLS}, False),
        ({"role": "user", "content": "北京天气怎么样？"}, False),
        ({"role": "assistant", "metadata": "", "content": "我来查一下。"}, True),
        ({"role": "assistant", "metadata": "get_weather", "content": original_fenced_call(PARAMETERS)}, call_loss),
        ({"role": "observation", "content": json.dumps(OBSERVATION, ensure_ascii=False)}, False),
    ]
    ids = tokenizer.build_chat_input("北京今天晴，23度。", [m for m, _ in messages], role="assistant")["input_ids"]
    ids = ids[0].tolist()[:-1] + [tokenizer.eos_token_id]  # the template ends with <|assistant|>; training with eos
    in_loss = [False, False]  # [gMASK, sop]
    for message, loss in messages:
        content = message["content"]
        if "tools" in message:
            content += "\n" + json.dumps(TOOLS, indent=4, ensure_ascii=False)
        in_loss += [loss] * len(tokenizer.build_single_message(message["role"], message.get("metadata", ""), content))
    in_loss += [True] * len(tokenizer.build_single_message("assistant", "", "北京今天晴，23度。")) + [False]
    assert len(in_loss) == len(ids)
    labels = [X] + [token if previous else X for token, previous in zip(ids[1:], in_loss)]
    return ids, labels


def test_tool_row_ids_and_labels_match_the_original(tmp_path, glm3):
    args = data_args(train_format="conversations", max_source_length=400, max_target_length=100, pad_to_max_length=True)
    path = write(tmp_path, "tools.json", json.dumps([tool_row(), tool_row(loss=False)], ensure_ascii=False))
    rows = load_rows(path, args, "chatglm3")
    features = preprocess_train(glm3, batch(*rows.rows), args)
    for index, call_loss in enumerate((True, False)):
        ids, labels = expected_features(glm3, call_loss)
        pad = 501 - len(ids)
        assert features["input_ids"][index] == ids + [glm3.pad_token_id] * pad
        assert features["labels"][index] == labels + [X] * pad
    text = glm3.decode(features["input_ids"][0])
    assert "<|assistant|> get_weather\n ```python\ntool_call(city='北京', days=3, detail=True, unit=None" in text
    assert '<|observation|> \n {"temperature": 23, "weather": "晴"}<|assistant|>' in text


def test_observation_messages_and_loss_flags_follow_the_original(glm3):
    """The original learns every message but system/user unless "loss": false (an observation too)."""
    args = data_args(train_format="conversations", max_source_length=60, max_target_length=10)
    row = {"conversations": [{"role": "user", "content": "q"}, {"role": "observation", "content": "o"},
                             {"role": "assistant", "content": "a", "loss": False}, {"role": "user", "content": "u", "loss": True},
                             {"role": "assistant", "content": "b"}]}  # fmt: skip
    features = preprocess_train(glm3, batch(row), args)
    ids, labels = features["input_ids"][0], features["labels"][0]
    spans, start = [], 2
    for message in row["conversations"]:
        size = len(glm3.build_single_message(message["role"], "", message["content"]))
        spans.append(range(start, start + size))
        start += size
    learned = {i for i, label in enumerate(labels) if label != X}
    # Targets: the token after each token of the observation and of the last answer.
    assert learned == {i + 1 for i in [*spans[1], *spans[4]]}
    assert ids[start] == glm3.eos_token_id


def test_a_tool_step_is_evaluated_on_its_call(glm3):
    args = data_args(train_format="conversations", max_source_length=400, max_target_length=100)
    row = tool_row()
    row["conversations"] = row["conversations"][:3]  # ends with the tool step: the call is the answer
    rows = load_rows_from(row, args)
    features = preprocess_eval(glm3, batch(*rows), args)
    reference = glm3.decode(features["labels"][0], skip_special_tokens=True)
    assert parse_call_text(reference) == ("get_weather", PARAMETERS)
    assert glm3.decode(features["input_ids"][0]).endswith("我来查一下。<|assistant|>")


def load_rows_from(row, args):
    from chatglm_ptuning.data import validate_records

    return validate_records([(1, row)], args, "mem.json", "chatglm3").rows


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda row: row.update(tools={"name": "x"}), ':1: "tools": expected an array of tool definitions, found object'),
        (lambda row: row["conversations"][2].pop("name"), ':1: "conversations"[2]."name": a "tool" message needs the tool\'s name as a string, found nothing'),
        (lambda row: row["conversations"][2].pop("parameters"), ':1: "conversations"[2]."parameters": a "tool" message needs the call\'s arguments as an object, found nothing'),
        (lambda row: row["conversations"][2].update(parameters='{"city": "北京"}'), '"parameters": a "tool" message needs the call\'s arguments as an object, found string'),
        (lambda row: row["conversations"][2].update(loss="no"), '"conversations"[2]."loss": expected true or false, found string'),
    ],
)  # fmt: skip
def test_bad_tool_rows_name_file_line_and_field(tmp_path, change, message):
    row = tool_row()
    change(row)
    path = write(tmp_path, "bad.jsonl", json.dumps(row, ensure_ascii=False) + "\n")
    with pytest.raises(DataError) as error:
        load_rows(path, data_args(train_format="conversations"), "chatglm3")
    assert str(error.value).startswith(str(path) + ":1: ") and message in str(error.value)


@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
def test_tool_rows_need_a_chatglm3_tokenizer(tmp_path, family):
    path = write(tmp_path, "t.jsonl", "\n" + json.dumps(tool_row(), ensure_ascii=False) + "\n")
    with pytest.raises(DataError, match=rf":2: tool definitions and calls need a ChatGLM3 tokenizer .* is {family}$"):
        load_rows(path, data_args(train_format="conversations"), family)


# ---- evaluation -------------------------------------------------------------------------------


def call(name, **arguments):
    return name + "\n" + render_tool_call(arguments)


def test_tool_call_scores_count_name_and_arguments_per_tool_step():
    labels = [call("get_weather", city="北京"), call("get_weather", city="上海", days=2), call("book_ticket", to="杭州"), "普通回答"]
    predictions = [
        call("get_weather", city="北京") + "<|observation|>trailing",  # right, text after the call ignored
        "get_weather\n```python\ntool_call(days=2.0, city='上海')\n```",  # same JSON arguments (2 == 2.0)
        call("get_weather", to="杭州"),  # wrong name
        call("get_weather", city="北京"),  # not a tool step: not counted
    ]
    assert tool_call_scores(predictions, labels) == {"tool-steps": 3.0, "tool-name-acc": 66.6667, "tool-call-acc": 66.6667}
    unsafe = "get_weather\n```python\ntool_call(city=__import__('os').getcwd())\n```"
    assert tool_call_scores([unsafe], labels[:1]) == {"tool-steps": 1.0, "tool-name-acc": 0.0, "tool-call-acc": 0.0}
    assert tool_call_scores(["a"], ["b"]) == {}
    scores = compute_metrics(predictions, labels)
    assert scores["tool-call-acc"] == 66.6667 and "rouge-l" in scores and "bleu-4" in scores
    assert set(compute_metrics(["你好"], ["你好"])) == {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}


# ---- the command line -------------------------------------------------------------------------

SHORT_TOOLS = [{"name": "get_weather", "description": "天气", "parameters": {"city": "string"}}]


def short_tool_rows(path, rows):
    """Sample rows with a one-tool definition, so that they fit the tiny model's 256-token context."""
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()][:rows]
    return "".join(json.dumps({**row, "tools": SHORT_TOOLS}, ensure_ascii=False) + "\n" for row in lines)


@pytest.mark.slow
def test_train_tools_recipe_then_predict_reports_tool_metrics(tmp_path, tiny_glm3_dir):
    import subprocess

    from servers import server_env

    from chatglm_ptuning.train import main

    samples = REPO_ROOT / "data_samples"
    train = write(tmp_path, "tools_train.json", short_tool_rows(samples / "tools_train.json", 8))
    dev = write(tmp_path, "tools_dev.json", short_tool_rows(samples / "tools_dev.json", 3))
    out = tmp_path / "out"
    env = server_env(
        MODEL_PATH=str(tiny_glm3_dir), TRAIN_FILE=str(train), VALIDATION_FILE=str(dev), OUTPUT_DIR=str(out),
        MAX_SOURCE_LENGTH="160", MAX_TARGET_LENGTH="64", PRE_SEQ_LEN="4", QUANTIZATION_BIT="", BATCH_SIZE="2",
        GRAD_ACCUM="1", MAX_STEPS="2", SAVE_STEPS="2", LOGGING_STEPS="1",
    )  # fmt: skip
    result = subprocess.run(
        ["bash", "train_tools.sh", "--report_to", "none"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    code = main([
        "--do_predict", "--test_file", str(dev), "--train_format", "conversations",
        "--model_name_or_path", str(tiny_glm3_dir), "--ptuning_checkpoint", str(out / "checkpoint-2"),
        "--output_dir", str(tmp_path / "pred"), "--max_source_length", "160", "--max_target_length", "64",
        "--predict_with_generate", "--do_sample", "False", "--report_to", "none",
    ])  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "pred" / "predict_results.json").read_text())
    assert results["predict_tool-steps"] == 3.0 and {"predict_tool-name-acc", "predict_tool-call-acc", "predict_rouge-l"} <= set(results)
    labels = [json.loads(line)["labels"] for line in (tmp_path / "pred" / "generated_predictions.txt").open()]
    assert [parse_call_text(label)[0] for label in labels] == ["get_weather", "search_trains", "convert_currency"]


def test_tool_rows_on_a_chatglm2_model_are_one_clear_error(tmp_path, tiny_glm2_dir, capsys):
    from chatglm_ptuning.train import main

    data = write(tmp_path, "tools.jsonl", json.dumps(tool_row(), ensure_ascii=False) + "\n")
    code = main([
        "--do_train", "--train_file", str(data), "--train_format", "conversations", "--model_name_or_path",
        str(tiny_glm2_dir), "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none",
    ])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"error: {data}:1: tool definitions and calls need a ChatGLM3 tokenizer (role tokens); this tokenizer is chatglm2"]


def test_tool_sample_files(glm3):
    args = data_args(train_format="conversations", max_source_length=1024, max_target_length=128)
    train = load_rows(REPO_ROOT / "data_samples" / "tools_train.json", args, "chatglm3").rows
    dev = load_rows(REPO_ROOT / "data_samples" / "tools_dev.json", args, "chatglm3").rows
    assert len(train) >= 30 and len(dev) >= 8
    calls = [m["metadata"] for row in train for m in row["conversations"] if m["metadata"]]
    assert set(calls) == {"get_weather", "search_trains", "convert_currency"} and len(calls) > len(train)
    assert any(not any(m["metadata"] for m in row["conversations"]) for row in train)  # some rows call no tool
    features = preprocess_train(glm3, batch(*train), args)
    assert all(ids[-1] == glm3.eos_token_id for ids in features["input_ids"])  # nothing cut at 1024 + 128
    references = [glm3.decode(labels, skip_special_tokens=True) for labels in preprocess_eval(glm3, batch(*dev), args)["labels"]]
    assert all(parse_call_text(text) for text in references)  # every dev row is evaluated on a call
