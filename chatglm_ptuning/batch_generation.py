"""Batched generation in which each row has its own budget and finished rows leave the batch.

transformers' `generate()` runs a batch until its last row is done: a row that has produced EOS
(or, in evaluation, used up its own budget of new tokens) is fed pad tokens and still costs a full
row of work at every later step. `generate_rows` instead calls `generate()` in rounds on one cache:
a round ends at the step where any row finishes; that row's tokens are kept, and it is removed from
the token ids, the attention mask and the cache (`DynamicCache.batch_select_indices`) before the
others continue. A continuing row sees the computation it would see in one call (its cache and
positions carry on), so greedy output is the same as one `generate()` call and as batch size 1.

Rounds need every per-step setting of generate() to depend only on the tokens so far (not on
where a call started); settings outside `ROUND_SAFE_SETTINGS`, beam search, several sequences
per row, and ZeRO-3's synced generation (every rank must run the same number of forwards) fall
back to one `generate()` call whose tokens beyond each row's budget are replaced by pad.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

# generate() keyword arguments whose effect at a step depends only on the tokens so far
ROUND_SAFE_SETTINGS = frozenset({
    "do_sample", "temperature", "top_p", "top_k", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff",
    "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "min_length", "logits_processor",
    "eos_token_id", "pad_token_id", "use_cache", "num_beams", "num_return_sequences", "synced_gpus",
})


def can_drop_finished_rows(settings: dict[str, Any]) -> bool:
    """Whether `generate_rows` may run these generate() settings in rounds."""
    return (
        set(settings) <= ROUND_SAFE_SETTINGS
        and (settings.get("num_beams") or 1) == 1
        and (settings.get("num_return_sequences") or 1) == 1
        and not settings.get("synced_gpus")
        and settings.get("use_cache", True) is not False
    )


class _EndRoundWhenARowFinishes(StoppingCriteria):
    """Stops the whole generate() call at the step where any row reaches its budget or emits EOS."""

    def __init__(self, prompt_width: int, budgets: torch.Tensor, eos_ids: torch.Tensor):
        self.prompt_width = prompt_width
        self.budgets = budgets
        self.eos_ids = eos_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        finished = _finished(input_ids, self.prompt_width, self.budgets, self.eos_ids)
        return finished.any().expand(input_ids.shape[0]).clone()


def _finished(sequences: torch.Tensor, prompt_width: int, budgets: torch.Tensor, eos_ids: torch.Tensor) -> torch.Tensor:
    made = sequences.shape[1] - prompt_width
    return (made >= budgets) | torch.isin(sequences[:, prompt_width:], eos_ids).any(dim=-1)


def _eos_ids(model: torch.nn.Module, settings: dict[str, Any], device: torch.device) -> torch.Tensor:
    eos = settings.get("eos_token_id", model.generation_config.eos_token_id)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return torch.tensor(eos, dtype=torch.long, device=device)


def generate_rows(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    budgets: torch.Tensor,
    pad_token_id: int,
    drop_finished: bool = True,
    **settings: Any,
) -> torch.Tensor:
    """New tokens for each left-padded prompt row: [b, m], m the most any row made.

    input_ids, attention_mask [b, n]; budgets [b]: the most new tokens each row may make. A row
    stops at its budget or after EOS; its later positions hold `pad_token_id`. `settings` are
    generate() keyword arguments (not max_length / max_new_tokens: the budgets replace them).
    `drop_finished=False` runs one call, as transformers does (same tokens, more work).
    """
    device = input_ids.device
    budgets = budgets.to(device).clamp(min=0)
    if not (drop_finished and can_drop_finished_rows(settings)):
        return _generate_in_one_call(model, input_ids, attention_mask, budgets, **{**settings, "pad_token_id": pad_token_id})
    settings = {k: v for k, v in settings.items() if k != "pad_token_id"}
    prompt_width = input_ids.shape[1]
    new_tokens = input_ids.new_full((input_ids.shape[0], int(budgets.max())), pad_token_id)
    eos_ids = _eos_ids(model, settings, device)
    rows = (budgets > 0).nonzero().flatten()  # the rows still generating, as indices into the batch
    ids, mask, cache = input_ids[rows], attention_mask[rows], None
    while rows.numel():
        row_budgets = budgets[rows]
        output = model.generate(
            input_ids=ids,
            attention_mask=mask,
            cache=cache,
            max_new_tokens=int((row_budgets - (ids.shape[1] - prompt_width)).max()),
            stopping_criteria=StoppingCriteriaList([_EndRoundWhenARowFinishes(prompt_width, row_budgets, eos_ids)]),
            return_dict_in_generate=True,
            pad_token_id=pad_token_id,
            **settings,
        )
        ids, cache = output.sequences, output.past_key_values
        mask = torch.cat((mask, mask.new_ones(mask.shape[0], ids.shape[1] - mask.shape[1])), dim=1)
        finished = _finished(ids, prompt_width, row_budgets, eos_ids)
        if not finished.any():
            raise RuntimeError("generate() ended a round before any row finished; its stopping settings conflict with the row budgets")
        new_tokens[rows[finished], : ids.shape[1] - prompt_width] = ids[finished, prompt_width:]
        keep = (~finished).nonzero().flatten()
        rows, ids, mask = rows[keep], ids[keep], mask[keep]
        if rows.numel():
            cache.batch_select_indices(keep)
    return new_tokens


def _generate_in_one_call(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, budgets: torch.Tensor, **settings: Any
) -> torch.Tensor:
    """Every row runs until the batch is done; tokens beyond a row's budget become pad. At least
    one step runs, so that under ZeRO-3 every rank joins the same forwards."""
    generated = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max(int(budgets.max()), 1), **settings
    )[:, input_ids.shape[1] :]
    beyond = torch.arange(generated.shape[1], device=generated.device)[None, :] >= budgets[:, None]
    return generated.masked_fill(beyond, settings["pad_token_id"])[:, : int(budgets.max())]
