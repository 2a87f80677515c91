"""Batched generation in which each row has its own budget and finished rows make room for others.

transformers' `generate()`, which the reference recipe runs once per evaluation batch (ChatGLM2-6B
ptuning/main.py through Seq2SeqTrainer.prediction_step), runs a batch until its last row is done: a
row that has produced EOS (or, in evaluation, used up its own budget of new tokens) is fed pad
tokens and still costs a full row of work at every later step, and the batch holds fewer useful rows
as it goes. `generate_rows` calls `generate()` in rounds on one cache: a round ends at the step
where any row finishes; that row's tokens are kept and it leaves the batch (token ids, attention
mask and cache rows), and the next waiting rows take its place: their prompts run through the model
ahead, as many rows per forward as the batch holds (which also makes their first token), and when a
place frees, a ready row's cache rows are left-padded to the batch's width and appended. Leading
columns that are padding in every row are cut off. A row's positions come from its padding mask, so
it sees the computation it would see alone: greedy output is the same as batch size 1 (and as one
`generate()` call per batch).

Rounds need every per-step setting of generate() to depend only on the tokens so far (not on where a
call started); settings outside `ROUND_SAFE_SETTINGS`, beam search, several sequences per row,
virtual input tokens (see `can_drop_finished_rows`) and ZeRO-3's synced generation (every rank must
run the same number of forwards) fall back to one `generate()` call per group of rows, whose tokens
beyond each row's budget are replaced by pad. Rows join and leave a `DynamicCache` by editing its
layers' key/value tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import Cache, DynamicLayer

from .prompt_learning import INPUT_PROMPT_METHODS

# generate() keyword arguments whose effect at a step depends only on the tokens so far
ROUND_SAFE_SETTINGS = frozenset({
    "do_sample", "temperature", "top_p", "top_k", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff",
    "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "min_length", "logits_processor",
    "eos_token_id", "pad_token_id", "use_cache", "num_beams", "num_return_sequences", "synced_gpus",
})


def can_drop_finished_rows(model: torch.nn.Module, settings: dict[str, Any]) -> bool:
    """Whether `generate_rows` may run `model` with these generate() settings in rounds. Not with
    virtual input tokens (Prompt Tuning, P-tuning): they sit in the cache, whose length then is not
    the rows' length, from which generate() decides what a continuing call still has to run."""
    return (
        not (model.config.pre_seq_len and model.config.prompt_method in INPUT_PROMPT_METHODS)
        and set(settings) <= ROUND_SAFE_SETTINGS
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


@dataclass
class _Generating:
    """Rows generating together: left-padded tokens so far, their padding mask, the cache of every
    column but the last (None before the first step) and the new tokens each row has made."""

    rows: torch.Tensor  # [a] indices into the caller's batch
    ids: torch.Tensor  # [a, w]
    mask: torch.Tensor  # [a, w], 1 = token
    made: torch.Tensor  # [a]
    cache: Cache | None = None

    def select(self, keep: torch.Tensor) -> _Generating:
        if self.cache is not None:
            self.cache.batch_select_indices(keep)
        return _Generating(self.rows[keep], self.ids[keep], self.mask[keep], self.made[keep], self.cache)


def generate_rows(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    budgets: torch.Tensor,
    pad_token_id: int,
    drop_finished: bool = True,
    max_rows: int | None = None,
    **settings: Any,
) -> torch.Tensor:
    """New tokens for each left-padded prompt row: [b, m], m the largest budget.

    input_ids, attention_mask [b, n]; budgets [b]: the most new tokens each row may make. A row
    stops at its budget or after EOS; its later positions hold `pad_token_id`. At most `max_rows`
    rows (default: all) generate at once; when one finishes, the next waiting row (in the given
    order) takes its place. `settings` are generate() keyword arguments (not max_length /
    max_new_tokens: the budgets replace them). `drop_finished=False` runs each group of `max_rows`
    rows in one call, as transformers does (same tokens, more work).
    """
    device = input_ids.device
    budgets = budgets.to(device).clamp(min=0)
    max_rows = max_rows or input_ids.shape[0]
    new_tokens = input_ids.new_full((input_ids.shape[0], int(budgets.max())), pad_token_id)
    if not (drop_finished and can_drop_finished_rows(model, settings)):
        settings = {**settings, "pad_token_id": pad_token_id}
        for group in torch.arange(input_ids.shape[0], device=device).split(max_rows):
            ids, mask = _without_common_padding(input_ids[group], attention_mask[group])
            made = _generate_in_one_call(model, ids, mask, budgets[group], **settings)
            new_tokens[group, : made.shape[1]] = made
        return new_tokens
    settings = {k: v for k, v in settings.items() if k != "pad_token_id"}
    run = _Round(model, pad_token_id, _eos_ids(model, settings, device), budgets, settings)
    waiting = (budgets > 0).nonzero().flatten()
    generating: _Generating | None = None  # the rows of the running batch
    ready: _Generating | None = None  # rows whose prompt has run, waiting for a place
    while waiting.numel() or generating is not None or ready is not None:
        room = max_rows - _count(generating)
        if room and ready is None and waiting.numel():
            # prompts run max_rows at a time (a forward costs nearly as much for one row as for several);
            # the rows done at their first token are finished here, the others wait for places
            prompts = _starting(waiting[:max_rows], input_ids, attention_mask)
            ready = run.finish_rows(run(prompts, max_steps=1), new_tokens)
            waiting = waiting[max_rows:]
        elif room and ready is not None:
            generating, ready = run.merge(generating, ready, min(room, _count(ready)))
        else:
            generating = run.finish_rows(run(generating), new_tokens)
    return new_tokens


class _Round:
    """One generate() call on rows generating together, ended at the step where a row finishes."""

    def __init__(self, model: torch.nn.Module, pad_id: int, eos_ids: torch.Tensor, budgets: torch.Tensor, settings: dict):
        self.model, self.pad_id, self.eos_ids, self.budgets, self.settings = model, pad_id, eos_ids, budgets, settings

    def __call__(self, rows: _Generating, max_steps: int | None = None) -> _Generating:
        left = self.budgets[rows.rows] - rows.made
        width = rows.ids.shape[1]
        output = self.model.generate(
            input_ids=rows.ids,
            attention_mask=rows.mask,
            cache=rows.cache,
            max_new_tokens=int(left.max()) if max_steps is None else max_steps,
            stopping_criteria=StoppingCriteriaList([_EndRoundWhenARowFinishes(width, left, self.eos_ids)]),
            return_dict_in_generate=True,
            pad_token_id=self.pad_id,
            **self.settings,
        )
        steps = output.sequences.shape[1] - width
        mask = torch.cat((rows.mask, rows.mask.new_ones(rows.mask.shape[0], steps)), dim=1)
        return _Generating(rows.rows, output.sequences, mask, rows.made + steps, output.cache)

    def finish_rows(self, rows: _Generating, new_tokens: torch.Tensor) -> _Generating | None:
        """Copies the tokens of rows that are done into `new_tokens`; returns the others (None if none)."""
        done = (rows.made >= self.budgets[rows.rows]) | torch.isin(rows.ids[:, -1], self.eos_ids)
        for i in done.nonzero().flatten().tolist():
            made = int(rows.made[i])
            new_tokens[rows.rows[i], :made] = rows.ids[i, rows.ids.shape[1] - made :]
        if done.all():
            return None
        return self._trimmed(rows.select((~done).nonzero().flatten()))

    def merge(self, rows: _Generating | None, ready: _Generating, count: int) -> tuple[_Generating, _Generating | None]:
        """The running rows and the first `count` ready rows as one batch (the narrower left-padded: ids,
        mask and cache), and the ready rows left (None if none)."""
        if rows is None:  # every place is free
            assert count == _count(ready)
            return ready, None
        width = max(rows.ids.shape[1], ready.ids.shape[1])
        rows, ready = self._widened(rows, width), self._widened(ready, width)
        for layer, other in zip(rows.cache.layers, ready.cache.layers, strict=True):
            _check_layer(layer)
            layer.keys = torch.cat((layer.keys, other.keys[:count]))
            layer.values = torch.cat((layer.values, other.values[:count]))
        joined = _Generating(*(torch.cat((mine, theirs[:count])) for mine, theirs in (
            (rows.rows, ready.rows), (rows.ids, ready.ids), (rows.mask, ready.mask), (rows.made, ready.made)
        )), rows.cache)
        rest = ready.select(torch.arange(count, _count(ready), device=ready.rows.device)) if count < _count(ready) else None
        return self._trimmed(joined), rest

    def _widened(self, rows: _Generating, width: int) -> _Generating:
        extra = width - rows.ids.shape[1]
        if not extra:
            return rows
        for layer in rows.cache.layers:
            _check_layer(layer)
            layer.keys, layer.values = (_left_padded(t, extra) for t in (layer.keys, layer.values))
        ids = torch.cat((rows.ids.new_full((rows.ids.shape[0], extra), self.pad_id), rows.ids), dim=1)
        mask = torch.cat((rows.mask.new_zeros(rows.mask.shape[0], extra), rows.mask), dim=1)
        return _Generating(rows.rows, ids, mask, rows.made, rows.cache)

    def _trimmed(self, rows: _Generating) -> _Generating:
        """Without the leading columns that are padding in every row (they cost attention work)."""
        unused = _common_padding(rows.mask)
        if not unused:
            return rows
        for layer in rows.cache.layers:
            _check_layer(layer)
            layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
        return _Generating(rows.rows, rows.ids[:, unused:], rows.mask[:, unused:], rows.made, rows.cache)


def _left_padded(states: torch.Tensor, columns: int) -> torch.Tensor:
    """Cached keys or values [b, heads, seq, D] with `columns` zero columns in front (masked as padding)."""
    return torch.cat((states.new_zeros(*states.shape[:2], columns, states.shape[3]), states), dim=2)


def _count(rows: _Generating | None) -> int:
    return 0 if rows is None else rows.rows.numel()


def _check_layer(layer: Any) -> None:
    if type(layer) is not DynamicLayer:
        raise TypeError(f"rows can join or leave only a DynamicCache of DynamicLayer layers, found {type(layer).__name__}")


def _starting(rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Generating:
    ids, mask = _without_common_padding(input_ids[rows], attention_mask[rows])
    return _Generating(rows, ids, mask, torch.zeros_like(rows))


def _common_padding(mask: torch.Tensor) -> int:
    """How many leading columns of left-padded rows are padding in every row."""
    return int((mask.cumsum(dim=1) == 0).all(dim=0).sum())


def _without_common_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    unused = _common_padding(mask)
    return ids[:, unused:], mask[:, unused:]


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
