"""ChatGLM tokenizers against the official ones (golden outputs), the ids of the chat prompts,
AutoTokenizer dispatch, left padding and save/load.

The real tokenizer files come from the `shared_tokenizers` fixture (chatglm_ptuning.tokenizer_files).
tests/golden/tokenizer_cases.json holds what the official tokenization_chatglm.py files returned for
the same calls (its "_note" says how it was produced).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from chatglm_ptuning.configuration import ChatGLM6BConfig
from chatglm_ptuning.glm_positions import glm_attention_mask, glm_position_ids, padding_mask_from_block_mask
from chatglm_ptuning.modeling_chatglm2 import ChatGLM2ForConditionalGeneration
from chatglm_ptuning.tokenization import (
    ChatGLM2Tokenizer,
    ChatGLM3Tokenizer,
    ChatGLM6BTokenizer,
    ChatGLMTokenizer,
)

REPO = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((REPO / "tests" / "golden" / "tokenizer_cases.json").read_text(encoding="utf-8"))
FAMILIES = {"chatglm-6b": ChatGLM6BTokenizer, "chatglm2-6b": ChatGLM2Tokenizer, "chatglm3-6b": ChatGLM3Tokenizer}


@pytest.fixture(scope="module")
def tokenizers(shared_tokenizers) -> dict[str, ChatGLMTokenizer]:
    return {name: ChatGLMTokenizer.from_pretrained(shared_tokenizers / name, local_files_only=True) for name in FAMILIES}


def plain(value: Any) -> Any:
    """numpy arrays / tensors / nested lists -> nested Python lists, for comparison with JSON."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def encoded(output: Any) -> dict[str, Any]:
    return {key: plain(value) for key, value in output.items()}


# ---- the official tokenizers' outputs ---------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_from_folder(tokenizers, name):
    assert type(tokenizers[name]) is FAMILIES[name]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_texts_match_official(tokenizers, name):
    tok, golden = tokenizers[name], GOLDEN[name]
    for case in golden["texts"]:
        text = case["text"]
        ids = tok.encode(text, add_special_tokens=False)
        full = tok.encode(text)
        assert ids == case["ids"], text
        assert full == case["ids_with_special_tokens"], text
        assert tok.tokenize(text) == case["tokenize"], text
        assert tok.decode(full) == case["decode"], text
        assert tok.decode(ids) == case["decode_no_special"], text
        # ChatGLM3's original ignored skip_special_tokens for [gMASK]/sop/roles; ours drops them (documented).
        skipped = case["decode_no_special"] if name == "chatglm3-6b" else case["decode_skip_special_tokens"]
        assert tok.decode(full, skip_special_tokens=True) == skipped, text


