"""Generation throughput and time to first token, with and without a P-tuning v2 prefix, against
transformers + PEFT, in one run.

For each model shape, dtype and batch size, greedy `generate()` runs on the same seeded prompts
(`--prompt-len` tokens, no padding) for the four variants of scripts/bench_train.py (ours with and
without a prefix; GlmForCausalLM with a PEFT PrefixTuningConfig prefix, and alone):

- time to first token: `generate(max_new_tokens=1)` (prefill, prefix computation, first token);
- generation: `generate(max_new_tokens=N, min_new_tokens=N)`, so every variant makes N tokens per row;
  tokens/s = batch * N / time, decode tokens/s = batch * (N - 1) / (time - time to first token).

Medians of `--repeats` runs after one warm-up, each variant and batch size in a fresh child process
(scripts/bench_common.py), whose peak memory growth is reported too. `generate_matches_forward` checks
that generate()'s first-step logits equal a plain forward's: PEFT 0.21's prefix tuning on transformers
5.x applies its prefix in forward() but drops it in generate() (the peer then generates as if it had
no prefix, doing less work than a P-tuned model must).

    python -m scripts.bench_generate                     # tiny and mid, fp32, batch 1 and 8
    python -m scripts.bench_generate --sizes mid --profile
    python -m scripts.bench_generate --quick             # smoke test (used by the tests)
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
    machine_info,
    machine_line,
    markdown,
    merge_rounds,
    run_variants,
)

REPO = Path(__file__).resolve().parents[1]
BASELINE = {OURS: PEER, OURS_NO_PREFIX: PEER_NO_PREFIX}
NO_PREFIX = {OURS: OURS_NO_PREFIX, PEER: PEER_NO_PREFIX}


def prompts(vocab: int, batch: int, prompt_len: int) -> torch.Tensor:
    """Seeded prompt ids [batch, prompt_len], the same for every variant."""
    return torch.randint(3, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(2))


class Generate:
    """Greedy generation of exactly `new_tokens` tokens per row on fixed prompts; callable."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor):
        self.model = model
        self.ids = ids
        self.attention_mask = torch.ones_like(ids)

    def __call__(self, new_tokens: int, **kwargs):
        return self.model.generate(
            input_ids=self.ids, attention_mask=self.attention_mask, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=2, **kwargs,
        )

    def first_step_matches_forward(self) -> tuple[bool, float]:
        """Whether generate()'s first-step logits equal a plain forward's last-position logits: False
        when generate() drops the prefix the forward applies. Returns (match, max |diff| / logit range)."""
        first = self(1, return_dict_in_generate=True, output_logits=True).logits[0].float()
        reference = self.model(input_ids=self.ids, attention_mask=self.attention_mask).logits[:, -1].float()
        error = float((first - reference).abs().max() / (reference.max() - reference.min()))
        return error < 1e-2, error


