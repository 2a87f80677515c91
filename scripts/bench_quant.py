"""Benchmark the weight-only INT8/INT4 linear layers against dense fp32/bf16 layers.

For each weight shape [N, K] and activation row count M, times the forward and the
forward+backward-to-input (frozen weight, as in P-tuning) of:
dense fp32 (nn.Linear, the baseline), dense fp32 through the model's BlockedLinear (column blocks
for few rows), dense bf16, and QuantizedLinear INT8/INT4 with fp32 and bf16 activations. Reports the median of `--repeats` runs after one warm-up, the ratio to dense fp32
measured in the same rounds, and the bytes each variant stores for the weight. Prints a Markdown
table; `--output` also writes the rows as JSON.

    python scripts/bench_quant.py --output bench_quant.json
    python scripts/bench_quant.py --quick        # tiny shapes, one run (used by the tests)

The report is made of sections, each a function returning rows (`bench_linears`); whole-model
sections plug into `main` beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chatglm_ptuning.linear import BlockedLinear
from chatglm_ptuning.quantization import QuantizedLinear, _cpu_has_native_bf16

FULL_SHAPES = [(4096, 4096), (4096, 13696)]  # (K = in_features, N = out_features)
FULL_ROWS = [1, 16, 256]
QUICK_SHAPES = [(64, 64), (64, 96)]
QUICK_ROWS = [1, 4, 40]
MODES = ("forward", "forward+backward")


def _time_round_robin(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """ms of each step per round; one warm-up call first. Alternating the steps within each
    round spreads any load from other processes evenly over the variants being compared."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _variants(in_features: int, out_features: int) -> dict[str, tuple[nn.Module, torch.dtype]]:
    """name -> (frozen layer, activation dtype). Weights have the std of a trained 6B layer."""
    dense = nn.Linear(in_features, out_features, bias=False)
    nn.init.normal_(dense.weight, std=0.02)
    dense.requires_grad_(False)
    bf16 = nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    bf16.weight.copy_(dense.weight)
    blocked = BlockedLinear(in_features, out_features, bias=False).requires_grad_(False)
    blocked.weight.copy_(dense.weight)
    int8 = QuantizedLinear.from_linear(dense, 8)
    int4 = QuantizedLinear.from_linear(dense, 4)
    return {
        "dense fp32": (dense, torch.float32),
        "dense fp32, column blocks": (blocked, torch.float32),
        "dense bf16": (bf16, torch.bfloat16),
        "int8 fp32": (int8, torch.float32),
        "int8 bf16": (int8, torch.bfloat16),
        "int4 fp32": (int4, torch.float32),
        "int4 bf16": (int4, torch.bfloat16),
    }


def _weight_bytes(layer: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in layer.parameters())


