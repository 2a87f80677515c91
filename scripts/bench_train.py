"""P-tuning v2 training throughput and peak memory, against transformers + PEFT, in one run.

For each model shape (`--sizes`), dtype and gradient-checkpointing setting, one training step
(forward with labels, backward, AdamW on the trainable parameters) is timed for four variants
built to the same dimensions and fed the same token ids and labels:

- `ours`: ChatGLM2ForConditionalGeneration with a P-tuning v2 prefix of P tokens (backbone frozen);
- `ours, no prefix`: the same model without a prefix; its input embeddings require grad, so the
  backward still runs through every layer (the prefix's overhead is `ours` over this);
- `peer (PEFT)`: transformers' GlmForCausalLM (the GLM-4 design ChatGLM2/3 share) wrapped by
  `get_peft_model(..., PrefixTuningConfig(num_virtual_tokens=P))`;
- `peer, no prefix`: that GlmForCausalLM alone, input embeddings requiring grad.

Every variant runs in a fresh child process (see scripts/bench_common.py): peak memory is that
child's resident-set high-water mark minus its size at start (weights + activations + optimizer).
Step time is the median of `--repeats` steps after one warm-up; matmul FLOPs per step are counted
once afterwards with torch.utils.flop_counter (attention included; a checkpointed step counts its
recomputation) and divided by the step time, then compared with this machine's dense matmul rate
measured in the same run. A variant that fails (e.g. PEFT's prefix under gradient checkpointing on
transformers 5.x) is reported with its error.

    python -m scripts.bench_train                       # tiny and mid, fp32 and bf16, checkpointing off/on
    python -m scripts.bench_train --sizes mid --dtypes fp32 --profile
    python -m scripts.bench_train --quick               # smoke test (used by the tests)

`--padding` measures instead what per-batch padding saves against the reference's fixed layout
(every row right-padded to max_source + max_target + 1 = 193 tokens), on the mid model with
P-tuning v2 and activation checkpointing (the recipe's training), fed the rows of
data_samples/adgen_train.json as ChatGLM3 input-output features (the real ChatGLM3 tokenizer under
$CHATGLM_TOKENIZERS_DIR): at batch 1 x accumulation 16 and at batch 8, training samples/s of the
fixed layout, per-batch padding (also with `--pad_to_multiple_of 8`), and per-batch padding with
transformers' length-grouped sampler (`--group_by_length`). Each configuration trains `--samples` rows
of a seeded shuffle of the whole file, as the Trainer's sampler draws them, in a fresh child: the fixed
and per-batch layouts the same rows (their loss sums agree), the length-grouped order other rows, so
ratios are of real (non-pad) tokens/s, which for the same rows is the samples/s ratio. Next to the
measured ratios it prints their FLOP ceilings (`training_step_flops`, counted, not timed) for the
benchmark's model and for the real ChatGLM2/3-6B shape, on the same rows and on the whole file.
`--paired` also times the same-row layouts back to back on each micro-batch in one child
(`paired_padding_case`): on a shared machine that ratio is far steadier than the one from separate children.

    python -m scripts.bench_train --padding --paired --threads 1 --dtypes fp32 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from chatglm_ptuning.constants import IGNORE_INDEX
from scripts.bench_common import (
    CHATGLM2_VOCAB,
    DTYPES,
    run_isolated,
    OURS,
    OURS_NO_PREFIX,
    PEER,
    PEER_NO_PREFIX,
    SHAPES,
    ModelShape,
    build_model,
    comma_separated,
    enable_checkpointing,
    machine_info,
    machine_line,
    markdown,
    matmul_peak,
    merge_rounds,
    run_variants,
    status_mib,
    trainable_parameters,
)

REPO = Path(__file__).resolve().parents[1]
HAS_PREFIX = {OURS: True, OURS_NO_PREFIX: False, PEER: True, PEER_NO_PREFIX: False}
BASELINE = {OURS: PEER, OURS_NO_PREFIX: PEER_NO_PREFIX}  # the peer row each of our rows is compared with
NO_PREFIX = {OURS: OURS_NO_PREFIX, PEER: PEER_NO_PREFIX}  # the row a prefix row's overhead is measured against


def training_batch(vocab: int, batch: int, prompt_len: int, answer_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded token ids [batch, prompt+answer] and P-tuning labels (the prompt positions -100)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, prompt_len + answer_len), generator=generator)
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    return ids, labels


class TrainStep:
    """One optimisation step of `model` on fixed inputs; callable, returns the loss."""

    def __init__(self, model: torch.nn.Module, prefix: bool, ids: torch.Tensor, labels: torch.Tensor):
        self.model = model
        self.prefix = prefix
        self.ids, self.labels = ids, labels
        self.attention_mask = torch.ones_like(ids)
        params = trainable_parameters(model)
        # fused: the Trainer's default optimizer (adamw_torch_fused)
        self.optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True) if params else None

    def __call__(self) -> float:
        if self.prefix:
            inputs = {"input_ids": self.ids}
        else:  # nothing is trainable: backpropagate to the embeddings so every layer runs its backward
            inputs = {"inputs_embeds": self.model.get_input_embeddings()(self.ids).detach().requires_grad_()}
        loss = self.model(**inputs, attention_mask=self.attention_mask, labels=self.labels).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and PV of the CPU flash-attention kernel (torch's counter knows only the GPU kernels)."""
    b, h, s_q, d = query_shape
    return 2 * b * h * s_q * key_shape[-2] * (d + value_shape[-1])


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _sdpa_cpu_flops(query_shape, key_shape, value_shape)  # dV, dP, dQ, dK: as torch counts it


