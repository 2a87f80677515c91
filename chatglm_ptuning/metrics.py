"""ROUGE-1/2/L and BLEU-4 exactly as the reference ptuning recipe computes them.

Per (prediction, label) pair, on the decoded strings:

- ROUGE: both strings are segmented with ``jieba.cut``, the words joined with single spaces
  and scored by ``rouge_chinese.Rouge().get_scores``; each F-measure is kept as
  ``round(f * 100, 4)``.
- BLEU-4: ``nltk`` ``sentence_bleu([list(label)], list(pred))`` on **characters**, default
  weights (0.25 each), ``SmoothingFunction().method3``; kept as ``round(bleu * 100, 4)``.

The result is the plain mean of each list, ``float(np.mean(...))``.

ChatGLM3 tool steps (a label that is a function call, ``name`` + newline + the fenced
``tool_call(...)``): beside ROUGE/BLEU over all pairs, ``tool-steps``, ``tool-name-acc`` and
``tool-call-acc`` (see ``tool_call_scores``).

One deliberate difference: rouge_chinese raises ``ValueError("Hypothesis is empty.")`` (or
"Reference is empty.") when either text has no non-whitespace character, which crashes the
reference run. Here such a pair scores 0 for the three ROUGE values. BLEU already returns 0
for it in nltk (no unigram match), so BLEU is computed the same way as the reference.

Determinism: ``jieba.cut`` (default dictionary, HMM on) is a pure function of its input, so
scores do not depend on the order or the process in which pairs are scored. A user
dictionary loaded into the parent process is not guaranteed to reach worker processes
(spawn/forkserver start them afresh): use ``workers=1`` with custom jieba dictionaries.

CLI: ``python -m chatglm_ptuning.metrics generated_predictions.txt [--output scores.json]
[--workers N]`` scores the reference output format (one JSON object per line with string
keys ``labels`` and ``predict``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import jieba
import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from .constants import IGNORE_INDEX
from .tools import parse_call_text

# jieba logs "Building prefix dict ..." at DEBUG on its first use; keep runs quiet.
jieba.setLogLevel(logging.WARNING)

METRIC_KEYS: tuple[str, ...] = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
_ROUGE_KEYS = METRIC_KEYS[:3]
# Below this many pairs a process pool costs more than it saves (scoring takes ~2-8 ms per pair).
_MIN_PAIRS_FOR_POOL = 500
_CHUNKS_PER_WORKER = 4

Scores = tuple[float, float, float, float]


def score_pair(prediction: str, label: str) -> Scores:
    """Scores one pair: (rouge-1, rouge-2, rouge-l, bleu-4), each x100 and rounded to 4 places."""
    hypothesis = " ".join(jieba.cut(prediction))
    reference = " ".join(jieba.cut(label))
    # rouge_chinese raises exactly when a side has no non-whitespace character.
    if hypothesis.strip() and reference.strip():
        rouge = Rouge().get_scores(hypothesis, reference)[0]
        rouge_f = [round(rouge[key]["f"] * 100, 4) for key in _ROUGE_KEYS]
    else:
        rouge_f = [0.0, 0.0, 0.0]
    bleu = sentence_bleu([list(label)], list(prediction), smoothing_function=SmoothingFunction().method3)
    return rouge_f[0], rouge_f[1], rouge_f[2], float(round(bleu * 100, 4))


def _score_chunk(pairs: list[tuple[str, str]]) -> list[Scores]:
    return [score_pair(prediction, label) for prediction, label in pairs]


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _score_all(pairs: list[tuple[str, str]], workers: int | None) -> list[Scores]:
    if workers is None:
        workers = _available_cores() if len(pairs) >= _MIN_PAIRS_FOR_POOL else 1
    workers = max(1, min(workers, len(pairs)))
    if workers == 1:
        return _score_chunk(pairs)
    chunk_size = math.ceil(len(pairs) / (workers * _CHUNKS_PER_WORKER))
    chunks = [pairs[i : i + chunk_size] for i in range(0, len(pairs), chunk_size)]
    jieba.initialize()  # load the dictionary once here, so forked workers inherit it
    with ProcessPoolExecutor(max_workers=workers) as pool:
        # map() yields results in submission order, so the per-pair list matches a serial run.
        return [scores for chunk in pool.map(_score_chunk, chunks) for scores in chunk]


def compute_metrics(predictions: Sequence[str], labels: Sequence[str], workers: int | None = None) -> dict[str, float]:
    """Mean ROUGE-1/2/L F and BLEU-4 (all x100) over aligned predictions and labels.

    Args:
        predictions: decoded model outputs.
        labels: decoded references, same length as ``predictions``.
        workers: processes to score with; ``None`` picks serial for small inputs and every
            available core from 500 pairs on; ``1`` forces serial. Results are identical
            either way.

    Returns:
        ``{"rouge-1": float, "rouge-2": float, "rouge-l": float, "bleu-4": float}``, plus
        ``tool_call_scores`` when some labels are ChatGLM3 function calls.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"compute_metrics: got {len(predictions)} predictions but {len(labels)} labels")
    if not predictions:
        raise ValueError("compute_metrics: no predictions to score")
    pairs = [(str(p), str(l)) for p, l in zip(predictions, labels)]
    columns = zip(*_score_all(pairs, workers))
    scores = {key: float(np.mean(values)) for key, values in zip(METRIC_KEYS, columns)}
    return {**scores, **tool_call_scores([p for p, _ in pairs], [l for _, l in pairs])}