def _step(layer: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    if mode == "forward":

        def forward() -> None:
            with torch.no_grad():
                layer(x)

        return forward
    x = x.detach().requires_grad_()
    grad_out = torch.ones(x.shape[0], layer.out_features, dtype=x.dtype)

    def forward_backward() -> None:
        x.grad = None
        layer(x).backward(grad_out)

    return forward_backward


def bench_linears(shapes: list[tuple[int, int]], rows: list[int], repeats: int) -> list[dict]:
    """One row per (shape, M, mode, variant): median and min ms, and the median's ratio to dense fp32."""
    results = []
    for in_features, out_features in shapes:
        torch.manual_seed(0)
        variants = _variants(in_features, out_features)
        for m in rows:
            x = torch.randn(m, in_features)
            for mode in MODES:
                steps = {name: _step(layer, x.to(dtype), mode) for name, (layer, dtype) in variants.items()}
                times = _time_round_robin(steps, repeats)
                baseline = statistics.median(times["dense fp32"])
                for name, (layer, _) in variants.items():
                    median = statistics.median(times[name])
                    results.append(
                        {
                            "K": in_features,
                            "N": out_features,
                            "M": m,
                            "mode": mode,
                            "variant": name,
                            "ms": round(median, 3),
                            "min_ms": round(min(times[name]), 3),
                            "vs_dense_fp32": round(median / baseline, 3),
                            "weight_bytes": _weight_bytes(layer),
                        }
                    )
    return results


def markdown(rows: list[dict]) -> str:
    lines = [
        "| K | N | M | mode | variant | ms (median) | ms (min) | x dense fp32 | weight MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['K']} | {r['N']} | {r['M']} | {r['mode']} | {r['variant']} | {r['ms']:.2f} | {r['min_ms']:.2f} | "
            f"{r['vs_dense_fp32']:.2f} | {r['weight_bytes'] / 2**20:.2f} |"
        )
    return "\n".join(lines)


def bench_accuracy(models: dict[str, Path], texts: list[str]) -> list[dict]:
    """Logits of INT8/INT4 against the same model in fp32: max |diff| and top-1 agreement."""
    from chatglm_ptuning.loading import load_model, load_model_weights

    rows = []
    for label, folder in models.items():
        dense, tokenizer = load_model(folder, device="cpu", dtype=torch.float32)
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        real = batch["attention_mask"].bool()
        with torch.no_grad():
            reference = dense(**batch).logits[real]
        for bits in (8, 4):
            model = load_model_weights(folder, quantization_bit=bits, device="cpu", dtype=torch.float32)
            with torch.no_grad():
                logits = model(**batch).logits[real]
            rows.append({
                "model": label, "bits": bits, "positions": int(real.sum()),
                "max_abs_diff": round(float((logits - reference).abs().max()), 4),
                "logit_range": round(float(reference.max() - reference.min()), 2),
                "top1_agreement": round(float((logits.argmax(-1) == reference.argmax(-1)).float().mean()), 4),
            })
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and one run (a smoke test)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads; 0 keeps torch's default (default: 1, stable timings)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case; the median is reported")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--accuracy", action="store_true", help="add INT8/INT4 vs fp32 logits on the embedded and a mid-size model")
    parser.add_argument(
        "--model-memory", action="store_true",
        help="add 6B-shape loading/training memory (writes ~12 GiB synthetic checkpoints per architecture; minutes)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/chatglm-bench-6b"), help="where --model-memory writes")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes, rows = (QUICK_SHAPES, QUICK_ROWS) if args.quick else (FULL_SHAPES, FULL_ROWS)
    repeats = 1 if args.quick else args.repeats

    report = {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": _cpu_has_native_bf16(),  # decides the CPU kernels; dense bf16 speed depends on it too
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "linear": bench_linears(shapes, rows, repeats),
    }
    bf16 = "native" if report["native_bf16"] else "emulated"
    print(
        f"torch {report['torch']}, {report['cpu_capability']} ({bf16} bf16), {report['threads']} thread(s), median of {repeats}\n"
    )
    print(markdown(report["linear"]))
    if args.accuracy:
        report["accuracy"] = _accuracy_section(args.quick)
        print("\n" + table(report["accuracy"]))
    if args.model_memory:
        from scripts.bench_model_memory import bench_model_memory

        report["model_memory"] = bench_model_memory(["chatglm2", "chatglm"], [4, 8], args.workdir)
        print("\n" + table(report["model_memory"]))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
    return report


def _accuracy_section(quick: bool) -> list[dict]:
    import tempfile

    from scripts.bench_eval import EMBEDDED, TRAIN_FILE, _mid_size_model

    texts = [json.loads(line)["content"] for line in TRAIN_FILE.read_text(encoding="utf-8").splitlines()[:4 if quick else 16]]
    with tempfile.TemporaryDirectory() as tmp:
        models = {"embedded tiny (trained)": EMBEDDED}
        if not quick:
            models["mid h1024 x 8 layers (random)"] = _mid_size_model(Path(tmp) / "mid", 1024, 8)
        return bench_accuracy(models, texts)


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows])


if __name__ == "__main__":
    main()
