"""The shipped embedded default model (chatglm_ptuning/embedded/): files, official layout, tokenizer,
pre-trained backbone, and a short P-tuning that learns.

scripts/build_embedded_model.py made the folder; the tokenizer is rebuilt here and compared byte for
byte (the backbone's pre-training takes minutes, so only its effect is checked: a held-out loss far
below a random model's).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sentencepiece import sentencepiece_model_pb2

import chatglm_ptuning  # noqa: F401 - registers the Auto classes
from chatglm_ptuning import load_model
from chatglm_ptuning.configuration import ChatGLMConfig
from chatglm_ptuning.data import preprocess_train, read_json_records
from chatglm_ptuning.official_format import official_config_dict
from chatglm_ptuning.tokenization import ChatGLM2Tokenizer
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from scripts import build_embedded_model as build  # noqa: E402

EMBEDDED = REPO / "chatglm_ptuning" / "embedded"
SHIPPED_FILES = {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "README.md"}


def _rows(name: str) -> list[dict]:
    return [row for _, row in read_json_records(REPO / "data_samples" / name)]


@pytest.fixture(scope="module")
def tokenizer() -> ChatGLM2Tokenizer:
    return AutoTokenizer.from_pretrained(str(EMBEDDED))


@pytest.fixture(scope="module")
def loaded():
    return load_model(EMBEDDED, device="cpu")


def test_folder_holds_the_official_files_and_is_small():
    names = {path.name for path in EMBEDDED.iterdir()}
    assert SHIPPED_FILES <= names, f"missing {SHIPPED_FILES - names}"
    total = sum(path.stat().st_size for path in EMBEDDED.iterdir() if path.is_file())
    assert total < 10 * 2**20, f"the embedded folder is {total} bytes; keep it under 10 MiB"


def test_config_is_the_official_chatglm2_layout(tokenizer):
    written = json.loads((EMBEDDED / "config.json").read_text(encoding="utf-8"))
    config = ChatGLMConfig.from_pretrained(EMBEDDED)
    assert config.architecture == "chatglm2"
    expected = official_config_dict(config, name_or_path=build.NAME_OR_PATH, torch_dtype="float16")
    assert list(written) == list(expected)  # same keys, same order
    assert written == expected
    assert written["architectures"] == ["ChatGLMModel"] and written["model_type"] == "chatglm"
    assert written["padded_vocab_size"] % 64 == 0
    assert tokenizer.vocab_size <= written["padded_vocab_size"] < tokenizer.vocab_size + 64
    assert written["hidden_dropout"] == 0.0


def test_tokenizer_loads_as_chatglm2_with_special_tokens_after_the_vocabulary(tokenizer):
    assert type(tokenizer) is ChatGLM2Tokenizer
    pieces = tokenizer.sp_model.vocab_size()
    specials = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
    assert tokenizer.convert_tokens_to_ids(specials) == [pieces + k for k in range(5)]
    assert tokenizer.vocab_size == len(tokenizer) == pieces + 5
    assert (tokenizer.unk_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 2, 0)
    assert tokenizer.get_command("<bos>") == 1
    assert tokenizer.encode("裙子")[:2] == [pieces + 1, pieces + 3]  # [gMASK], sop
    config = json.loads((EMBEDDED / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["name_or_path"] == build.NAME_OR_PATH and config["tokenizer_class"] == "ChatGLMTokenizer"


def test_sentencepiece_model_follows_the_chatglm2_conventions():
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((EMBEDDED / "tokenizer.model").read_bytes())
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    assert trainer.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    assert trainer.byte_fallback and trainer.split_digits
    assert (trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id) == (0, 1, 2, -1)
    assert normalizer.name == "identity" and normalizer.add_dummy_prefix and not normalizer.remove_extra_whitespaces
    assert [p.piece for p in proto.pieces[:4]] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert len(proto.pieces) < 10_000  # a small vocabulary of its own, not ChatGLM2's 64789 pieces


def test_shipped_tokenizer_is_what_the_build_script_makes():
    made = build.train_sentencepiece(build.tokenizer_texts(), build.TOKENIZER_VOCAB)
    assert made == (EMBEDDED / "tokenizer.model").read_bytes()


def test_tokenizer_round_trips_chinese_sample_text(tokenizer):
    texts = [row["content"] for row in _rows("adgen_dev.json")] + [row["summary"] for row in _rows("adgen_dev.json")]
    texts += [row["response"] for row in _rows("chat_dev.json")]
    texts.append("第一行：\n第二行  两个空格\t制表符 123 emoji😀")  # newlines, tabs, emoji go through byte fallback
    for text in texts:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Text the tokenizer was trained on needs no byte fallback, and is several characters per token.
    summary = _rows("adgen_train.json")[0]["summary"]
    pieces = tokenizer.tokenize(summary)
    assert not any(piece.startswith("<0x") for piece in pieces)
    assert len(summary) / len(pieces) > 1.5


def test_backbone_is_pretrained_on_the_sample_text(loaded, tokenizer):
    """Held-out ad copy (adgen_dev, never trained on) scores far better than a uniform guess."""
    model, _ = loaded
    assert type(model).__name__ == "ChatGLM2ForConditionalGeneration" and not model.training
    ids = [tokenizer.encode(row["summary"]) + [tokenizer.eos_token_id] for row in _rows("adgen_dev.json")[:8]]
    width = max(map(len, ids))
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    labels = torch.tensor([[-100, -100] + row[2:] + [-100] * (width - len(row)) for row in ids])
    with torch.no_grad():
        loss = float(model(input_ids=input_ids, labels=labels).loss)
    assert loss < 0.5 * math.log(tokenizer.vocab_size), f"held-out loss {loss:.3f}: the backbone does not look pre-trained"


def test_short_ptuning_lowers_the_loss():
    torch.manual_seed(0)
    model, tokenizer = load_model(EMBEDDED, pre_seq_len=8, device="cpu")
    args = SimpleNamespace(
        prompt_column="content", response_column="summary", history_column=None, max_source_length=64,
        max_target_length=96, val_max_target_length=None, ignore_pad_token_for_loss=True, source_prefix="",
        train_format=None, all_turns=False, pad_to_max_length=True,
    )
    rows = _rows("adgen_train.json")[:8]
    features = preprocess_train(tokenizer, {"content": [r["content"] for r in rows], "summary": [r["summary"] for r in rows]}, args)
    input_ids, labels = torch.tensor(features["input_ids"]), torch.tensor(features["labels"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and sum(p.numel() for p in trainable) == sum(p.numel() for p in model.transformer.prefix_encoder.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=3e-2)

    def loss_now() -> float:
        model.eval()
        with torch.no_grad():
            return float(model(input_ids=input_ids, labels=labels).loss)

    before = loss_now()
    model.train()
    for _ in range(10):
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = loss_now()
    assert after < 0.85 * before, f"10 P-tuning steps took the loss from {before:.3f} to {after:.3f}"
