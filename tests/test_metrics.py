"""Tests for chatglm_ptuning.metrics (ROUGE/BLEU as the reference recipe computes them)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jieba
import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from chatglm_ptuning.metrics import (
    METRIC_KEYS,
    PredictionFileError,
    build_trainer_metrics,
    compute_metrics,
    main,
    read_predictions_file,
    score_pair,
)

REPO = Path(__file__).resolve().parents[1]


def as_dict(scores):
    return dict(zip(METRIC_KEYS, scores))


# ---------------------------------------------------------------- hand-worked numbers


def test_identical_chinese_scores_100():
    # F = 2PR/(P+R+1e-8) = 0.999999995 -> round(99.9999995, 4) = 100.0; BLEU: all precisions 1, BP 1.
    assert score_pair("这件连衣裙很好看", "这件连衣裙很好看") == (100.0, 100.0, 100.0, 100.0)


def test_disjoint_scores_0():
    # No shared word or character: every ROUGE F is 0 and nltk returns 0 with no unigram match.
    assert score_pair("甲乙丙丁", "戊己庚辛") == (0.0, 0.0, 0.0, 0.0)


def test_english_prefix_hand_worked():
    # Words: hyp {the, cat, sat}, ref {the, cat, sat, on}.
    #   ROUGE-1: P = 3/3, R = 3/4, F = 6/7 -> 85.7143; ROUGE-2: P = 2/2, R = 2/3, F = 0.8 -> 80.0;
    #   ROUGE-L: LCS 3 -> same as ROUGE-1.
    # BLEU on characters: the hypothesis is a prefix of the reference, so every n-gram precision
    # is 1 and BLEU = BP = exp(1 - 14/11) = 0.761300 -> 76.13.
    assert round(math.exp(1 - 14 / 11) * 100, 4) == 76.13
    assert score_pair("the cat sat", "the cat sat on") == (85.7143, 80.0, 85.7143, 76.13)


def test_chinese_partial_overlap_hand_worked():
    hyp, ref = "这条裙子是红色的", "这条裙子是蓝色的"
    # The hand computation rests on this segmentation (jieba 0.42.1 default dictionary).
    assert list(jieba.cut(hyp)) == ["这", "条", "裙子", "是", "红色", "的"]
    assert list(jieba.cut(ref)) == ["这", "条", "裙子", "是", "蓝色", "的"]
    # ROUGE-1: 5 of 6 words shared -> F = 5/6 -> 83.3333.
    # ROUGE-2: bigrams 这条 条裙子 裙子是 shared, 3 of 5 -> 60.0.  ROUGE-L: LCS 5 of 6 -> 83.3333.
    # BLEU chars (8 each, BP 1): p1 7/8, p2 5/7, p3 3/6, p4 2/5; product 1/8; (1/8)^(1/4) = 0.594604.
    assert round((7 / 8 * 5 / 7 * 3 / 6 * 2 / 5) ** 0.25 * 100, 4) == 59.4604
    assert score_pair(hyp, ref) == (83.3333, 60.0, 83.3333, 59.4604)


def test_digits_hand_worked():
    hyp, ref = "2023年5月", "2023年6月"
    assert list(jieba.cut(hyp)) == ["2023", "年", "5", "月"]
    # ROUGE-1 3/4 -> 75.0; ROUGE-2 {2023年} of 3 -> 33.3333; ROUGE-L LCS 3/4 -> 75.0.
    # BLEU chars (7 each): p1 6/7, p2 4/6, p3 3/5, p4 2/4 -> (6/7*4/6*3/5*2/4)^(1/4) -> 64.3459.
    assert score_pair(hyp, ref) == (75.0, 33.3333, 75.0, 64.3459)


def test_mean_over_pairs():
    scores = compute_metrics(["the cat sat", "甲乙丙丁"], ["the cat sat on", "戊己庚辛"])
    assert scores == {"rouge-1": 85.7143 / 2, "rouge-2": 40.0, "rouge-l": 85.7143 / 2, "bleu-4": 76.13 / 2}
    assert all(type(value) is float for value in scores.values())


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("prediction", ["", "   ", "\n", "\t \n"])
def test_empty_prediction_scores_zero_instead_of_crashing(prediction):
    with pytest.raises(ValueError, match="Hypothesis is empty"):  # what the reference would hit
        Rouge().get_scores(" ".join(jieba.cut(prediction)), "你 好")
    assert score_pair(prediction, "你好") == (0.0, 0.0, 0.0, 0.0)


def test_empty_label_scores_zero():
    assert score_pair("你好", "") == (0.0, 0.0, 0.0, 0.0)
    assert compute_metrics([""], [""]) == {key: 0.0 for key in METRIC_KEYS}


def test_bleu_for_empty_prediction_matches_reference_formula():
    # nltk returns 0 itself here; the guard only concerns ROUGE.
    reference_bleu = sentence_bleu([list("你好世界")], list(""), smoothing_function=SmoothingFunction().method3)
    assert score_pair("", "你好世界")[3] == round(reference_bleu * 100, 4) == 0


def test_punctuation_only_prediction():
    # Not empty for rouge_chinese: punctuation words just never match.
    assert score_pair("，。！", "你好") == (0.0, 0.0, 0.0, 0.0)


def reference_scores(prediction, label):
    """The reference recipe, restated with the libraries (valid for non-empty texts)."""
    hyp, ref = list(jieba.cut(prediction)), list(jieba.cut(label))
    rouge = Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
    bleu = sentence_bleu([list(label)], list(prediction), smoothing_function=SmoothingFunction().method3)
    return tuple(round(rouge[k]["f"] * 100, 4) for k in ("rouge-1", "rouge-2", "rouge-l")) + (round(bleu * 100, 4),)


MIXED_PAIRS = [
    ("你好！世界。", "你好，世界！"),  # sentence-ending punctuation splits rouge_chinese sentences
    ("Hello world", "hello world"),  # case-sensitive
    ("价格是 199 元，限时 3 天。", "价格为199元，限时三天"),
    ("这款外套采用羊毛面料，保暖又有型。", "羊毛材质的外套，保暖有型，百搭。"),
    ("It's 5 o'clock.", "It is five o'clock."),
    ("a b c d e", "a b c d e f"),
]


@pytest.mark.parametrize("prediction,label", MIXED_PAIRS)
def test_agrees_with_library_recipe(prediction, label):
    assert score_pair(prediction, label) == reference_scores(prediction, label)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        compute_metrics(["a", "b"], ["a"])


def test_parallel_equals_serial():
    base = MIXED_PAIRS + [("the cat sat", "the cat sat on"), ("", "空"), ("这条裙子是红色的", "这条裙子是蓝色的")]
    pairs = [(f"{p}{i % 7}", f"{l}{i % 5}") for i in range(60) for p, l in base]
    predictions, labels = zip(*pairs)
    serial = compute_metrics(predictions, labels, workers=1)
    parallel = compute_metrics(predictions, labels, workers=2)
    assert parallel == serial


# ---------------------------------------------------------------- Trainer callable


class CharTokenizer:
    """Stand-in tokenizer: id i < 100 is character chr(0x4E00 + i); 0 is pad, 1 is a special token."""

    pad_token_id = 0

    def batch_decode(self, sequences, skip_special_tokens=False):
        assert skip_special_tokens
        for row in sequences:
            assert -100 not in row, "-100 reached the tokenizer"
        return ["".join(chr(0x4E00 + t) for t in row if t not in (0, 1)) for row in sequences]


def test_build_trainer_metrics_decodes_and_scores():
    tokenizer = CharTokenizer()
    metrics = build_trainer_metrics(tokenizer)
    preds = np.array([[1, 5, 6, 7, 8, 0, 0], [9, 10, 11, 12, -100, -100, -100]])
    labels = np.array([[5, 6, 7, 8, -100, -100, -100], [20, 21, 22, 23, 24, -100, -100]])
    expected = compute_metrics(
        tokenizer.batch_decode([[5, 6, 7, 8], [9, 10, 11, 12]], skip_special_tokens=True),
        tokenizer.batch_decode([[5, 6, 7, 8], [20, 21, 22, 23, 24]], skip_special_tokens=True),
    )
    assert metrics((preds, labels)) == expected
    assert metrics(((preds, "logits-ignored"), labels)) == expected  # predictions given as a tuple
    assert expected["bleu-4"] == 50.0  # one identical pair (100) and one disjoint pair (0)


# ---------------------------------------------------------------- CLI


def write_predictions(path, records):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")


def test_cli_prints_and_writes_scores(tmp_path, capsys):
    predictions_file = tmp_path / "generated_predictions.txt"
    write_predictions(
        predictions_file,
        [{"labels": "the cat sat on", "predict": "the cat sat"}, {"labels": "戊己庚辛", "predict": "甲乙丙丁"}],
    )
    output = tmp_path / "scores.json"
    assert main([str(predictions_file), "--output", str(output), "--workers", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = {"rouge-1": 85.7143 / 2, "rouge-2": 40.0, "rouge-l": 85.7143 / 2, "bleu-4": 76.13 / 2}
    assert printed == expected
    assert json.loads(output.read_text(encoding="utf-8")) == expected


@pytest.mark.parametrize(
    "bad_line,message",
    [
        ('{"labels": "a", "predict": ', "invalid JSON"),
        ('["a", "b"]', "expected a JSON object, found list"),
        ('{"labels": "a"}', 'missing key "predict"'),
        ('{"labels": "a", "predict": 3}', '"predict" must be a string, found int'),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, capsys, bad_line, message):
    predictions_file = tmp_path / "generated_predictions.txt"
    predictions_file.write_text('{"labels": "好", "predict": "好"}\n\n' + bad_line + "\n", encoding="utf-8")
    with pytest.raises(PredictionFileError, match=message):
        read_predictions_file(predictions_file)
    assert main([str(predictions_file)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"error: {predictions_file}:3: ")
    assert message in err[0]


def test_empty_file_is_an_error(tmp_path):
    predictions_file = tmp_path / "empty.txt"
    predictions_file.write_text("\n", encoding="utf-8")
    with pytest.raises(PredictionFileError, match="no predictions"):
        read_predictions_file(predictions_file)


@pytest.mark.slow
def test_cli_subprocess_exit_code_without_traceback(tmp_path):
    predictions_file = tmp_path / "generated_predictions.txt"
    predictions_file.write_bytes(b'{"labels": "a", "predict": "a"}\n\xff\xfe\n')
    result = subprocess.run(
        [sys.executable, "-m", "chatglm_ptuning.metrics", str(predictions_file)],
        cwd=REPO,
        capture_output=True,
        check=False,
        text=True,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {predictions_file}:2: not UTF-8 text (invalid start byte at byte 0)"


def test_cli_unwritable_output_is_one_error_line(tmp_path, capsys):
    predictions_file = tmp_path / "generated_predictions.txt"
    write_predictions(predictions_file, [{"labels": "好", "predict": "好"}])
    assert main([str(predictions_file), "--output", str(tmp_path / "missing" / "scores.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "scores.json" in err[0]
