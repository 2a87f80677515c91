"""Per-batch padding: features equal the fixed layout apart from padding, training equals the fixed
layout (losses, gradients, trained weights), token counts, length-grouped training batches and
length-sorted evaluation in file order."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from eval_rows import adgen_eval_rows, predicting_trainer
from official_layout import REPO_ROOT, tokenizers_dir, write_tiny_checkpoint
from safetensors.torch import load_file

from chatglm_ptuning.arguments import DataTrainingArguments
from chatglm_ptuning.collator import PROMPT_LENGTH_KEY, REAL_TOKENS_KEY, TrainBatchCollator, real_length
from chatglm_ptuning.data import load_rows, preprocess_train, train_label_pad_id
from chatglm_ptuning.loading import load_model
from chatglm_ptuning.train import main

SAMPLES = REPO_ROOT / "data_samples"
ADGEN_TRAIN = str(SAMPLES / "adgen_train.json")
ADGEN_DEV = str(SAMPLES / "adgen_dev.json")
X = -100


def _tokenizer(name: str):
    from transformers import AutoTokenizer

    import chatglm_ptuning  # noqa: F401  (registers the ChatGLM tokenizers)

    return AutoTokenizer.from_pretrained(tokenizers_dir() / name)


def _columns(rows: list[dict]) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in rows[0]}


def as_rows(features: dict[str, list]) -> list[dict]:
    return [{"input_ids": i, "labels": l} for i, l in zip(features["input_ids"], features["labels"])]


ADGEN = {"train_file": ADGEN_TRAIN, "prompt_column": "content", "response_column": "summary"}
CHAT = {"train_file": str(SAMPLES / "chat_train.json"), "prompt_column": "prompt", "response_column": "response",
        "history_column": "history"}
CONVERSATIONS = {"train_file": str(SAMPLES / "conversations_train.json"), "train_format": "conversations"}
LAYOUTS = [
    ("chatglm-6b", ADGEN, {}),
    ("chatglm-6b", ADGEN, {"ignore_pad_token_for_loss": False}),
    ("chatglm-6b", CHAT, {"all_turns": True}),
    ("chatglm2-6b", ADGEN, {"source_prefix": "请写广告："}),
    ("chatglm2-6b", ADGEN, {"ignore_pad_token_for_loss": False}),
    ("chatglm2-6b", CHAT, {"all_turns": True}),
    ("chatglm3-6b", ADGEN, {}),
    ("chatglm3-6b", CHAT, {}),
    ("chatglm3-6b", CHAT, {"all_turns": True}),
    ("chatglm3-6b", CONVERSATIONS, {}),
]


@pytest.mark.parametrize("name,layout,extra", LAYOUTS, ids=[f"{n}-{Path(l['train_file']).stem}-{'-'.join(e) or 'default'}" for n, l, e in LAYOUTS])
def test_unpadded_features_are_the_fixed_layout_without_its_padding(name, layout, extra):
    tokenizer = _tokenizer(name)
    args = DataTrainingArguments(**layout, **extra, max_source_length=96, max_target_length=160)
    rows = _columns(load_rows(layout["train_file"], args).rows[:12])
    unpadded = preprocess_train(tokenizer, rows, args)
    fixed = preprocess_train(tokenizer, rows, replace(args, pad_to_max_length=True))
    width = 96 + 160 + (0 if name == "chatglm-6b" else 1)
    pad, label_pad = tokenizer.pad_token_id, train_label_pad_id(tokenizer, args)
    assert len(unpadded["input_ids"]) == len(fixed["input_ids"]) >= 12
    assert len({len(ids) for ids in unpadded["input_ids"]}) > 1  # the rows really differ in length
    for ids, labels, fixed_ids, fixed_labels in zip(unpadded["input_ids"], unpadded["labels"], fixed["input_ids"], fixed["labels"]):
        n = len(ids)
        assert len(labels) == n <= width and len(fixed_ids) == len(fixed_labels) == width
        assert fixed_ids[:n] == ids and fixed_labels[:n] == labels
        assert fixed_ids[n:] == [pad] * (width - n) and fixed_labels[n:] == [label_pad] * (width - n)
        assert real_length(fixed_ids, fixed_labels, pad, label_pad) == n
    # The collator gives the same batch from either layout, padded to the longest row.
    collator = TrainBatchCollator(pad, label_pad_id=label_pad)
    from_unpadded, from_fixed = collator(as_rows(unpadded)), collator(as_rows(fixed))
    for key in ("input_ids", "labels", REAL_TOKENS_KEY):
        assert torch.equal(from_unpadded[key], from_fixed[key])
    assert from_unpadded["input_ids"].shape[1] == max(map(len, unpadded["input_ids"]))
    # --pad_to_max_length: the fixed rows keep their width.
    kept = TrainBatchCollator(pad, label_pad_id=label_pad, fixed_layout=True)(as_rows(fixed))
    assert kept["input_ids"].tolist() == fixed["input_ids"] and kept["labels"].tolist() == fixed["labels"]
    assert int(kept[REAL_TOKENS_KEY]) == int(from_unpadded[REAL_TOKENS_KEY]) == sum(map(len, unpadded["input_ids"]))


def test_collator_pads_right_to_the_longest_row_or_a_multiple():
    rows = [{"input_ids": [5, 6, 7], "labels": [X, 6, 7]}, {"input_ids": [5, 6, 7, 8, 9], "labels": [X, X, 7, 8, 9]}]
    batch = TrainBatchCollator(0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]]
    assert batch["labels"].tolist() == [[X, 6, 7, X, X], [X, X, 7, 8, 9]]
    assert set(batch) == {"input_ids", "labels", REAL_TOKENS_KEY} and int(batch[REAL_TOKENS_KEY]) == 8
    batch = TrainBatchCollator(0, pad_to_multiple_of=8)(rows)
    assert batch["input_ids"].shape == (2, 8) and int(batch[REAL_TOKENS_KEY]) == 8
    # Without ignore_pad_token_for_loss the labels are padded with the pad id, as the reference pads them.
    assert TrainBatchCollator(0, label_pad_id=0)(rows)["labels"].tolist()[0] == [X, 6, 7, 0, 0]


def _batches(tokenizer, fixed: bool, rows: int = 4) -> dict[str, torch.Tensor]:
    args = DataTrainingArguments(**ADGEN, max_source_length=64, max_target_length=96, pad_to_max_length=fixed)
    features = preprocess_train(tokenizer, _columns(load_rows(ADGEN_TRAIN, args).rows[:rows]), args)
    collator = TrainBatchCollator(tokenizer.pad_token_id, fixed_layout=fixed)
    batch = collator(as_rows(features))
    batch.pop(REAL_TOKENS_KEY)
    return batch


@pytest.mark.parametrize("arch", ["chatglm", "chatglm2"])
@pytest.mark.parametrize("prefix", [True, False], ids=["prefix", "no-prefix"])
def test_loss_and_gradients_equal_the_fixed_layout(tmp_path, arch, prefix, shared_tokenizers):
    model_dir = write_tiny_checkpoint(tmp_path / "model", arch, seed=2)
    model, tokenizer = load_model(model_dir, pre_seq_len=4 if prefix else None, device="cpu", dtype=torch.float32)
    model.train()
    if not prefix:  # nothing trains: take gradients of the word embeddings, which every position reaches
        model.get_input_embeddings().weight.requires_grad_(True)
    results = []
    for fixed in (False, True):
        batch = _batches(tokenizer, fixed)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same prefix-dropout mask (its shape does not depend on the row length)
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((batch["input_ids"].shape[1], loss.item(), grads))
    (width, loss, grads), (fixed_width, fixed_loss, fixed_grads) = results
    assert width < fixed_width  # the batch really was shorter
    assert loss == pytest.approx(fixed_loss, abs=1e-4)
    assert grads.keys() == fixed_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], fixed_grads[name], rtol=0, atol=1e-4)


def _train(model_dir: Path, out: Path, *extra: str) -> dict:
    args = [
        "--do_train", "--train_file", ADGEN_TRAIN, "--prompt_column", "content", "--response_column", "summary",
        "--model_name_or_path", str(model_dir), "--output_dir", str(out), "--overwrite_output_dir",
        "--max_source_length", "64", "--max_target_length", "96", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--max_train_samples", "12", "--max_steps", "3", "--logging_steps", "1",
        "--learning_rate", "3e-2", "--report_to", "none", "--seed", "7", *extra,
    ]
    assert main(args) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    return {
        "losses": [entry["loss"] for entry in state["log_history"] if "loss" in entry],
        # the trained weights: a prefix (model.safetensors) or LoRA adapters (adapter_model.safetensors)
        "weights": {k: v for path in sorted((out / "checkpoint-3").glob("*.safetensors")) for k, v in load_file(path).items()},
        "results": json.loads((out / "train_results.json").read_text()),
    }


CLI_CASES = [
    pytest.param("chatglm2", ["--pre_seq_len", "4"], id="chatglm2-ptuning"),
    pytest.param("chatglm", ["--pre_seq_len", "4", "--prefix_projection"], id="chatglm6b-projection", marks=pytest.mark.slow),
    pytest.param("chatglm2", ["--pre_seq_len", "4", "--quantization_bit", "4"], id="chatglm2-int4", marks=pytest.mark.slow),
    # LoRA's dropout draws one mask element per token, so a shorter batch draws different masks: dropout 0 here.
    pytest.param("chatglm", ["--method", "lora", "--quantization_bit", "4", "--lora_dropout", "0"],
                 id="chatglm6b-int4-lora-no-prefix", marks=pytest.mark.slow),
    pytest.param("chatglm2", ["--method", "lora", "--lora_dropout", "0"], id="chatglm2-lora-no-prefix", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("arch,extra", CLI_CASES)
def test_training_equals_the_fixed_layout_and_counts_tokens(tmp_path, arch, extra, shared_tokenizers):
    model_dir = write_tiny_checkpoint(tmp_path / "model", arch, seed=4)
    per_batch = _train(model_dir, tmp_path / "per_batch", *extra)
    fixed = _train(model_dir, tmp_path / "fixed", *extra, "--pad_to_max_length")
    assert len(per_batch["losses"]) == 3
    assert per_batch["losses"] == pytest.approx(fixed["losses"], abs=1e-4)
    assert per_batch["weights"].keys() == fixed["weights"].keys() and per_batch["weights"]
    for name, tensor in per_batch["weights"].items():
        torch.testing.assert_close(tensor, fixed["weights"][name], rtol=0, atol=1e-4)
    ours, reference = per_batch["results"], fixed["results"]
    width = 64 + 96 + (0 if arch == "chatglm" else 1)
    # 3 steps x 2 micro-batches x 2 rows: the same rows, so the same real tokens; the fixed layout computes 12 x width.
    assert ours["train_real_tokens"] == reference["train_real_tokens"] < 12 * width
    assert reference["train_computed_tokens"] == 12 * width
    assert ours["train_real_tokens"] <= ours["train_computed_tokens"] < reference["train_computed_tokens"]
    for results in (ours, reference):
        assert results["train_real_tokens_per_second"] == pytest.approx(
            results["train_real_tokens"] / results["train_runtime"], rel=0.02)
        assert results["train_computed_tokens_per_second"] > 0


def test_group_by_length_batches_similar_rows(tmp_path, tiny_glm2_dir):
    common = ["--pre_seq_len", "4", "--max_train_samples", "16", "--num_train_epochs", "1", "--max_steps", "-1",
              "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"]
    # _train's --max_steps 3 is overridden by the later --max_steps -1: one full epoch (4 steps) each.
    shuffled = _run_epoch(tiny_glm2_dir, tmp_path / "random", common)
    grouped = _run_epoch(tiny_glm2_dir, tmp_path / "grouped", [*common, "--group_by_length"])
    assert grouped["train_real_tokens"] == shuffled["train_real_tokens"]  # the same rows, once each
    assert grouped["train_computed_tokens"] < shuffled["train_computed_tokens"]
    assert grouped["train_padding_share"] < shuffled["train_padding_share"]


def _run_epoch(model_dir: Path, out: Path, extra: list[str]) -> dict:
    args = [
        "--do_train", "--train_file", ADGEN_TRAIN, "--prompt_column", "content", "--response_column", "summary",
        "--model_name_or_path", str(model_dir), "--output_dir", str(out), "--overwrite_output_dir",
        "--max_source_length", "64", "--max_target_length", "96", "--report_to", "none", "--seed", "3",
        "--save_strategy", "no", *extra,
    ]
    assert main(args) == 0
    return json.loads((out / "train_results.json").read_text())


def test_length_sorted_prediction_is_in_file_order_and_equals_unsorted(tmp_path, tiny_glm2_dir):
    from chatglm_ptuning.metrics import build_trainer_metrics

    model, tokenizer = load_model(tiny_glm2_dir, device="cpu", dtype=torch.float32)
    dataset = adgen_eval_rows(tokenizer, 7, 48, 8)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    assert len(set(lengths)) > 2
    outputs = {}
    for sort in (True, False):
        trainer = predicting_trainer(model, tokenizer, tmp_path / str(sort), 3, {"do_sample": False, "max_length": 48 + 8},
                                     sort_eval_by_length=sort, compute_metrics=build_trainer_metrics(tokenizer, True))
        if sort:  # rows come longest prompt first
            batches = trainer.get_test_dataloader(dataset)
            assert torch.cat([batch[PROMPT_LENGTH_KEY] for batch in batches]).tolist() == sorted(lengths, reverse=True)
        outputs[sort] = trainer.predict(dataset)
    sorted_run, file_order = outputs[True], outputs[False]
    assert (sorted_run.predictions == file_order.predictions).all()
    assert (sorted_run.label_ids == file_order.label_ids).all()
    for key in ("test_rouge-1", "test_rouge-2", "test_rouge-l", "test_bleu-4"):
        assert sorted_run.metrics[key] == file_order.metrics[key]
    padding = (-100, tokenizer.pad_token_id)
    expected = [[t for t in row if t not in padding] for row in dataset["labels"]]
    assert [[t for t in row if t not in padding] for row in sorted_run.label_ids.tolist()] == expected


@pytest.mark.slow
def test_token_counts_are_summed_over_ranks_and_accumulated_batches(tmp_path, tiny_glm2_dir):
    """2 DDP ranks x 2 accumulated micro-batches x 2 rows: one step trains each of the 8 rows once."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "out"
    flags = [
        "--do_train", "--train_file", ADGEN_TRAIN, "--prompt_column", "content", "--response_column", "summary",
        "--model_name_or_path", str(tiny_glm2_dir), "--output_dir", str(out), "--overwrite_output_dir",
        "--max_source_length", "64", "--max_target_length", "96", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--max_train_samples", "8", "--max_steps", "1", "--pre_seq_len", "4",
        "--use_cpu", "--report_to", "none", "--pad_to_max_length",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "chatglm_ptuning.train", *flags]
    run = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    results = json.loads((out / "train_results.json").read_text())
    tokenizer = _tokenizer("chatglm2-6b")
    args = DataTrainingArguments(**ADGEN, max_source_length=64, max_target_length=96)
    rows = preprocess_train(tokenizer, _columns(load_rows(ADGEN_TRAIN, args).rows[:8]), args)
    assert results["train_real_tokens"] == sum(len(ids) for ids in rows["input_ids"])
    assert results["train_computed_tokens"] == 8 * (64 + 96 + 1)