def _median_seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def generate_case(shape: ModelShape, variant: str, dtype: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Runs in a child: time to first token and N-token generation, medians after a warm-up."""
    model = build_model(shape, variant, DTYPES[dtype]).eval()
    generate = Generate(model, prompts(shape.vocab, batch, prompt_len))
    with torch.inference_mode():
        produced = generate(new_tokens).shape[1] - prompt_len
        if produced != new_tokens:
            raise RuntimeError(f"generate() made {produced} tokens per row, expected {new_tokens}")
        first = _median_seconds(lambda: generate(1), repeats)
        total = _median_seconds(lambda: generate(new_tokens), repeats)
        matches, error = generate.first_step_matches_forward()
    return {
        "generate_matches_forward": matches,
        "first_step_relative_error": float(f"{error:.3g}"),
        "batch": batch,
        "new_tokens": new_tokens,
        **_rates(first, total, batch, new_tokens),
    }


def _rates(first_s: float, total_s: float, batch: int, new_tokens: int) -> dict:
    return {
        "ttft_ms": round(first_s * 1e3, 2),
        "generate_s": round(total_s, 4),
        "tokens_per_s": round(batch * new_tokens / total_s, 2),
        # None when noise makes the N-token median no longer than the one-token median
        "decode_tokens_per_s": round(batch * (new_tokens - 1) / (total_s - first_s), 2) if total_s > first_s else None,
    }


def merge_generate_rounds(runs: list[dict]) -> dict:
    """A variant's row from its rounds: the fastest round's times (and the rates from them), the largest
    peak memory."""
    row = merge_rounds(runs, ("ttft_ms", "generate_s"))
    row["generate_matches_forward"] = all(run["generate_matches_forward"] for run in runs)
    row.update(_rates(row["ttft_ms"] / 1e3, row["generate_s"], row["batch"], row["new_tokens"]))
    return row


def add_ratios(rows: list[dict]) -> None:
    """Ours against the peer (tokens/s: > 1 is faster; time to first token: < 1 is faster) and the
    prefix's overhead on decoding (decode time with the prefix over without, minus 1)."""
    by_key = {(r["size"], r["dtype"], r["batch"], r["variant"]): r for r in rows}
    for row in rows:
        if "error" in row:
            continue
        setting = (row["size"], row["dtype"], row["batch"])
        peer = by_key.get((*setting, BASELINE.get(row["variant"])))
        if peer is not None and "error" not in peer:
            row["x_peer_tokens_per_s"] = round(row["tokens_per_s"] / peer["tokens_per_s"], 3)
            row["x_peer_ttft"] = round(row["ttft_ms"] / peer["ttft_ms"], 3)
        bare = by_key.get((*setting, NO_PREFIX.get(row["variant"])))
        if bare is not None and "error" not in bare and row["decode_tokens_per_s"] and bare["decode_tokens_per_s"]:
            row["prefix_decode_overhead"] = round(bare["decode_tokens_per_s"] / row["decode_tokens_per_s"] - 1, 3)


COLUMNS = [
    "size", "dtype", "batch", "variant", "ttft_ms", "tokens_per_s", "decode_tokens_per_s", "x_peer_tokens_per_s",
    "x_peer_ttft", "prefix_decode_overhead", "peak_growth_mib", "generate_matches_forward", "error",
]


def profile_generation(shape: ModelShape, variant: str, dtype: str, batch: int, prompt_len: int, new_tokens: int, top: int) -> str:
    """torch.profiler table (self CPU time) of one N-token generate() after a warm-up, in this process."""
    from torch.profiler import ProfilerActivity, profile

    model = build_model(shape, variant, DTYPES[dtype]).eval()
    generate = Generate(model, prompts(shape.vocab, batch, prompt_len))
    with torch.inference_mode():
        generate(new_tokens)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(new_tokens)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the smoke-test size, 4 new tokens, one timed run")
    parser.add_argument("--sizes", type=comma_separated(sorted(SHAPES)), default="tiny,mid", help=f"comma-separated, from {sorted(SHAPES)}")
    parser.add_argument("--dtypes", type=comma_separated(sorted(DTYPES)), default="fp32", help="comma-separated, from fp32,bf16")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant and round; the median is reported")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of every variant, in rotated order, each in a fresh child; the fastest is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every child; 0 = torch's default")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per variant and batch size")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "bench_generate.json")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table of ours and the peer (first size, dtype, batch)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.prompt_len, args.new_tokens, args.repeats = ["quick"], 8, 4, 1
    sizes = [SHAPES[name] for name in args.sizes]
    dtypes = args.dtypes
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    info = machine_info()
    rows = []
    for shape in sizes:
        for dtype in dtypes:
            for batch in batch_sizes:
                kwargs = {"shape": shape, "dtype": dtype, "batch": batch, "prompt_len": args.prompt_len,
                          "new_tokens": args.new_tokens, "repeats": args.repeats}
                label = f"{shape.name} {dtype} batch {batch}"
                results = run_variants(generate_case, kwargs, merge_generate_rounds, args.threads, args.timeout, args.rounds, label)
                for variant, result in results.items():
                    rows.append({"size": shape.name, "dtype": dtype, "variant": variant, **result, "batch": batch})
    add_ratios(rows)
    info["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report = {
        "machine": info,
        "settings": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "rounds": args.rounds, "threads": rows[0].get("threads") if rows else None, "prefix_len": {s.name: s.prefix for s in sizes},
                     "shapes": {s.name: vars(s) for s in sizes}},
        "rows": rows,
    }
    print(f"\n## Generation (greedy), {args.prompt_len}-token prompts, {args.new_tokens} new tokens\n")
    print(machine_line(info) + "\n")
    print(markdown(rows, COLUMNS))
    if args.profile:
        if args.threads:
            torch.set_num_threads(args.threads)
        report["profile"] = {}
        for variant in (OURS, PEER):
            table = profile_generation(sizes[0], variant, dtypes[0], batch_sizes[0], args.prompt_len, args.new_tokens, top=30)
            report["profile"][variant] = table
            print(f"\n### Profile: {variant}, {sizes[0].name} {dtypes[0]} batch {batch_sizes[0]}\n\n{table}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.output}")
    return report


if __name__ == "__main__":
    main()
