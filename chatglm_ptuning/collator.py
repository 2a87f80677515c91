"""Batching: training rows right-padded to each batch's longest row; eval/predict prompts left-padded
only as far as each batch needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .constants import IGNORE_INDEX

PROMPT_LENGTH_KEY = "prompt_length"  # per-row prompt length, for per-row generation budgets
REAL_TOKENS_KEY = "real_tokens"  # non-pad tokens of a training batch, counted by PromptTrainer


def _round_up(length: int, multiple: int | None) -> int:
    return -(-length // multiple) * multiple if multiple else length


def real_length(ids: list[int], labels: list[int], pad_id: int, label_pad_id: int) -> int:
    """Length of a training row without its right padding: trailing positions whose id is the pad
    id and whose label is the label pad (a row already padded to the fixed layout is cut back)."""
    end = len(ids)
    while end and ids[end - 1] == pad_id and labels[end - 1] == label_pad_id:
        end -= 1
    return end


@dataclass
class TrainBatchCollator:
    """Collates training rows (input_ids + labels, unpadded or in the fixed layout).

    Every row is cut back to its real length (see `real_length`) and right-padded to the batch's
    longest row, rounded up to `pad_to_multiple_of`: ids with `pad_id`, labels with `label_pad_id`.
    No attention mask or position ids are produced: both families build them from input_ids, and
    right padding after the answer is causal context no real token sees, so the fixed layout's
    losses are reproduced. `REAL_TOKENS_KEY` holds the batch's non-pad token count, which
    PromptTrainer removes before the forward. With `fixed_layout` the rows (preprocessed with
    `--pad_to_max_length`) keep their full length: the reference's layout.
    """

    pad_id: int
    label_pad_id: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None
    fixed_layout: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [(list(f["input_ids"]), list(f["labels"])) for f in features]
        lengths = [real_length(ids, labels, self.pad_id, self.label_pad_id) for ids, labels in rows]
        longest = max(len(ids) for ids, _ in rows) if self.fixed_layout else max(lengths)
        width = _round_up(longest, self.pad_to_multiple_of)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), self.label_pad_id, dtype=torch.long)
        for row, ((ids, row_labels), length) in enumerate(zip(rows, lengths)):
            input_ids[row, :length] = torch.tensor(ids[:length])
            labels[row, :length] = torch.tensor(row_labels[:length])
        return {"input_ids": input_ids, "labels": labels, REAL_TOKENS_KEY: torch.tensor(sum(lengths))}


@dataclass
class PromptBatchCollator:
    """Collates eval/predict rows (unpadded prompt ids + reference labels).

    The prompts are left-padded by the tokenizer, which also builds each family's attention
    mask and position ids from the unpadded ids; labels are right-padded with `label_pad_id`.
    Adds `prompt_length` [b] so generation can give every row the budget it would have alone.
    """

    tokenizer: Any
    label_pad_id: int = IGNORE_INDEX

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [{"input_ids": list(f["input_ids"])} for f in features]
        batch = dict(self.tokenizer.pad(prompts, padding=True, return_tensors="pt"))
        batch[PROMPT_LENGTH_KEY] = torch.tensor([len(p["input_ids"]) for p in prompts])
        if "labels" in features[0]:
            longest = max(len(f["labels"]) for f in features)
            batch["labels"] = torch.tensor(
                [list(f["labels"]) + [self.label_pad_id] * (longest - len(f["labels"])) for f in features]
            )
        return batch
