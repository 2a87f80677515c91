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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from scripts.bench_common import (
    DTYPES,
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
    args = parser.parse_args(argv)
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