def count_matmul_flops(step) -> int:
    """Matmul FLOPs (mm/addmm/bmm and attention) one call of `step` executes."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step()
    return counter.get_total_flops()


# ChatGLM2-6B / ChatGLM3-6B (their config.json) with the recipe's prefix: for FLOP counts only, never built
CHATGLM_6B = ModelShape("chatglm2/3-6b", hidden=4096, layers=28, heads=32, kv_heads=2, head_dim=128, ffn=13696,
                        vocab=CHATGLM2_VOCAB, prefix=128)


def training_step_flops(shape: ModelShape, batch: int, width: int, targets: int) -> int:
    """Matmul FLOPs of one training micro-step of `padding_case` (P-tuning v2, frozen backbone, non-reentrant
    activation checkpointing) on `batch` rows `width` tokens wide with `targets` labelled positions in all,
    exactly as `count_matmul_flops` counts them (the tests compare the two on small models).

    Per layer: the four linears forward; again in the recomputation, except dense_4h_to_h (the
    recomputation stops once the tensors the backward saved are back, and the block's last product is
    not needed for that); their input gradients (frozen weights: no weight gradient); attention of
    `width` queries against prefix + `width` keys forward, recomputed and backward (twice the forward).
    Then the fused head: logits and their gradient at the labelled positions only."""
    h, d = shape.hidden, shape.head_dim
    tokens = batch * width
    qkv = 2 * tokens * h * (shape.heads + 2 * shape.kv_heads) * d
    dense = 2 * tokens * shape.heads * d * h
    h_to_4h, four_h_to_h = 2 * tokens * h * 2 * shape.ffn, 2 * tokens * shape.ffn * h
    attention = 2 * batch * shape.heads * width * (shape.prefix + width) * (d + d)  # QK^T and PV
    per_layer = 3 * (qkv + dense + h_to_4h) + 2 * four_h_to_h + 4 * attention
    return shape.layers * per_layer + 2 * 2 * targets * h * shape.vocab


def train_case(
    shape: ModelShape, variant: str, dtype: str, checkpointing: bool, batch: int, prompt_len: int, answer_len: int, repeats: int
) -> dict:
    """Runs in a child: build, warm up, time `repeats` steps, then count FLOPs (after the memory peak is read)."""
    model = build_model(shape, variant, DTYPES[dtype])
    model.train()
    if checkpointing:
        enable_checkpointing(model)
    step = TrainStep(model, HAS_PREFIX[variant], *training_batch(shape.vocab, batch, prompt_len, answer_len))
    loss = step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = status_mib("VmHWM")  # before the FLOP count, whose dispatch mode must not add to the peak
    flops = count_matmul_flops(step)
    trainable = trainable_parameters(model)
    return {
        "step_s": statistics.median(times),
        "step_s_min": min(times),
        "tokens_per_step": batch * (prompt_len + answer_len),
        "matmul_gflop_per_step": float(f"{flops / 1e9:.4g}"),
        "first_loss": round(loss, 4),
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_dtype": str(trainable[0].dtype).removeprefix("torch.") if trainable else None,
        "vmhwm_mib": peak,
        **_rates(statistics.median(times), batch * (prompt_len + answer_len), flops / 1e9),
    }


def _rates(step_s: float, tokens: int, gflop: float) -> dict:
    return {"tokens_per_s": round(tokens / step_s, 1), "matmul_gflops": float(f"{gflop / step_s:.4g}")}


def merge_train_rounds(runs: list[dict]) -> dict:
    """A variant's row from its rounds: the fastest round's median step time (and the rates from it),
    the largest peak memory."""
    row = merge_rounds(runs, ("step_s",))
    row["step_s_min"] = min(run["step_s_min"] for run in runs)
    row.update(_rates(row["step_s"], row["tokens_per_step"], row["matmul_gflop_per_step"]))
    row["step_s"], row["step_s_min"] = round(row["step_s"], 4), round(row["step_s_min"], 4)
    return row


def add_ratios(rows: list[dict], peaks: dict[str, float]) -> None:
    """Per setting (size, dtype, checkpointing): throughput and memory against the peer, prefix overhead,
    fraction of the matmul peak."""
    by_key = {(r["size"], r["dtype"], r["checkpointing"], r["variant"]): r for r in rows}
    for row in rows:
        if "error" in row:
            continue
        setting = (row["size"], row["dtype"], row["checkpointing"])
        peer = by_key.get((*setting, BASELINE.get(row["variant"])))
        if peer is not None and "error" not in peer:
            row["x_peer_tokens_per_s"] = round(row["tokens_per_s"] / peer["tokens_per_s"], 3)
            row["x_peer_memory"] = round(row["peak_growth_mib"] / peer["peak_growth_mib"], 3)
        bare = by_key.get((*setting, NO_PREFIX.get(row["variant"])))
        if bare is not None and "error" not in bare:
            row["prefix_overhead"] = round(row["step_s"] / bare["step_s"] - 1, 3)
        row["fraction_of_matmul_peak"] = float(f"{row['matmul_gflops'] / peaks[row['dtype']]:.3g}")


COLUMNS = [
    "size", "dtype", "checkpointing", "variant", "step_s", "tokens_per_s", "x_peer_tokens_per_s", "prefix_overhead",
    "peak_growth_mib", "x_peer_memory", "matmul_gflops", "fraction_of_matmul_peak", "error",
]
GOAL_COLUMNS = ["size", "dtype", "checkpointing", "x_peer_tokens_per_s", "goal >= 1.3", "prefix_overhead", "goal < 0.10",
                "x_peer_memory", "goal <= 1"]


def goals(rows: list[dict]) -> list[dict]:
    """The issue's targets, one line per setting, read from the `ours` rows."""
    out = []
    for row in rows:
        if row["variant"] != OURS or "error" in row:
            continue
        speed, overhead, memory = row.get("x_peer_tokens_per_s"), row.get("prefix_overhead"), row.get("x_peer_memory")
        out.append({
            "size": row["size"], "dtype": row["dtype"], "checkpointing": row["checkpointing"],
            "x_peer_tokens_per_s": speed, "goal >= 1.3": _met(speed, speed is not None and speed >= 1.3),
            "prefix_overhead": overhead, "goal < 0.10": _met(overhead, overhead is not None and overhead < 0.10),
            "x_peer_memory": memory, "goal <= 1": _met(memory, memory is not None and memory <= 1.0),
        })
    return out


