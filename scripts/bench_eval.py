"""Evaluation throughput: batched generation and metric scoring.

Measures, in one run on this machine:
- evaluation (generation through PromptTrainer.predict, greedy) on the embedded tiny model and on a
  mid-size ChatGLM2-shaped model with random weights, over the rows of data_samples/adgen_dev.json
  at the recipe's 64-token source and 128-token answer budget: at eval batch 1, and at batch 8 in
  file order with one generate() call per batch (transformers' and the reference's way: a batch
  runs until its longest answer is done), in file order with finished rows leaving the batch, and
  length-sorted with finished rows leaving (PromptTrainer's default; predictions put back in file
  order): samples/s, generated tokens/s, the ratio to batch 1 and to one call in file order at the
  same batch size; the predictions of every configuration are checked equal to batch 1's. The
  random-weight model answers each row with as many tokens as its reference answer (see
  AnswerAsLongAsReference); the embedded model was trained and stops by itself;
- metric scoring (ROUGE-1/2/L + BLEU-4, metrics.compute_metrics) of 1,000 and 10,000 pairs, serial
  and on every core, with the ratio.

    python -m scripts.bench_eval [--quick] [--output benchmarks/bench_eval.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import LogitsProcessor, LogitsProcessorList

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "chatglm_ptuning" / "embedded"
DEV_FILE = REPO / "data_samples" / "adgen_dev.json"
TRAIN_FILE = REPO / "data_samples" / "adgen_train.json"


def _mid_size_model(folder: Path, hidden: int, layers: int) -> Path:
    """A ChatGLM2-shaped model with random weights and the embedded tokenizer, in the official layout."""
    import shutil

    from transformers import AutoModelForCausalLM

    from chatglm_ptuning import ChatGLMConfig
    from chatglm_ptuning.official_format import write_official_folder

    base = json.loads((EMBEDDED / "config.json").read_text())
    fields = {k: v for k, v in base.items() if k not in ("_name_or_path", "architectures", "auto_map", "torch_dtype", "transformers_version")}
    fields.update(hidden_size=hidden, num_layers=layers, num_attention_heads=hidden // 64, kv_channels=64,
                  ffn_hidden_size=int(hidden * 8 / 3) // 64 * 64)
    config = ChatGLMConfig(**fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    write_official_folder(config, model.state_dict(), folder, fmt="safetensors", torch_dtype="float32")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(EMBEDDED / name, folder / name)
    return folder


def _eval_dataset(tokenizer, samples: int, max_source: int, max_target: int):
    from chatglm_ptuning.data import build_preprocess_function, load_rows

    args = SimpleNamespace(
        prompt_column="content", response_column="summary", history_column=None, max_source_length=max_source,
        max_target_length=max_target, val_max_target_length=max_target, ignore_pad_token_for_loss=True,
        source_prefix="", train_format=None, all_turns=False,
    )
    dataset = load_rows(DEV_FILE, args).to_dataset()
    dataset = dataset.select(range(min(samples, len(dataset))))
    mapped = dataset.map(build_preprocess_function(tokenizer, args, train=False), batched=True, batch_size=1,
                         remove_columns=dataset.column_names)
    return mapped.select_columns(["input_ids", "labels"])


FILE_ORDER, SORTED = "file order", "length-sorted"
ONE_CALL, ROWS_LEAVE = "one generate() call per batch", "finished rows leave"
# (eval batch size, row order, how a batch generates); the last is PromptTrainer's default
CONFIGS = ((1, FILE_ORDER, ROWS_LEAVE), (8, FILE_ORDER, ONE_CALL), (8, FILE_ORDER, ROWS_LEAVE), (8, SORTED, ROWS_LEAVE))


class AnswerAsLongAsReference(LogitsProcessor):
    """Lets a random-weight model answer like a trained one: a row emits EOS once it has made as many
    tokens as its reference answer (random weights practically never choose EOS). The row is found
    by its prompt, so the answer lengths do not depend on the batch or the row order."""

    def __init__(self, prompts: list[list[int]], answer_lengths: list[int], pad_id: int, eos_id: int):
        self.answer_lengths = {tuple(p): n for p, n in zip(prompts, answer_lengths)}
        self.prompt_sizes = sorted({len(p) for p in prompts})
        self.pad_id, self.eos_id = pad_id, eos_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, ids in enumerate(input_ids.tolist()):
            start = next(i for i, t in enumerate(ids) if t != self.pad_id)  # past the left padding
            for size in self.prompt_sizes:
                length = self.answer_lengths.get(tuple(ids[start : start + size]))
                if length is not None and len(ids) - start - size >= length:
                    scores[row] = float("-inf")
                    scores[row, self.eos_id] = 0
        return scores


def _reference_lengths(dataset, tokenizer) -> AnswerAsLongAsReference:  # noqa: ANN001
    ignored = (-100, tokenizer.pad_token_id, tokenizer.eos_token_id)
    lengths = [sum(t not in ignored for t in labels) for labels in dataset["labels"]]
    return AnswerAsLongAsReference(dataset["input_ids"], lengths, tokenizer.pad_token_id, tokenizer.eos_token_id)


def bench_generation(model_dir: Path, label: str, configs, samples: int, max_new: int, max_source: int = 64, rounds: int = 1,  # noqa: ANN001
                     reference_lengths: bool = False) -> list[dict]:
    """Each configuration's fastest of `rounds` runs (batch 1, the slow baseline, runs once); the
    configurations alternate within a round, so a change in the machine's load falls on all alike.
    With `reference_lengths` every answer is as long as its reference (see AnswerAsLongAsReference)."""
    from chatglm_ptuning.arguments import TrainingArguments
    from chatglm_ptuning.collator import PromptBatchCollator
    from chatglm_ptuning.loading import load_model
    from chatglm_ptuning.trainer import PromptTrainer

    model, tokenizer = load_model(model_dir, device="cpu", dtype=torch.float32)
    dataset = _eval_dataset(tokenizer, samples, max_source, max_new)
    params = sum(p.numel() for p in model.parameters())
    # The recipe's budget per row (prompt + max_new in total), greedy: comparable across batch sizes.
    generation = {"do_sample": False, "max_length": max_source + max_new}
    if reference_lengths:
        generation["logits_processor"] = LogitsProcessorList([_reference_lengths(dataset, tokenizer)])
    seconds: dict[tuple, float] = {}
    predictions: dict[tuple, torch.Tensor] = {}
    forwards: dict[tuple, tuple[int, int]] = {}  # model forwards, and rows summed over them
    for round_index in range(rounds):
        for config in configs:
            batch_size, order, generating = config
            if batch_size == 1 and round_index:
                continue
            with tempfile.TemporaryDirectory() as out:
                args = TrainingArguments(output_dir=out, per_device_eval_batch_size=batch_size, predict_with_generate=True,
                                         report_to=[], use_cpu=True, disable_tqdm=True)
                collator = PromptBatchCollator(tokenizer)
                trainer = PromptTrainer(
                    model=model, args=args, processing_class=tokenizer, data_collator=collator, eval_collator=collator,
                    generation_kwargs=generation, sort_eval_by_length=order == SORTED,
                    drop_finished_rows=generating == ROWS_LEAVE,
                )
                rows_per_forward: list[int] = []
                hook = model.register_forward_pre_hook(
                    lambda module, args, kwargs: rows_per_forward.append(len(kwargs["input_ids"])), with_kwargs=True
                )
                start = time.perf_counter()
                output = trainer.predict(dataset)
                seconds[config] = min(seconds.get(config, float("inf")), time.perf_counter() - start)
                hook.remove()
                forwards[config] = (len(rows_per_forward), sum(rows_per_forward))
            predictions[config] = torch.as_tensor(output.predictions)
    baseline = predictions[configs[0]]
    rows = []
    for config in configs:
        batch_size, order, generating = config
        generated = int(((predictions[config] != tokenizer.pad_token_id) & (predictions[config] != -100)).sum())
        rows.append({
            "model": label, "parameters": params, "batch_size": batch_size, "order": order, "generation": generating,
            "samples": len(dataset), "generated_tokens": generated,
            "forwards": forwards[config][0], "row_forwards": forwards[config][1],
            "seconds": round(seconds[config], 3), "samples_per_s": round(len(dataset) / seconds[config], 3),
            "generated_tokens_per_s": round(generated / seconds[config], 1),
            "predictions_equal_batch_1": bool(torch.equal(predictions[config], baseline)),
        })
    base = rows[0]["samples_per_s"]
    for row in rows:
        row["ratio_vs_batch_1"] = round(row["samples_per_s"] / base, 2)
        same_batch = [r["samples_per_s"] for r in rows
                      if r["batch_size"] == row["batch_size"] and (r["order"], r["generation"]) == (FILE_ORDER, ONE_CALL)]
        row["ratio_vs_file_order_one_call"] = round(row["samples_per_s"] / same_batch[0], 2) if same_batch else None
    return rows


def bench_metrics(sizes: list[int]) -> list[dict]:
    from chatglm_ptuning.metrics import compute_metrics

    texts = [json.loads(line)["summary"] for line in TRAIN_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(0)
    cores = os.cpu_count() or 1
    rows = []
    for size in sizes:
        predictions = [rng.choice(texts) for _ in range(size)]
        labels = [rng.choice(texts) for _ in range(size)]
        timings = {}
        results = {}
        for workers in (1, cores):
            start = time.perf_counter()
            results[workers] = compute_metrics(predictions, labels, workers=workers)
            timings[workers] = time.perf_counter() - start
        assert results[1] == results[cores], "parallel scoring must equal serial scoring"
        rows.append({
            "pairs": size, "serial_s": round(timings[1], 2), f"parallel_{cores}_workers_s": round(timings[cores], 2),
            "pairs_per_s_serial": round(size / timings[1], 1), "speedup": round(timings[1] / timings[cores], 2),
        })
    return rows


def _markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "bench_eval.json"))
    parser.add_argument("--samples", type=int, default=40, help="dev rows generated per configuration")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--skip-metrics", action="store_true", help="only the generation table")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each batch-8 configuration; the fastest is reported")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    samples, max_new = (4, 4) if args.quick else (args.samples, 128)
    result: dict = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
                    "quick": args.quick, "max_source": 64, "max_new_tokens": max_new, "rounds": args.rounds,
                    "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()]}
    generation = bench_generation(EMBEDDED, "embedded tiny", CONFIGS, samples, max_new, rounds=args.rounds)
    if not args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            mid = _mid_size_model(Path(tmp) / "mid", 1024, 8)
            generation += bench_generation(mid, "mid (h1024, 8 layers), reference-length answers", CONFIGS, samples, max_new,
                                           rounds=args.rounds, reference_lengths=True)
    result["generation"] = generation
    if not args.skip_metrics:
        result["metrics"] = bench_metrics([50] if args.quick else [1000, 10000])
    print("## Evaluation (greedy generation through PromptTrainer.predict)\n")
    print(result["machine"] + f"; load average {result['load_average_1_5_15min']}\n")
    print(_markdown(generation))
    if "metrics" in result:
        print("\n## Metric scoring\n")
        print(_markdown(result["metrics"]))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwritten to {args.output}")
    return result


if __name__ == "__main__":
    main()
