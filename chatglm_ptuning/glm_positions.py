"""ChatGLM-6B's "2D" positions and block attention mask, derived from token ids.

One implementation for both users: the model derives them for each forward (the original's
`ChatGLMModel.get_position_ids` / `get_masks` in modeling_chatglm.py) and the ChatGLM-6B tokenizer
pads them into its batches (the original's `ChatGLMTokenizer._pad` in tokenization_chatglm.py).
The two originals differ in one detail, kept here: when a row holds both [MASK] and [gMASK], the
model takes the [gMASK] position and the tokenizer the [MASK] one (`mask_before_gmask`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .configuration import ChatGLM6BConfig


@dataclass(frozen=True)
class GLMMarks:
    """The ChatGLM6BConfig fields positions are derived from, for a caller without a config (the tokenizer)."""

    bos_token_id: int  # <sop>: the context ends before it
    mask_token_id: int  # [MASK]
    gmask_token_id: int  # [gMASK]
    position_encoding_2d: bool = True


def _first_index(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """Index of the first `token_id` in each row of [b, s] ids; s where the row has none. Returns [b]."""
    return (input_ids != token_id).long().cumprod(dim=-1).sum(dim=-1)  # leading non-matches


def glm_position_ids(
    input_ids: torch.Tensor,
    config: ChatGLM6BConfig | GLMMarks,
    padding_mask: torch.Tensor | None = None,
    mask_before_gmask: bool = False,
) -> torch.Tensor:
    """Positions derived from token ids [b, s]: [b, 2, s] (2D encoding) or [b, s].

    Per row, let r be a token's index among the row's real tokens (padding_mask 1; every token
    without a mask) and m the r of the first [gMASK], else of the first [MASK] (the other way round
    with `mask_before_gmask`). The context is everything before the first <sop> (bos), the whole
    row when there is none.
    - 2D: row 0 is r for the context and m from <sop> on (r when the row has no mask token);
      row 1 (block positions) is 0 for the context, then 1, 2, 3, ... from <sop> on.
    - 1D: r, except that tokens from <sop> on take m when that mask token is [MASK].
    Pads get 0 in every row, as the tokenizer's left padding does.
    """
    batch, seq = input_ids.shape
    if seq == 0:
        return input_ids.new_zeros((batch, 2, 0) if config.position_encoding_2d else (batch, 0))
    real = torch.ones_like(input_ids, dtype=torch.bool) if padding_mask is None else padding_mask.bool()
    if real.shape != input_ids.shape:
        raise ValueError(f"padding mask shape {tuple(real.shape)} does not match input_ids {tuple(input_ids.shape)}")
    rank = real.long().cumsum(dim=-1) - 1  # [b, s] index among real tokens (-1 on leading pads)
    sop = _first_index(input_ids, config.bos_token_id)  # [b]
    from_sop = torch.arange(seq, device=input_ids.device)[None, :] >= sop[:, None]  # [b, s]
    marks = (config.gmask_token_id, config.mask_token_id)
    preferred, other = marks[::-1] if mask_before_gmask else marks
    mask_at = _first_index(input_ids, preferred)
    mask_at = torch.where(mask_at < seq, mask_at, _first_index(input_ids, other))  # [b]
    has_mask = mask_at < seq

    def rank_at(index: torch.Tensor) -> torch.Tensor:  # [b] -> [b, 1]
        return rank.gather(1, index.clamp(max=seq - 1)[:, None])

    if config.position_encoding_2d:
        positions = torch.where(from_sop & has_mask[:, None], rank_at(mask_at), rank)
        block_positions = torch.where(from_sop, rank - rank_at(sop) + 1, 0)
        positions = torch.stack((positions, block_positions), dim=1)  # [b, 2, s]
        return positions.masked_fill(~real[:, None, :], 0)
    mask_token = input_ids.gather(1, mask_at.clamp(max=seq - 1)[:, None])[:, 0]  # [b]
    uses_mask = has_mask & (mask_token == config.mask_token_id)
    positions = torch.where(from_sop & uses_mask[:, None], rank_at(mask_at), rank)
    return positions.masked_fill(~real, 0)


def glm_attention_mask(
    input_ids: torch.Tensor,
    bos_token_id: int,
    padding_mask: torch.Tensor | None = None,
    past_length: int = 0,
) -> torch.Tensor:
    """Block mask for the tokens of `input_ids` [b, s] after `past_length` cached ones.

    Returns bool [b, 1, s, past_length + s], True = blocked. Query i may see key k when k is a real
    token (padding_mask [b, past_length + s], 1 = keep) and either k <= i or k lies before the row's
    first <sop>: the context is bidirectional, what follows is causal. Without a <sop> the whole
    first forward is context; a forward that continues a cache without one is a decoding step and
    is purely causal.
    """
    batch, seq = input_ids.shape
    total = past_length + seq
    device = input_ids.device
    sop = _first_index(input_ids, bos_token_id)
    if past_length:
        sop = torch.where(sop < seq, sop + past_length, 0)
    keys = torch.arange(total, device=device)
    queries = torch.arange(past_length, total, device=device)
    visible = (keys[None, None, :] <= queries[None, :, None]) | (keys[None, None, :] < sop[:, None, None])
    if padding_mask is not None:
        if padding_mask.shape != (batch, total):
            raise ValueError(
                f"2D attention_mask must cover cached and new tokens: expected shape {(batch, total)}, "
                f"found {tuple(padding_mask.shape)}"
            )
        visible = visible & padding_mask.bool()[:, None, :]
    return ~visible[:, None]


def padding_mask_from_block_mask(block_mask: torch.Tensor) -> torch.Tensor:
    """[b, s] keep-mask (1 real, 0 pad) from a left-padded tokenizer mask [b, 1, s, s] (True = blocked).

    The last row belongs to a real token that sees every real token (context columns are open to all
    rows, the rest are causal up to it), so its open columns are exactly the real tokens.
    """
    return (~block_mask.bool()[:, 0, -1, :]).long()


def next_position_ids(position_ids: torch.Tensor, num_new_tokens: int = 1) -> torch.Tensor:
    """Append positions for `num_new_tokens` generated tokens to [b, 2, s] or [b, s] positions.

    2D: row 0 repeats its last value (every generated token sits at the mask position), block
    positions count on. 1D: a row whose last position repeats an earlier one uses [MASK] and keeps
    repeating it; otherwise positions count on. Both match what `glm_position_ids` derives for the
    longer sequence.
    """
    steps = torch.arange(1, num_new_tokens + 1, dtype=position_ids.dtype, device=position_ids.device)
    last = position_ids[..., -1:]
    if position_ids.dim() == 3:
        new = torch.cat((last[:, :1].expand(-1, -1, num_new_tokens), last[:, 1:] + steps), dim=1)
    elif position_ids.shape[-1] > 1:
        counting = last > position_ids[..., :-1].amax(dim=-1, keepdim=True)  # [b, 1]
        new = last + steps * counting
    else:
        new = last + steps
    return torch.cat((position_ids, new), dim=-1)
