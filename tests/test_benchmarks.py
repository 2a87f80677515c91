"""The benchmark scripts run and emit their tables and JSON (quick modes; no timing is asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the benchmarks are the `scripts` package; their child processes import it too

from scripts import bench, bench_eval
from scripts.bench_common import OURS, OURS_NO_PREFIX, VARIANTS
from scripts.bench_generate import merge_generate_rounds
from scripts.bench_train import count_matmul_flops, merge_train_rounds


def test_flop_count_includes_cpu_attention_and_linears():
    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))
    attention = count_matmul_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward())
    assert attention == 3 * (2 * 1 * 2 * 8 * 8 * (4 + 4))  # forward QK^T + PV, backward twice that
    linear = torch.nn.Linear(16, 32)
    assert count_matmul_flops(lambda: linear(torch.randn(5, 16))) == 2 * 5 * 16 * 32


def test_rounds_merge_to_fastest_times_and_largest_memory():
    runs = [
        {"step_s": s, "step_s_min": s, "tokens_per_step": 100, "matmul_gflop_per_step": 10.0, "peak_rss_mib": m,
         "peak_growth_mib": m - 1, "first_loss": 1.0}
        for s, m in ((2.0, 50.0), (4.0, 70.0), (3.0, 60.0))
    ]
    row = merge_train_rounds(runs)
    assert (row["step_s"], row["step_s_min"], row["tokens_per_s"], row["matmul_gflops"]) == (2.0, 2.0, 50.0, 5.0)
    assert (row["peak_rss_mib"], row["peak_growth_mib"], row["rounds"]) == (70.0, 69.0, 3)

    runs = [{"ttft_ms": t, "generate_s": g, "batch": 2, "new_tokens": 5, "generate_matches_forward": ok,
             "peak_rss_mib": 1.0, "peak_growth_mib": 1.0} for t, g, ok in ((100.0, 1.1, True), (300.0, 2.1, False))]
    row = merge_generate_rounds(runs)
    assert (row["ttft_ms"], row["generate_s"], row["tokens_per_s"]) == (100.0, 1.1, round(10 / 1.1, 2))
    assert row["decode_tokens_per_s"] == round(2 * 4 / 1.0, 2) and row["generate_matches_forward"] is False


@pytest.mark.slow
def test_bench_quick_runs_train_generate_quant_and_writes_reports(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# project\n\nintro\n")
    results = bench.main(["--quick", "--only", "train,generate,quant", "--output-dir", str(tmp_path), "--readme", str(readme)])
    printed = capsys.readouterr().out

    assert results["errors"] == {}
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert {"train", "generate", "quant", "machine"} <= on_disk.keys()
    for name in ("train", "generate", "quant"):
        assert (tmp_path / f"bench_{name}.json").is_file()

    train = on_disk["train"]
    assert {(r["dtype"], r["checkpointing"], r["variant"]) for r in train["rows"]} == {
        (d, c, v) for d in ("fp32", "bf16") for c in ("off", "on") for v in VARIANTS
    }
    for row in train["rows"]:
        if row["variant"] in (OURS, OURS_NO_PREFIX):  # ours must run in every setting (the peer may fail: reported)
            assert "error" not in row, row
            assert row["tokens_per_s"] > 0 and row["peak_growth_mib"] > 0 and row["matmul_gflop_per_step"] > 0
        if row["variant"] == OURS and row["checkpointing"] == "off":
            assert "x_peer_tokens_per_s" in row and "prefix_overhead" in row and "fraction_of_matmul_peak" in row
    assert train["matmul_peak_gflops"].keys() == {"fp32", "bf16"}
    assert {r["trainable_dtype"] for r in train["rows"] if r["variant"] == OURS} == {"float32"}

    generate = on_disk["generate"]
    assert {(r["batch"], r["variant"]) for r in generate["rows"]} == {(b, v) for b in (1, 8) for v in VARIANTS}
    for row in generate["rows"]:
        assert "error" not in row, row
        assert row["ttft_ms"] > 0 and row["tokens_per_s"] > 0
        if row["variant"] in (OURS, OURS_NO_PREFIX):  # generate() must apply our prefix exactly as forward() does
            assert row["generate_matches_forward"] is True, row
    assert on_disk["quant"]["linear"]

    markdown = (tmp_path / "results.md").read_text()
    for heading in ("# Benchmarks", "## Training step", "### Goals", "## Generation", "| K | N | M |"):
        assert heading in markdown
    assert "| size | dtype | checkpointing | variant |" in markdown and "| size | dtype | batch | variant |" in markdown
    assert "## Training step" in printed and "## Generation" in printed
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    section = readme.read_text()
    assert section.startswith("# project\n\nintro\n") and section.count(bench.README_START) == 1
    assert "Training (P-tuning v2 step)" in section and "Generation:" in section
    bench.update_readme(readme, on_disk)  # a second run replaces the section instead of adding one
    assert readme.read_text().count(bench.README_START) == 1


@pytest.mark.slow
def test_bench_eval_quick(tmp_path, capsys):
    if not (bench_eval.EMBEDDED / "config.json").is_file():
        pytest.skip(f"the embedded model is not built ({bench_eval.EMBEDDED}; scripts/build_embedded_model.py)")
    output = tmp_path / "bench_eval.json"
    result = bench_eval.main(["--quick", "--output", str(output)])
    assert json.loads(output.read_text())["generation"] == result["generation"]
    assert "## Evaluation" in capsys.readouterr().out
    rows = result["generation"]
    assert [(r["batch_size"], r["order"], r["generation"]) for r in rows] == list(bench_eval.CONFIGS)
    assert all(r["predictions_equal_batch_1"] for r in rows) and rows[3]["ratio_vs_file_order_one_call"] > 0


def test_random_weights_answer_as_long_as_the_reference():
    """The mid-model rows of bench_eval stop by AnswerAsLongAsReference, whatever the batch."""
    from chatglm_ptuning.batch_generation import generate_rows
    from chatglm_ptuning.loading import load_model

    model, tokenizer = load_model(bench_eval.EMBEDDED, device="cpu", dtype=torch.float32)
    dataset = bench_eval._eval_dataset(tokenizer, 3, 64, 128)
    stop = bench_eval._reference_lengths(dataset, tokenizer)
    prompts = dataset["input_ids"]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = (ids != pad).long()
    lengths = list(stop.answer_lengths.values())
    # EOS excluded by _NoEos: only the reference lengths end the rows
    never_eos = transformers.LogitsProcessorList([_NoEos(tokenizer.eos_token_id), stop])
    out = generate_rows(model, ids, mask, torch.full((3,), 100), pad, do_sample=False, logits_processor=never_eos)
    assert [row.index(tokenizer.eos_token_id) for row in out.tolist()] == lengths


class _NoEos(transformers.LogitsProcessor):
    def __init__(self, eos_id: int):
        self.eos_id = eos_id

    def __call__(self, input_ids, scores):  # noqa: ANN001, ANN204
        scores[:, self.eos_id] = float("-inf")
        return scores


def test_bench_train_padding_quick(tmp_path, capsys):
    from scripts import bench_train

    output = tmp_path / "padding.json"
    report = bench_train.main(["--padding", "--paired", "--quick", "--threads", "1", "--output", str(output)])
    assert json.loads(output.read_text())["rows"] == report["rows"]
    rows = {(r["batch x accumulation"], r["layout"]): r for r in report["rows"]}
    assert all("error" not in r for r in rows.values()), rows
    for setting in ("1 x 2", "2 x 1"):
        fixed, per_batch = rows[(setting, bench_train.FIXED)], rows[(setting, bench_train.PER_BATCH)]
        assert per_batch["loss_sum_equal"] is True and per_batch["real_tokens"] == fixed["real_tokens"]
        assert per_batch["computed_tokens"] < fixed["computed_tokens"] and per_batch["x_fixed_layout"] > 0
        assert per_batch["flop_ceiling"] >= 1  # never more FLOPs than the fixed layout
        rounded = rows[(setting, bench_train.PER_BATCH_8)]
        assert rounded["loss_sum_equal"] is True and rounded["computed_tokens"] % 8 == 0
    paired = {(r["batch"], r["layout"]): r for r in report["paired"]}
    assert len(paired) == 2 * 3 and all("error" not in r for r in paired.values()), paired
    for batch in (1, 2):  # no optimizer step in the paired child: every layout gives the same losses
        assert paired[(batch, bench_train.PER_BATCH)]["loss_sum"] == pytest.approx(paired[(batch, bench_train.FIXED)]["loss_sum"], rel=1e-5)
        assert paired[(batch, bench_train.PER_BATCH)]["x_fixed_layout"] > 0
    ceilings = {(c["model"], c["batch x accumulation"], c["layout"]) for c in report["flop_ceilings"]}
    assert len(ceilings) == 2 * 5 and ("chatglm2/3-6b", "2 x 1", bench_train.GROUPED) in ceilings
    out = capsys.readouterr().out
    assert "per-batch padding vs the fixed layout" in out and "FLOP ceiling" in out


def test_flop_ceiling_sums_the_micro_batches():
    """Two rows of 4 and 7 tokens against a fixed width of 10: batch 1 pads neither, batch 2 pads both to 7
    (8 with --pad_to_multiple_of 8); the labelled targets (shifted labels) are the same in every layout."""
    from scripts.bench_common import SHAPES
    from scripts.bench_train import PER_BATCH, PER_BATCH_8, flop_ceilings, training_step_flops

    features = [{"input_ids": [5] * 4, "labels": [-100, -100, 7, 8]}, {"input_ids": [5] * 7, "labels": [-100] * 4 + [7] * 3}]
    shape = SHAPES["quick"]
    flops = lambda batch, width, targets: training_step_flops(shape, batch, width, targets)  # noqa: E731
    rows = {(r["batch x accumulation"], r["layout"]): r for r in flop_ceilings([shape], features, 10, ((1, 2), (2, 1)), 2, 0)}
    one = (flops(1, 10, 2) + flops(1, 10, 3)) / (flops(1, 4, 2) + flops(1, 7, 3))
    assert rows[("1 x 2", PER_BATCH)]["ceiling_benchmark_rows"] == round(one, 3)
    assert rows[("2 x 1", PER_BATCH)]["ceiling_whole_file"] == round(flops(2, 10, 5) / flops(2, 7, 5), 3)
    assert rows[("2 x 1", PER_BATCH_8)]["ceiling_whole_file"] == round(flops(2, 10, 5) / flops(2, 8, 5), 3)


@pytest.mark.parametrize(("batch", "width", "labelled"), [(1, 12, 5), (3, 9, 4)])
def test_training_step_flops_match_the_counted_step(batch, width, labelled):
    """The analytic count (used for the 6B ceiling) equals what the counter sees in padding_case's micro-step."""
    from scripts.bench_common import SHAPES, build_model, enable_checkpointing
    from scripts.bench_train import training_step_flops

    shape = SHAPES["quick"]
    model = build_model(shape, OURS, torch.float32)
    model.train()
    enable_checkpointing(model)
    ids = torch.randint(3, shape.vocab, (batch, width), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, width - labelled - 1 : width - 1] = ids[:, width - labelled - 1 : width - 1]  # `labelled` targets a row
    counted = count_matmul_flops(lambda: model(input_ids=ids, labels=labels).loss.backward())
    assert counted == training_step_flops(shape, batch, width, batch * labelled)


def test_device_check_passes_on_the_cpu_and_refuses_a_missing_device(tmp_path, capsys):
    """scripts/check_device.py is the prepared check for a lent GPU; here it runs its CPU form."""
    from scripts import check_device

    output = tmp_path / "check.json"
    assert check_device.main(["--device", "cpu", "--dtypes", "bf16", "--bits", "0,4", "--output", str(output)]) == 0
    rows = json.loads(output.read_text())
    assert [(row["model"], row["bits"]) for row in rows] == [
        ("embedded", "-"), ("embedded", 4), ("tiny-chatglm-6b", "-"), ("tiny-chatglm-6b", 4)
    ]
    assert all(row["ok"] and row["generated"] == 4 for row in rows)
    assert "| model | bits |" in capsys.readouterr().out
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            check_device.main(["--device", "cuda"])
        assert "torch sees no CUDA device" in capsys.readouterr().err