def _met(value, ok: bool) -> str:
    return "n/a (peer failed)" if value is None else ("yes" if ok else "no")


def profile_step(shape: ModelShape, variant: str, dtype: str, batch: int, prompt_len: int, answer_len: int, top: int) -> str:
    """torch.profiler table (self CPU time) of one training step after a warm-up, in this process."""
    from torch.profiler import ProfilerActivity, profile

    model = build_model(shape, variant, DTYPES[dtype])
    model.train()
    step = TrainStep(model, HAS_PREFIX[variant], *training_batch(shape.vocab, batch, prompt_len, answer_len))
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


# ---------------------------------------------------------------- per-batch padding vs fixed layout

FIXED, PER_BATCH, GROUPED = "fixed layout", "per-batch padding", "per-batch + group_by_length"
PER_BATCH_8 = "per-batch, --pad_to_multiple_of 8"
PAD_LAYOUTS = (FIXED, PER_BATCH, PER_BATCH_8, GROUPED)
PAD_MULTIPLE = {PER_BATCH_8: 8}  # the collator's pad_to_multiple_of per layout (None: the longest row)
PAD_SETTINGS = ((1, 16), (8, 1))  # (batch, gradient accumulation): the recipe's, and batch 8
ADGEN_TRAIN = REPO / "data_samples" / "adgen_train.json"


