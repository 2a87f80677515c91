"""generate_rows: per-row budgets, finished rows leaving the batch, output equal to batch size 1."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from chatglm_ptuning.batch_generation import can_drop_finished_rows, generate_rows
from chatglm_ptuning.loading import load_model

PROMPTS = ["类型#裙*颜色#红色", "你好", "类型#上衣*材质#牛仔布*风格#简约*图案#刺绣", "写一首诗", "今天天气怎么样？请详细回答"]


class EndAfterTokenMultipleOf(LogitsProcessor):
    """Forces EOS after a token whose id is a multiple of `k`: every row stops at its own length,
    decided by its own tokens only, as a trained model's EOS is."""

    def __init__(self, k: int, eos_id: int):
        self.k, self.eos_id = k, eos_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ending = input_ids[:, -1] % self.k == 0
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.eos_id] = 0
        return torch.where(ending[:, None], forced, scores)


class RowCounter:
    """Forward pre-hook recording the batch size of every forward."""

    def __init__(self, model: torch.nn.Module):
        self.sizes: list[int] = []
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs) -> None:  # noqa: ANN001
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.sizes.append(ids.shape[0])


def _prompts(tokenizer, texts):  # noqa: ANN001, ANN202
    rows = [tokenizer(text)["input_ids"] for text in texts]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return rows, ids, mask


@pytest.fixture(params=["chatglm2", "chatglm6b"])
def model_with_prefix(request, tiny_glm2_dir, tiny_glm1_dir):
    folder = tiny_glm2_dir if request.param == "chatglm2" else tiny_glm1_dir
    torch.manual_seed(0)
    model, tokenizer = load_model(folder, pre_seq_len=4, device="cpu", dtype=torch.float32)
    return model, tokenizer


def test_rows_leave_the_batch_and_equal_batch_size_1(model_with_prefix):
    model, tokenizer = model_with_prefix
    rows, ids, mask = _prompts(tokenizer, PROMPTS)
    budgets = torch.tensor([30, 12, 30, 25, 30])
    settings = {"do_sample": False, "logits_processor": LogitsProcessorList([EndAfterTokenMultipleOf(5, tokenizer.eos_token_id)])}
    counter = RowCounter(model)
    batched = generate_rows(model, ids, mask, budgets, tokenizer.pad_token_id, **settings)
    sizes = counter.sizes
    counter.handle.remove()

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    lengths = []
    for i, row in enumerate(rows):
        alone = generate_rows(model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), budgets[i : i + 1], pad, **settings)
        assert batched[i, : alone.shape[1]].tolist() == alone[0].tolist(), f"row {i} differs from batch size 1"
        assert (batched[i, alone.shape[1] :] == pad).all()
        made = alone[0].tolist()
        length = made.index(eos) + 1 if eos in made else len(made)
        assert length <= budgets[i]
        lengths.append(length)
    assert len(set(lengths)) > 2, f"the rows should finish at different steps: {lengths}"
    # one prefill of 5 rows, then decoding steps whose batch shrinks as rows finish
    assert sizes[0] == 5 and sizes == sorted(sizes, reverse=True) and sizes[-1] < 5
    assert sum(sizes) == sum(lengths), "each row costs one row-forward per token it makes, no more"


def test_equals_one_generate_call_masked_to_the_budgets(model_with_prefix):
    model, tokenizer = model_with_prefix
    _, ids, mask = _prompts(tokenizer, PROMPTS)
    budgets = torch.tensor([9, 3, 0, 7, 9])
    pad = tokenizer.pad_token_id
    dropped = generate_rows(model, ids, mask, budgets, pad, do_sample=False)
    one_call = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=pad)[:, ids.shape[1] :]
    expected = one_call.masked_fill(torch.arange(9)[None, :] >= budgets[:, None], pad)
    assert torch.equal(dropped, expected)
    assert (dropped[2] == pad).all()  # a row without budget makes nothing
    # beam search cannot run in rounds: one call, the same masking
    beams = generate_rows(model, ids, mask, budgets, pad, do_sample=False, num_beams=2)
    assert beams.shape == (5, 9) and (beams[1, 3:] == pad).all() and (beams[2] == pad).all()


def test_sampling_rows_stop_at_eos_then_pad(model_with_prefix):
    model, tokenizer = model_with_prefix
    _, ids, mask = _prompts(tokenizer, PROMPTS)
    torch.manual_seed(1)
    processors = LogitsProcessorList([EndAfterTokenMultipleOf(4, tokenizer.eos_token_id)])
    out = generate_rows(model, ids, mask, torch.full((5,), 20), tokenizer.pad_token_id,
                        do_sample=True, top_p=0.7, temperature=0.95, logits_processor=processors)
    for row in out.tolist():
        if tokenizer.eos_token_id in row:
            end = row.index(tokenizer.eos_token_id) + 1
            assert all(t == tokenizer.pad_token_id for t in row[end:])


def test_settings_that_cannot_run_in_rounds():
    assert can_drop_finished_rows({"do_sample": True, "top_p": 0.7, "temperature": 0.95, "synced_gpus": False})
    assert not can_drop_finished_rows({"num_beams": 4})
    assert not can_drop_finished_rows({"synced_gpus": True})  # ZeRO-3: every rank must run the same forwards
    assert not can_drop_finished_rows({"min_new_tokens": 5})  # counted from where each call starts
    assert not can_drop_finished_rows({"num_return_sequences": 2})