@pytest.mark.slow
def test_length_sorted_prediction_on_two_ranks_is_in_file_order(tmp_path, tiny_glm2_dir):
    """2 DDP ranks share the sorted batches; generated_predictions.txt equals one process's, in file order."""
    import os
    import socket
    import subprocess
    import sys

    def flags(out: Path) -> list[str]:
        return [
            "--do_predict", "--test_file", ADGEN_DEV, "--prompt_column", "content", "--response_column", "summary",
            "--model_name_or_path", str(tiny_glm2_dir), "--output_dir", str(out), "--max_source_length", "48",
            "--max_target_length", "8", "--per_device_eval_batch_size", "2", "--predict_with_generate",
            "--max_predict_samples", "7", "--do_sample", "False", "--use_cpu", "--report_to", "none",
        ]

    assert main(flags(tmp_path / "one")) == 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "chatglm_ptuning.train", *flags(tmp_path / "two")]
    run = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    one = (tmp_path / "one" / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    two = (tmp_path / "two" / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    assert len(one) == 7 and two == one
    rows = [json.loads(line) for line in Path(ADGEN_DEV).read_text(encoding="utf-8").splitlines()[:7]]
    for row, line in zip(rows, one):
        label = json.loads(line)["labels"]
        assert label and row["summary"].replace(" ", "").startswith(label.replace(" ", "")[:4])
