"""Batching for generation: left-pad each batch's prompts only as far as that batch needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

PROMPT_LENGTH_KEY = "prompt_length"  # per-row prompt length, for per-row generation budgets


@dataclass
class PromptBatchCollator:
    """Collates eval/predict rows (unpadded prompt ids + reference labels).

    The prompts are left-padded by the tokenizer, which also builds each family's attention
    mask and position ids from the unpadded ids; labels are right-padded with `label_pad_id`.
    Adds `prompt_length` [b] so generation can give every row the budget it would have alone.
    """

    tokenizer: Any
    label_pad_id: int = -100

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