def default_tokenizer_dir() -> Path:
    """The real ChatGLM3 tokenizer (whose ADGEN rows average 110 of 193 tokens), else the embedded one."""
    shared = Path(os.environ.get("CHATGLM_TOKENIZERS_DIR", REPO.parent / "shared" / "tokenizers")) / "chatglm3-6b"
    return shared if (shared / "tokenizer.model").is_file() else REPO / "chatglm_ptuning" / "embedded"


def adgen_training_features(tokenizer_dir: Path, fixed: bool, max_source: int, max_target: int) -> tuple[list[dict], int]:
    """The training rows of data_samples/adgen_train.json as the CLI preprocesses them, and the pad id."""
    from transformers import AutoTokenizer

    from chatglm_ptuning.arguments import DataTrainingArguments
    from chatglm_ptuning.data import load_rows, preprocess_train

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    args = DataTrainingArguments(train_file=str(ADGEN_TRAIN), prompt_column="content", response_column="summary",
                                 max_source_length=max_source, max_target_length=max_target, pad_to_max_length=fixed)
    rows = load_rows(ADGEN_TRAIN, args).rows
    features = preprocess_train(tokenizer, {key: [row[key] for row in rows] for key in rows[0]}, args)
    return [{"input_ids": i, "labels": l} for i, l in zip(features["input_ids"], features["labels"])], tokenizer.pad_token_id


def training_order(lengths: list[int], grouped: bool, batch: int, accumulation: int, seed: int) -> list[int]:
    """Row order the Trainer's sampler gives: RandomSampler, or LengthGroupedSampler over
    batch x accumulation (the Trainer's grouping size), both seeded."""
    from torch.utils.data import RandomSampler
    from transformers.trainer_pt_utils import LengthGroupedSampler

    generator = torch.Generator().manual_seed(seed)
    if grouped:
        return list(LengthGroupedSampler(batch * accumulation, lengths=lengths, generator=generator))
    return list(RandomSampler(range(len(lengths)), generator=generator))


def padding_case(
    shape: ModelShape, layout: str, batch: int, accumulation: int, samples: int, dtype: str, tokenizer_dir: str,
    max_source: int, max_target: int, seed: int,
) -> dict:
    """Runs in a child: one warm-up micro-batch, then `samples` rows in micro-batches of `batch`, an
    optimizer step every `accumulation` micro-batches (loss / accumulation, as the Trainer scales it)."""
    from chatglm_ptuning.collator import REAL_TOKENS_KEY, TrainBatchCollator

    fixed = layout == FIXED
    rows, pad_id = adgen_training_features(Path(tokenizer_dir), fixed, max_source, max_target)
    unpadded, _ = adgen_training_features(Path(tokenizer_dir), False, max_source, max_target) if fixed else (rows, pad_id)
    order = training_order([len(r["input_ids"]) for r in unpadded], layout == GROUPED, batch, accumulation, seed)
    collate = TrainBatchCollator(pad_id, pad_to_multiple_of=PAD_MULTIPLE.get(layout), fixed_layout=fixed)
    model = build_model(shape, OURS, DTYPES[dtype])
    model.train()
    enable_checkpointing(model)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-3, fused=True)

    def micro_batch(indices: list[int]) -> tuple[float, int, int]:
        inputs = collate([rows[i] for i in indices])
        real = int(inputs.pop(REAL_TOKENS_KEY))
        loss = model(**inputs).loss
        (loss / accumulation).backward()
        return float(loss.detach()), real, inputs["input_ids"].numel()

    micro_batch(order[samples : samples + batch])  # warm-up, on rows outside the timed ones
    optimizer.zero_grad(set_to_none=True)
    losses, real, computed = [], 0, 0
    start = time.perf_counter()
    for step, first in enumerate(range(0, samples, batch), start=1):
        loss, batch_real, batch_computed = micro_batch(order[first : first + batch])
        losses.append(loss)
        real, computed = real + batch_real, computed + batch_computed
        if step % accumulation == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return {
        "seconds": round(seconds, 2), "samples_per_s": round(samples / seconds, 4), "real_tokens": real,
        "real_tokens_per_s": round(real / seconds, 2),
        "computed_tokens": computed, "padding_share": round(1 - real / computed, 3),
        "loss_sum": round(sum(losses), 4), "mean_row_tokens": round(real / samples, 1),
    }


PAIRED_LAYOUTS = (FIXED, PER_BATCH, PER_BATCH_8)  # the layouts that train the same rows


