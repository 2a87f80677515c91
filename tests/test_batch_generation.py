"""generate_rows: per-row budgets, finished rows leaving the batch, output equal to batch size 1."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from chatglm_ptuning.batch_generation import can_drop_finished_rows, generate_rows
from chatglm_ptuning.loading import load_model
from chatglm_ptuning.lora import LoraOptions
from chatglm_ptuning.prompt_learning import INPUT_PROMPT_METHODS

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
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT generates with its base model
        self.handle = inner.register_forward_pre_hook(self.record, with_kwargs=True)

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


def _load(folder, method: str):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    options = {"lora_options": LoraOptions(rank=4, alpha=8, dropout=0.0)} if method == "lora" else {"pre_seq_len": 4}
    model, tokenizer = load_model(folder, method=method, device="cpu", dtype=torch.float32, **options)
    if method == "lora":  # a trained adapter's B is not zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.5)
    return model, tokenizer


@pytest.fixture(params=["chatglm2", "chatglm6b"])
def model_with_prefix(request, tiny_glm2_dir, tiny_glm1_dir):
    return _load(tiny_glm2_dir if request.param == "chatglm2" else tiny_glm1_dir, "ptuning_v2")


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
        alone = generate_rows(model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), budgets[i : i + 1], pad,
                              **settings)
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


@pytest.mark.parametrize("family,method", [
    ("chatglm2", "ptuning_v2"), ("chatglm6b", "ptuning_v2"),
    ("chatglm2", "prompt_tuning"), ("chatglm6b", "ptuning"),  # one generate() call per group of 3 rows
    ("chatglm2", "lora"),
])
def test_waiting_rows_take_the_places_of_finished_ones(family, method, tiny_glm2_dir, tiny_glm1_dir):
    model, tokenizer = _load(tiny_glm2_dir if family == "chatglm2" else tiny_glm1_dir, method)
    texts = PROMPTS + ["好", "类型#裤*版型#宽松*风格#街头*图案#字母", "推荐一本书"]
    rows, ids, mask = _prompts(tokenizer, texts)
    budgets = torch.tensor([14, 6, 14, 11, 14, 3, 14, 9])
    settings = {"do_sample": False, "logits_processor": LogitsProcessorList([EndAfterTokenMultipleOf(5, tokenizer.eos_token_id)])}
    counter = RowCounter(model)
    pooled = generate_rows(model, ids, mask, budgets, tokenizer.pad_token_id, max_rows=3, **settings)
    sizes = counter.sizes
    counter.handle.remove()
    pad = tokenizer.pad_token_id
    made = 0
    for i, row in enumerate(rows):
        alone = generate_rows(model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), budgets[i : i + 1], pad,
                              **settings)
        assert pooled[i, : alone.shape[1]].tolist() == alone[0].tolist(), f"row {i} differs from batch size 1"
        assert (pooled[i, alone.shape[1] :] == pad).all()
        made += int((alone[0] != pad).sum())
    assert max(sizes) == 3
    if method in INPUT_PROMPT_METHODS:  # virtual tokens in the cache: groups of 3 rows, each until its last row is done
        assert sizes == sorted(sizes, reverse=True) and set(sizes) == {3, 2} and sum(sizes) > made
    else:  # rows joined the running batch as others finished: one row-forward per token made, no more
        assert sum(sizes) == made and sizes.count(3) > 2


def test_equals_one_generate_call_masked_to_the_budgets(model_with_prefix):
    model, tokenizer = model_with_prefix
    _, ids, mask = _prompts(tokenizer, PROMPTS)
    budgets = torch.tensor([9, 3, 0, 7, 9])
    pad = tokenizer.pad_token_id
    dropped = generate_rows(model, ids, mask, budgets, pad, do_sample=False)
    one_call = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=pad)
    one_call = one_call[:, ids.shape[1] :]
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


def test_settings_that_cannot_run_in_rounds(model_with_prefix):
    model, _ = model_with_prefix
    assert can_drop_finished_rows(model, {"do_sample": True, "top_p": 0.7, "temperature": 0.95, "synced_gpus": False})
    assert not can_drop_finished_rows(model, {"num_beams": 4})
    assert not can_drop_finished_rows(model, {"synced_gpus": True})  # ZeRO-3: every rank must run the same forwards
    assert not can_drop_finished_rows(model, {"min_new_tokens": 5})  # counted from where each call starts
    assert not can_drop_finished_rows(model, {"num_return_sequences": 2})


def test_trainer_predict_refills_the_batch_and_keeps_the_predictions(tmp_path, tiny_glm2_dir):
    """PromptTrainer.predict: eval batch 2, rows finishing at their own EOS; the same predictions with
    and without refilling, never more than 2 rows per forward, and fewer row-forwards with it."""
    from eval_rows import adgen_eval_rows, predicting_trainer

    from chatglm_ptuning.trainer import GENERATION_POOL_BATCHES

    model, tokenizer = _load(tiny_glm2_dir, "ptuning_v2")
    dataset = adgen_eval_rows(tokenizer, 9, 48, 16)
    processors = LogitsProcessorList([EndAfterTokenMultipleOf(4, tokenizer.eos_token_id)])
    results = {}
    for refill in (True, False):
        trainer = predicting_trainer(model, tokenizer, tmp_path / str(refill), 2,
                                     {"do_sample": False, "max_length": 48 + 16, "logits_processor": processors},
                                     drop_finished_rows=refill)
        batches = [len(batch["input_ids"]) for batch in trainer.get_test_dataloader(dataset)]
        assert batches == ([9] if refill and GENERATION_POOL_BATCHES * 2 >= 9 else [2, 2, 2, 2, 1])
        assert trainer.args.per_device_eval_batch_size == 2
        counter = RowCounter(model)
        results[refill] = (trainer.predict(dataset).predictions, counter.sizes)
        counter.handle.remove()
    (refilled, sizes), (one_call, sizes_one_call) = results[True], results[False]
    assert (refilled == one_call).all()
    assert max(sizes) == 2 and sum(sizes) < sum(sizes_one_call)