@pytest.mark.parametrize("name", list(FAMILIES))
def test_pairs_batches_truncation_match_official(tokenizers, name):
    tok, golden = tokenizers[name], GOLDEN[name]
    for case in golden["pairs"]:
        assert tok.encode(case["text"], case["text_pair"]) == case["ids"]
    for case in golden["batches"]:
        assert encoded(tok(case["texts"], padding=True)) == case["padded"]
    for case in golden["batches_max_length"]:
        out = tok(case["texts"], padding="max_length", max_length=case["max_length"], truncation=True)
        assert encoded(out) == case["padded"]
    for case in golden["truncation"]:
        assert tok(case["text"], max_length=case["max_length"], truncation=True)["input_ids"] == case["ids"]
    for case in golden["text_target"]:
        assert tok(text_target=case["text"], max_length=10, truncation=True)["input_ids"] == case["ids"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_decode_ids_match_official(tokenizers, name):
    tok = tokenizers[name]
    for case in GOLDEN[name]["decode_ids"]:
        assert tok.decode(case["ids"]) == case["decode"], case["ids"]
        if name != "chatglm3-6b":
            assert tok.decode(case["ids"], skip_special_tokens=True) == case["skip"], case["ids"]
    for key, value in GOLDEN[name]["special"].items():
        assert getattr(tok, key) == value, key


def test_chatglm6b_image_token_offset_matches_official(shared_tokenizers):
    tok = ChatGLMTokenizer.from_pretrained(shared_tokenizers / "chatglm-6b", num_image_tokens=20000)
    assert tok.vocab_size == 150344 and tok.bos_token_id == 150004
    for case in GOLDEN["chatglm-6b"]["num_image_tokens_20000"]["texts"]:
        ids = tok.encode(case["text"])
        assert ids == case["ids"]
        assert tok.decode(ids) == case["decode"]
    assert tok.convert_ids_to_tokens(17) == "<image_17>" and tok.convert_tokens_to_ids("<image_17>") == 17


def test_chatglm2_build_prompt_matches_official(tokenizers):
    tok = tokenizers["chatglm2-6b"]
    for case in GOLDEN["chatglm2-6b"]["build_prompt"]:
        history = [tuple(turn) for turn in case["history"]] if case["history"] is not None else None
        prompt = tok.build_prompt(case["query"], history)
        assert prompt == case["prompt"]
        assert tok(prompt)["input_ids"] == case["ids"]


def test_chatglm3_chat_input_matches_official(tokenizers, shared_tokenizers):
    tok = tokenizers["chatglm3-6b"]
    golden = GOLDEN["chatglm3-6b"]
    for case in golden["build_chat_input"]:
        out = tok.build_chat_input(case["query"], history=case["history"], role=case["role"])
        assert all(isinstance(value, torch.Tensor) for value in out.values())
        assert encoded(out) == case["output"]
    for case in golden["build_single_message"]:
        assert tok.build_single_message(case["role"], case["metadata"], case["message"]) == case["ids"]
    special = ChatGLMTokenizer.from_pretrained(shared_tokenizers / "chatglm3-6b", encode_special_tokens=True)
    assert type(special) is ChatGLM3Tokenizer
    for case in golden["encode_special_tokens"]:
        assert special.encode(case["text"]) == case["ids"]
        assert special.tokenize(case["text"]) == case["tokenize"]


# ---- "你好" as each family's official chat() encodes it ------------------------------------------


def test_hello_prompt_ids(tokenizers):
    assert tokenizers["chatglm-6b"]("你好")["input_ids"] == [5, 74874, 130001, 130004]
    glm2 = tokenizers["chatglm2-6b"]
    assert glm2(glm2.build_prompt("你好"))["input_ids"] == [
        64790,
        64792,
        790,
        30951,
        517,
        30910,
        30939,
        30996,
        13,
        13,
        54761,
        31211,
        39701,
        13,
        13,
        55437,
        31211,
    ]
    chat = tokenizers["chatglm3-6b"].build_chat_input("你好")
    assert chat["input_ids"].tolist() == [[64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]]
    assert chat["attention_mask"].tolist() == [[1] * 8] and chat["position_ids"].tolist() == [list(range(8))]


def test_chatglm6b_specials_and_whitespace(tokenizers):
    tok = tokenizers["chatglm-6b"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (130004, 130005, 3, 0)
    assert (tok.mask_token_id, tok.gmask_token_id, tok.end_token_id) == (130000, 130001, 2)
    # \n -> <n> (4), \t -> <|tab|> (130008), k spaces -> <|blank_k|> (130009 + k - 2)
    assert tok.encode("a\n\tb   c", add_special_tokens=False) == [104, 4, 130008, 178, 130010, 169]
    assert tok.decode(tok.encode("x" + " " * 80 + "y")) == "x" + " " * 80 + "y"
    # pair: a + [gMASK, <sop>] + b + [<eop>]
    assert tok.encode("你好", "你好") == [5, 74874, 130001, 130004, 5, 74874, 130005]


def test_chatglm6b_prompt_template(tokenizers):
    tok = tokenizers["chatglm-6b"]
    assert tok.build_prompt("你好") == "你好" and tok.build_prompt("你好", []) == "你好"
    assert tok.build_prompt("还有呢", [("你好", "你好！"), ("a", "b")]) == (
        "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：a\n答：b\n[Round 2]\n问：还有呢\n答："
    )


def test_chatglm6b_padding_builds_glm_masks_and_positions(tokenizers):
    tok = tokenizers["chatglm-6b"]
    batch = tok(["你好", "Hello there friend"], padding=True, return_tensors="pt")
    ids, mask, positions = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    assert ids.shape == (2, 5) and mask.shape == (2, 1, 5, 5) and positions.shape == (2, 2, 5)
    assert mask.dtype == torch.bool
    assert ids[0].tolist() == [3, 5, 74874, 130001, 130004]  # left pad with <pad> 3
    # Row 0: pad column blocked everywhere; context (▁, 你好, [gMASK]) bidirectional; <sop> sees all real tokens.
    assert mask[0, 0].tolist() == [
        [True, True, True, True, True],
        [True, False, False, False, True],
        [True, False, False, False, True],
        [True, False, False, False, True],
        [True, False, False, False, False],
    ]
    assert positions[0].tolist() == [[0, 0, 1, 2, 2], [0, 0, 0, 0, 1]]


def test_chatglm6b_padding_equals_what_the_model_derives(tokenizers):
    """The tokenizer's positions and mask are the model's (glm_positions.py), for padded batches too."""
    tok = tokenizers["chatglm-6b"]
    config = ChatGLM6BConfig(
        bos_token_id=tok.bos_token_id, mask_token_id=tok.mask_token_id, gmask_token_id=tok.gmask_token_id
    )
    texts = ["你好", "Hello there friend", "类型#裙*风格#简约"]
    batch = tok(texts, ["回答", "an answer here", "好"], padding=True, return_tensors="pt")
    ids, block_mask = batch["input_ids"], batch["attention_mask"]
    keep = padding_mask_from_block_mask(block_mask)
    assert keep.sum(-1).tolist() == [len(tok.encode(t, a)) for t, a in zip(texts, ["回答", "an answer here", "好"])]
    assert batch["position_ids"].tolist() == glm_position_ids(ids, config, keep).tolist()
    real_rows = keep.bool()[:, None, :, None]  # pad query rows: the tokenizer blocks them, the model never reads them
    model_mask = glm_attention_mask(ids, tok.bos_token_id, keep)
    assert torch.equal(block_mask & real_rows, model_mask & real_rows)
    # A row holding both [MASK] and [gMASK]: the tokenizer takes [MASK]'s position, as the original tokenizer did.
    both = tok.encode("a [MASK] b") + tok.encode("c", add_special_tokens=False)
    padded = tok.pad({"input_ids": [both]}, return_tensors="pt")
    row = torch.tensor([both])
    assert padded["position_ids"].tolist() == glm_position_ids(row, config, mask_before_gmask=True).tolist()
    assert padded["position_ids"].tolist() != glm_position_ids(row, config).tolist()


def test_chatglm2_padding_equals_what_the_model_derives(tokenizers):
    for name in ("chatglm2-6b", "chatglm3-6b"):
        batch = tokenizers[name](["你好", "你好你好你好"], padding=True, return_tensors="pt")
        derived = ChatGLM2ForConditionalGeneration._prepare_position_ids_for_generation(
            None, batch["input_ids"], {"attention_mask": batch["attention_mask"]}
        )  # reads nothing from the model instance
        assert batch["position_ids"].tolist() == derived.tolist()


def test_chatglm2_padding_and_right_side_error(tokenizers):
    tok = tokenizers["chatglm2-6b"]
    batch = tok(["你好", "你好你好你好"], padding=True)
    assert batch["input_ids"][0][:2] == [0, 0] and batch["attention_mask"][0][:2] == [0, 0]
    assert batch["position_ids"][0] == [0, 0, 0, 1, 2, 3]
    features = [{"input_ids": [64790, 64792, 5]}, {"input_ids": [64790, 64792, 5, 6, 7]}]
    padded = tok.pad(features, return_tensors="pt")
    assert padded["input_ids"][0].tolist() == [0, 0, 64790, 64792, 5]
    assert padded["position_ids"][0].tolist() == [0, 0, 0, 1, 2]
    for name in ("chatglm-6b", "chatglm2-6b", "chatglm3-6b"):
        with pytest.raises(ValueError, match="left only"):
            tokenizers[name](["a", "bb cc"], padding=True, padding_side="right")


def test_chatglm3_decode_renders_roles_and_skips_them_on_request(tokenizers):
    tok = tokenizers["chatglm3-6b"]
    ids = tok.build_chat_input("你好")["input_ids"][0].tolist() + [2]
    assert tok.decode(ids) == "[gMASK]sop<|user|> \n 你好<|assistant|>"
    assert tok.decode(ids, skip_special_tokens=True) == "\n 你好"
    assert tok.get_command("<|observation|>") == 64797 and tok.get_command("<eos>") == 2


def test_ids_beyond_the_vocabulary_decode_to_nothing(tokenizers):
    # The models pad their embeddings past the tokenizer vocabulary (130528 / 65024 rows).
    assert tokenizers["chatglm-6b"].decode([5, 74874, 130500]) == "你好"
    assert tokenizers["chatglm2-6b"].decode([36474, 54591, 65000]) == "你好"
    assert tokenizers["chatglm3-6b"].decode([36474, 54591, 65000]) == "你好"


def test_adding_tokens_outside_the_vocabulary_is_refused(tokenizers):
    with pytest.raises(NotImplementedError, match="outside their SentencePiece vocabulary"):
        tokenizers["chatglm2-6b"].add_tokens(["<brand_new_token>"])


# ---- dispatch, construction, save/load --------------------------------------------------------


def copy_folder(src: Path, dst: Path, config: dict | None = None, tokenizer_config: dict | None = None) -> Path:
    dst.mkdir()
    for item in src.iterdir():
        if item.name != "tokenizer_config.json":
            shutil.copy(item, dst / item.name)
    base = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    (dst / "tokenizer_config.json").write_text(json.dumps({**base, **(tokenizer_config or {})}), encoding="utf-8")
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return dst


def test_version_detection_for_tokenizer_model_folders(tmp_path, shared_tokenizers):
    root = shared_tokenizers
    unnamed = copy_folder(root / "chatglm3-6b", tmp_path / "unnamed", tokenizer_config={"name_or_path": "my-model"})
    assert type(ChatGLMTokenizer.from_pretrained(unnamed)) is ChatGLM2Tokenizer
    assert type(ChatGLMTokenizer.from_pretrained(unnamed, chatglm_version=3)) is ChatGLM3Tokenizer
    glm3_model = copy_folder(
        root / "chatglm3-6b",
        tmp_path / "glm3_model",
        config={"_name_or_path": "THUDM/chatglm3-6b", "model_type": "chatglm", "padded_vocab_size": 65024},
        tokenizer_config={"name_or_path": "local"},
    )
    assert type(ChatGLMTokenizer.from_pretrained(glm3_model)) is ChatGLM3Tokenizer
    with pytest.raises(ValueError, match="chatglm_version"):
        ChatGLM2Tokenizer.from_pretrained(unnamed, chatglm_version=3)
    with pytest.raises(OSError, match="neither"):
        ChatGLMTokenizer.from_pretrained(tmp_path)


def test_direct_construction_picks_family(shared_tokenizers):
    root = shared_tokenizers
    assert type(ChatGLMTokenizer(str(root / "chatglm-6b" / "ice_text.model"), num_image_tokens=0)) is ChatGLM6BTokenizer
    assert type(ChatGLMTokenizer(vocab_file=str(root / "chatglm2-6b" / "tokenizer.model"))) is ChatGLM2Tokenizer
    glm3 = ChatGLMTokenizer(vocab_file=str(root / "chatglm3-6b" / "tokenizer.model"), chatglm_version=3)
    assert type(glm3) is ChatGLM3Tokenizer


@pytest.mark.parametrize("name", list(FAMILIES))
def test_save_pretrained_round_trip(tokenizers, tmp_path, name, shared_tokenizers):
    from transformers import AutoTokenizer

    import chatglm_ptuning  # noqa: F401  (registers ChatGLMTokenizer with AutoTokenizer)

    tok = tokenizers[name]
    files = tok.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert saved["tokenizer_class"] == "ChatGLMTokenizer"
    assert saved["chatglm_version"] == tok.chatglm_version
    vocab_name = tok.vocab_files_names["vocab_file"]
    assert (tmp_path / vocab_name).read_bytes() == (shared_tokenizers / name / vocab_name).read_bytes()
    assert str(tmp_path / vocab_name) in files
    if name != "chatglm-6b":  # the official ChatGLM2/3 __init__ rejects these keys (read-only properties)
        assert not {"eos_token", "pad_token", "unk_token"} & saved.keys()
    else:
        assert saved["num_image_tokens"] == 0 and saved["gmask_token"] == "[gMASK]"
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is type(tok)
    text = GOLDEN[name]["texts"][1]["text"]
    assert reloaded(text)["input_ids"] == tok(text)["input_ids"]
    assert reloaded.decode(reloaded.encode(text)) == tok.decode(tok.encode(text))


@pytest.mark.slow
def test_auto_tokenizer_offline_without_remote_code(tmp_path, shared_tokenizers):
    """AutoTokenizer with HF_HUB_OFFLINE=1 and no trust_remote_code, with and without a model config.json."""
    root = shared_tokenizers
    with_model_config = copy_folder(
        root / "chatglm2-6b",
        tmp_path / "glm2_model",
        config={
            "_name_or_path": "THUDM/chatglm2-6b",
            "model_type": "chatglm",
            "padded_vocab_size": 65024,
            "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"},
        },
    )
    folders = [root / "chatglm-6b", root / "chatglm2-6b", root / "chatglm3-6b", with_model_config]
    script = (
        "import sys, chatglm_ptuning\n"
        "from transformers import AutoTokenizer\n"
        "for folder in sys.argv[1:]:\n"
        "    print(type(AutoTokenizer.from_pretrained(folder)).__name__)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, folders)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [
        "ChatGLM6BTokenizer",
        "ChatGLM2Tokenizer",
        "ChatGLM3Tokenizer",
        "ChatGLM2Tokenizer",
    ]