def paired_padding_case(
    shape: ModelShape, batch: int, samples: int, dtype: str, tokenizer_dir: str, max_source: int, max_target: int,
    seed: int, repeats: int,
) -> dict:
    """Runs in a child: the layouts of PAIRED_LAYOUTS back to back on each micro-batch (forward + backward on
    one model, no optimizer step, so every layout sees the same weights), `repeats` passes over the rows,
    the layout order rotated per micro-batch. A layout's time is the sum over the micro-batches of its
    fastest pass: a busy spell slows all layouts alike or is discarded."""
    from chatglm_ptuning.collator import REAL_TOKENS_KEY, TrainBatchCollator

    tokenizer = Path(tokenizer_dir)
    rows = {FIXED: adgen_training_features(tokenizer, True, max_source, max_target)[0]}
    rows[PER_BATCH], pad_id = adgen_training_features(tokenizer, False, max_source, max_target)
    rows[PER_BATCH_8] = rows[PER_BATCH]
    order = training_order([len(r["input_ids"]) for r in rows[PER_BATCH]], False, batch, 1, seed)
    collators = {layout: TrainBatchCollator(pad_id, pad_to_multiple_of=PAD_MULTIPLE.get(layout), fixed_layout=layout == FIXED)
                 for layout in PAIRED_LAYOUTS}
    model = build_model(shape, OURS, DTYPES[dtype])
    model.train()
    enable_checkpointing(model)
    micro_batches = [order[first : first + batch] for first in range(0, samples, batch)]
    fastest = {layout: [float("inf")] * len(micro_batches) for layout in PAIRED_LAYOUTS}
    losses = {layout: [0.0] * len(micro_batches) for layout in PAIRED_LAYOUTS}

    def micro_batch(layout: str, indices: list[int]) -> float:
        inputs = collators[layout]([rows[layout][i] for i in indices])
        inputs.pop(REAL_TOKENS_KEY)
        loss = model(**inputs).loss
        loss.backward()
        return float(loss.detach())

    micro_batch(PER_BATCH, order[samples : samples + batch])  # warm-up, on rows outside the timed ones
    for _ in range(repeats):
        for index, indices in enumerate(micro_batches):
            shift = index % len(PAIRED_LAYOUTS)
            for layout in PAIRED_LAYOUTS[shift:] + PAIRED_LAYOUTS[:shift]:
                torch.manual_seed(seed + index)  # the same prefix-dropout mask for every layout of a micro-batch
                start = time.perf_counter()
                losses[layout][index] = micro_batch(layout, indices)
                fastest[layout][index] = min(fastest[layout][index], time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
    return {layout: {"seconds": round(sum(fastest[layout]), 3), "loss_sum": round(sum(losses[layout]), 4)}
            for layout in PAIRED_LAYOUTS}


def flop_ceilings(
    shapes: list[ModelShape], features: list[dict], fixed_width: int, settings: tuple, samples: int, seed: int
) -> list[dict]:
    """How fast each per-batch layout can be against the fixed layout if every FLOP costs the same: its real
    tokens per matmul FLOP (`training_step_flops`) over the fixed layout's on the random order's rows (the
    benchmark's reference, rows `fixed_width` wide), for the rows the benchmark trains (the first `samples`
    of each order) and for the whole file. For the same rows (all but the length-grouped order, and the
    whole file) that is the fixed layout's FLOPs over the layout's. features: the unpadded rows."""
    lengths = [len(f["input_ids"]) for f in features]
    targets = [sum(label != IGNORE_INDEX for label in f["labels"][1:]) for f in features]  # shifted labels

    def tokens_and_flops(shape: ModelShape, indices: list[int], batch: int, multiple: int | None) -> tuple[int, int]:
        tokens = flops = 0
        for first in range(0, len(indices), batch):
            rows = indices[first : first + batch]
            width = fixed_width if multiple is None else -(-max(lengths[i] for i in rows) // multiple) * multiple
            tokens += sum(lengths[i] for i in rows)
            flops += training_step_flops(shape, len(rows), width, sum(targets[i] for i in rows))
        return tokens, flops

    out = []
    for shape in shapes:
        for batch, accumulation in settings:
            random_order = training_order(lengths, False, batch, accumulation, seed)
            for layout in PAD_LAYOUTS[1:]:
                if layout == GROUPED and batch == 1:
                    continue
                order = training_order(lengths, True, batch, accumulation, seed) if layout == GROUPED else random_order
                row = {"model": shape.name, "batch x accumulation": f"{batch} x {accumulation}", "layout": layout}
                for label, count in (("benchmark_rows", samples), ("whole_file", len(order))):
                    fixed_tokens, fixed_flops = tokens_and_flops(shape, random_order[:count], batch, None)
                    tokens, flops = tokens_and_flops(shape, order[:count], batch, PAD_MULTIPLE.get(layout, 1))
                    row[f"ceiling_{label}"] = round(tokens / flops * fixed_flops / fixed_tokens, 3)
                row["gflop_per_row_fixed"] = round(fixed_flops / len(order) / 1e9, 1)
                row["gflop_per_row"] = round(flops / len(order) / 1e9, 1)
                out.append(row)
    return out


def paired_padding(
    args: argparse.Namespace, shape: ModelShape, settings: tuple, samples: int, tokenizer_dir: str, max_source: int,
    max_target: int, ceilings: list[dict],
) -> list[dict]:
    """`--paired`: one child per batch size runs `paired_padding_case`; rows with the ratio to the fixed layout
    and its FLOP ceiling. Empty without `--paired`."""
    if not args.paired:
        return []
    out = []
    for batch, accumulation in settings:
        kwargs = {"shape": shape, "batch": batch, "samples": samples, "dtype": args.dtypes[0], "tokenizer_dir": tokenizer_dir,
                  "max_source": max_source, "max_target": max_target, "seed": 0, "repeats": args.rounds}
        result = run_isolated(paired_padding_case, kwargs, args.threads, args.timeout)
        if "error" in result:
            out.append({"batch": batch, "layout": "-", "error": result["error"]})
            continue
        for layout in PAIRED_LAYOUTS:
            row = {"batch": batch, "layout": layout, **result[layout]}
            row["samples_per_s"] = round(samples / row["seconds"], 4)
            row["x_fixed_layout"] = round(result[FIXED]["seconds"] / row["seconds"], 3)
            ceiling = next((c for c in ceilings if c["model"] == shape.name and c["layout"] == layout
                            and c["batch x accumulation"] == f"{batch} x {accumulation}"), None)
            if ceiling is not None:
                row["flop_ceiling"] = ceiling["ceiling_benchmark_rows"]
                row["share_of_ceiling"] = round(row["x_fixed_layout"] / row["flop_ceiling"], 3)
            out.append(row)
        print(f"  paired, batch {batch}: " + ", ".join(f"{r['layout']} {r['x_fixed_layout']}" for r in out[-3:]), flush=True)
    return out


def padding_main(args: argparse.Namespace) -> dict:
    shape = SHAPES["tiny" if args.quick else "mid"]  # the ChatGLM vocabulary: real token ids
    samples = 4 if args.quick else args.samples
    settings = ((1, 2), (2, 1)) if args.quick else PAD_SETTINGS
    max_source, max_target = (32, 64) if args.quick else (64, 128)
    tokenizer_dir = args.tokenizer or default_tokenizer_dir()
    info = machine_info()
    cases = [(b, a, layout) for b, a in settings for layout in PAD_LAYOUTS if not (layout == GROUPED and b == 1)]
    runs: dict[tuple, list[dict]] = {case: [] for case in cases}
    for round_index in range(args.rounds):
        shift = round_index % len(cases)
        for batch, accumulation, layout in cases[shift:] + cases[:shift]:
            kwargs = {"shape": shape, "layout": layout, "batch": batch, "accumulation": accumulation, "samples": samples,
                      "dtype": args.dtypes[0], "tokenizer_dir": str(tokenizer_dir), "max_source": max_source,
                      "max_target": max_target, "seed": 0}
            result = run_isolated(padding_case, kwargs, args.threads, args.timeout)
            result.pop("traceback", None)
            runs[(batch, accumulation, layout)].append(result)
            print(f"  batch {batch} x {accumulation} {layout}: {result.get('samples_per_s', result.get('error'))}", flush=True)
    rows = []
    for (batch, accumulation, layout), results in runs.items():
        failed = [r for r in results if "error" in r]
        row = failed[0] if failed else merge_rounds(results, ("seconds",))
        if not failed:
            row["samples_per_s"] = round(samples / row["seconds"], 4)
            row["real_tokens_per_s"] = round(row["real_tokens"] / row["seconds"], 2)
        rows.append({"batch x accumulation": f"{batch} x {accumulation}", "layout": layout, **row})
    for row in rows:
        fixed = next(r for r in rows if r["batch x accumulation"] == row["batch x accumulation"] and r["layout"] == FIXED)
        if "error" not in row and "error" not in fixed:
            # real tokens/s: the length-grouped order trains other rows than the random one (equal for the others)
            row["x_fixed_layout"] = round(row["real_tokens_per_s"] / fixed["real_tokens_per_s"], 3)
            same_rows = row["layout"] in (PER_BATCH, PER_BATCH_8)
            row["loss_sum_equal"] = abs(row["loss_sum"] - fixed["loss_sum"]) < 1e-3 if same_rows else None
    features, _ = adgen_training_features(Path(tokenizer_dir), False, max_source, max_target)
    fixed_width = len(adgen_training_features(Path(tokenizer_dir), True, max_source, max_target)[0][0]["input_ids"])
    ceilings = flop_ceilings([shape, CHATGLM_6B], features, fixed_width, settings, samples, seed=0)
    for row in rows:
        ceiling = next((c for c in ceilings if c["model"] == shape.name and c["layout"] == row["layout"]
                        and c["batch x accumulation"] == row["batch x accumulation"]), None)
        if ceiling is not None and "x_fixed_layout" in row:
            row["flop_ceiling"] = ceiling["ceiling_benchmark_rows"]
            row["share_of_ceiling"] = round(row["x_fixed_layout"] / row["flop_ceiling"], 3)
    paired_rows = paired_padding(args, shape, settings, samples, str(tokenizer_dir), max_source, max_target, ceilings)
    goals = {"1 x 16": 1.6, "8 x 1": 1.3}
    goal_rows = [
        {"batch x accumulation": r["batch x accumulation"], "per-batch / fixed": r.get("x_fixed_layout"),
         "goal": f">= {goals[r['batch x accumulation']]}",
         "met": "yes" if (r.get("x_fixed_layout") or 0) >= goals[r["batch x accumulation"]] else "no"}
        for r in rows if r["layout"] == PER_BATCH and r["batch x accumulation"] in goals
    ]
    report = {
        "machine": info,
        "settings": {"shape": vars(shape), "dtype": args.dtypes[0], "checkpointing": "on", "samples": samples,
                     "rounds": args.rounds, "threads": args.threads, "max_source": max_source, "max_target": max_target,
                     "tokenizer": str(tokenizer_dir), "data": str(ADGEN_TRAIN.relative_to(REPO))},
        "rows": rows,
        "goals": goal_rows,
        "flop_ceilings": ceilings,
        "paired": paired_rows,
    }
    print(f"\n## Training samples/s: per-batch padding vs the fixed layout ({shape.name} model, {args.dtypes[0]}, "
          f"P-tuning v2 prefix {shape.prefix}, checkpointing on, {samples} ADGEN rows per configuration)\n")
    print(machine_line(info))
    print(markdown(rows, ["batch x accumulation", "layout", "samples_per_s", "real_tokens_per_s", "x_fixed_layout", "mean_row_tokens",
                          "flop_ceiling", "share_of_ceiling", "padding_share", "computed_tokens", "loss_sum",
                          "loss_sum_equal", "seconds", "error"]))
    print()
    print(markdown(goal_rows, ["batch x accumulation", "per-batch / fixed", "goal", "met"]))
    if paired_rows:
        print(f"\n### Paired: the layouts back to back on each micro-batch in one process (sum of each micro-batch's "
              f"fastest of {args.rounds} passes; forward + backward, no optimizer step)\n")
        print(markdown(paired_rows, ["batch", "layout", "seconds", "samples_per_s", "x_fixed_layout", "flop_ceiling",
                                     "share_of_ceiling", "loss_sum", "error"]))
    print(f"\n### FLOP ceiling of the ratio (fixed layout's matmul FLOPs over the layout's; {shape.name} and the real "
          f"ChatGLM2/3-6B shape, counted, not timed)\n")
    print(markdown(ceilings, ["model", "batch x accumulation", "layout", "ceiling_benchmark_rows", "ceiling_whole_file",
                              "gflop_per_row_fixed", "gflop_per_row"]))
    output = args.output if args.output != REPO / "benchmarks" / "bench_train.json" else REPO / "benchmarks" / "bench_train_padding.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {output}")
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the smoke-test size, short sequences, one timed step")
    parser.add_argument("--sizes", type=comma_separated(sorted(SHAPES)), default="tiny,mid", help=f"comma-separated, from {sorted(SHAPES)}")
    parser.add_argument("--dtypes", type=comma_separated(sorted(DTYPES)), default="fp32,bf16", help="comma-separated, from fp32,bf16")
    parser.add_argument("--checkpointing", type=comma_separated(["off", "on"]), default="off,on", help="comma-separated gradient checkpointing settings, from off,on")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per row (labels -100)")
    parser.add_argument("--answer-len", type=int, default=128, help="answer tokens per row (trained on)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant and round; the median is reported")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of every variant, in rotated order, each in a fresh child; the fastest is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every child; 0 = torch's default")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per variant")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "bench_train.json")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table of ours and the peer (first size and dtype)")
    parser.add_argument("--padding", action="store_true",
                        help="measure per-batch padding against the fixed layout instead (see the module docstring)")
    parser.add_argument("--samples", type=int, default=16, help="--padding: timed training rows per configuration")
    parser.add_argument("--paired", action="store_true",
                        help="--padding: also time the same-row layouts back to back per micro-batch in one process "
                             "(--rounds passes, the fastest per micro-batch)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="--padding: tokenizer folder (default: ChatGLM3's)")
    args = parser.parse_args(argv)
    if args.padding:
        return padding_main(args)
    if args.quick:
        args.sizes, args.batch, args.prompt_len, args.answer_len, args.repeats = ["quick"], 2, 8, 8, 1
    sizes = [SHAPES[name] for name in args.sizes]
    dtypes = args.dtypes
    checkpointing = [c == "on" for c in args.checkpointing]

    info = machine_info()
    peak_size, peak_repeats = (256, 2) if args.quick else (2048, 5)
    peaks_before = matmul_peak(dtypes, args.threads, peak_size, peak_repeats)
    rows = []
    for shape in sizes:
        for dtype in dtypes:
            for ckpt in checkpointing:
                kwargs = {"shape": shape, "dtype": dtype, "checkpointing": ckpt, "batch": args.batch,
                          "prompt_len": args.prompt_len, "answer_len": args.answer_len, "repeats": args.repeats}
                label = f"{shape.name} {dtype} checkpointing={'on' if ckpt else 'off'}"
                results = run_variants(train_case, kwargs, merge_train_rounds, args.threads, args.timeout, args.rounds, label)
                for variant, result in results.items():
                    rows.append({"size": shape.name, "dtype": dtype, "checkpointing": "on" if ckpt else "off",
                                 "variant": variant, **result})
    # measured again after the cases: the larger of the two is the reference (a busy machine lowers one of them)
    peaks_after = matmul_peak(dtypes, args.threads, peak_size, peak_repeats)
    peaks = {dtype: max(peaks_before[dtype], peaks_after[dtype]) for dtype in dtypes}
    add_ratios(rows, peaks)
    info["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report = {
        "machine": info,
        "matmul_peak_gflops": peaks,
        "matmul_peak_gflops_before_after": {dtype: [peaks_before[dtype], peaks_after[dtype]] for dtype in dtypes},
        "settings": {"batch": args.batch, "prompt_len": args.prompt_len, "answer_len": args.answer_len,
                     "repeats": args.repeats, "rounds": args.rounds, "threads": rows[0].get("threads") if rows else None,
                     "prefix_len": {s.name: s.prefix for s in sizes}, "shapes": {s.name: vars(s) for s in sizes},
                     "memory": "peak RSS growth of a fresh child per variant (VmHWM - VmRSS at start)"},
        "rows": rows,
        "goals": goals(rows),
    }
    print(f"\n## Training step (P-tuning v2), {args.batch} x ({args.prompt_len}+{args.answer_len}) tokens\n")
    print(machine_line(info))
    threads = report["settings"]["threads"]
    print(f"matmul peak (GFLOP/s, {threads} thread(s)): " + ", ".join(f"{k} {v}" for k, v in peaks.items()) + "\n")
    print(markdown(rows, COLUMNS))
    print("\n### Goals (ours against the PEFT peer at equal settings)\n")
    print(markdown(report["goals"], GOAL_COLUMNS))
    if args.profile:
        if args.threads:
            torch.set_num_threads(args.threads)
        report["profile"] = {}
        for variant in (OURS, PEER):
            table = profile_step(sizes[0], variant, dtypes[0], args.batch, args.prompt_len, args.answer_len, top=30)
            report["profile"][variant] = table
            print(f"\n### Profile: {variant}, {sizes[0].name} {dtypes[0]}\n\n{table}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.output}")
    return report


if __name__ == "__main__":
    main()