def _json_value(value: Any) -> Any:
    """`value` as JSON reads it back; ValueError/TypeError for what JSON cannot hold (sets, bytes, NaN)."""
    return json.loads(json.dumps(value, allow_nan=False))


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values: numbers by value (2 == 2.0), but true is not 1, and key order is free."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same_json, a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def tool_call_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """For the pairs whose label is a ChatGLM3 function call (`name\n```python\ntool_call(...)\n````):
    `tool-steps` (how many), `tool-name-acc` (share whose prediction calls the same tool) and
    `tool-call-acc` (same tool and the same arguments, compared as JSON values), both x100 rounded to
    4 places. Calls are read with `ast`, never evaluated. Empty when no label is a call."""
    steps = names = calls = 0
    for prediction, label in zip(predictions, labels):
        expected = parse_call_text(label)
        if expected is None:
            continue
        steps += 1
        predicted = parse_call_text(prediction)
        if predicted is None or predicted[0] != expected[0]:
            continue
        names += 1
        try:
            calls += _same_json(_json_value(predicted[1]), _json_value(expected[1]))
        except (TypeError, ValueError):  # arguments JSON cannot hold: not the expected call
            pass
    if not steps:
        return {}
    return {
        "tool-steps": float(steps),
        "tool-name-acc": round(100 * names / steps, 4),
        "tool-call-acc": round(100 * calls / steps, 4),
    }


def build_trainer_metrics(tokenizer: Any, ignore_pad_token_for_loss: bool = True) -> Callable[[Any], dict[str, float]]:
    """Returns a ``compute_metrics(eval_preds)`` for a transformers (Seq2Seq)Trainer.

    ``eval_preds`` is an ``EvalPrediction`` or a ``(predictions, label_ids)`` pair of int
    arrays ``[n, len]`` (generated ids when ``predict_with_generate``). As in the reference,
    both sides are decoded with ``skip_special_tokens=True`` after replacing IGNORE_INDEX (-100,
    the loss ignore index) with the pad id in the labels; IGNORE_INDEX in the predictions (the Trainer pads
    batches of unequal length with it) is replaced too, where the reference would fail.
    """
    pad_id = tokenizer.pad_token_id

    def trainer_metrics(eval_preds: Any) -> dict[str, float]:
        predictions, label_ids = eval_preds[0], eval_preds[1]
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        predictions = np.where(np.asarray(predictions) != IGNORE_INDEX, predictions, pad_id)
        label_ids = np.asarray(label_ids)
        if ignore_pad_token_for_loss:
            label_ids = np.where(label_ids != IGNORE_INDEX, label_ids, pad_id)
        decoded_predictions = tokenizer.batch_decode(predictions.tolist(), skip_special_tokens=True)
        decoded_labels = tokenizer.batch_decode(label_ids.tolist(), skip_special_tokens=True)
        return compute_metrics(decoded_predictions, decoded_labels)

    return trainer_metrics


class PredictionFileError(ValueError):
    """A generated_predictions.txt line that is not a JSON object with string labels/predict."""


def read_predictions_file(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Reads the reference ``generated_predictions.txt``: returns (predictions, labels).

    Blank lines are skipped. Raises PredictionFileError naming the file and line number.
    """
    predictions: list[str] = []
    labels: list[str] = []
    with open(path, "rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise PredictionFileError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise PredictionFileError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise PredictionFileError(f"{where}: expected a JSON object, found {type(record).__name__}")
            for key in ("labels", "predict"):
                if key not in record:
                    raise PredictionFileError(f'{where}: missing key "{key}" (expected keys "labels" and "predict")')
                if not isinstance(record[key], str):
                    raise PredictionFileError(f'{where}: "{key}" must be a string, found {type(record[key]).__name__}')
            predictions.append(record["predict"])
            labels.append(record["labels"])
    if not predictions:
        raise PredictionFileError(f"{path}: no predictions found (the file is empty)")
    return predictions, labels


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chatglm_ptuning.metrics",
        description="Score a generated_predictions.txt (one JSON object per line with 'labels' and 'predict') "
        "with ROUGE-1/2/L and BLEU-4 as the reference recipe does.",
    )
    parser.add_argument("predictions_file", help="path to generated_predictions.txt")
    parser.add_argument("--output", help="also write the scores to this JSON file")
    parser.add_argument("--workers", type=int, default=None, help="processes to use (default: automatic; 1 = serial)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        predictions, labels = read_predictions_file(args.predictions_file)
        text = json.dumps(compute_metrics(predictions, labels, workers=args.workers), indent=2)
        if args.output:
            Path(args.output).write_text(text + "\n", encoding="utf-8")
    except (PredictionFileError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
