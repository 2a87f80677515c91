"""Run every benchmark and collect the results: `benchmarks/results.json`, `benchmarks/results.md`
(the Markdown tables, headed by the machine they ran on) and `benchmarks/results.png` (a chart).

Benchmarks, in this order: training (scripts/bench_train.py), generation (scripts/bench_generate.py),
evaluation (scripts/bench_eval.py), quantized linears (scripts/bench_quant.py); each script's own JSON
lands beside the results. A benchmark that fails is recorded under `errors` and the rest still run;
the exit status is then 1.

    python -m scripts.bench                       # full run (tens of minutes on a 2-core CPU)
    python -m scripts.bench --rounds 2            # ... each variant twice, in rotated order (steadier on a shared machine)
    python -m scripts.bench --readme README.md    # ... and put the tables in README's benchmark section
    python -m scripts.bench --quick --output-dir /tmp/bench   # smoke test (used by the tests)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from scripts import bench_eval, bench_generate, bench_quant, bench_train
from scripts.bench_common import (
    OURS,
    OURS_NO_PREFIX,
    PEER,
    PEER_NO_PREFIX,
    machine_info,
    machine_line,
    markdown,
)

REPO = Path(__file__).resolve().parents[1]
README_START = "<!-- benchmarks:start -->"
README_END = "<!-- benchmarks:end -->"
BENCHMARKS: dict[str, Callable[[list[str]], dict]] = {
    "train": bench_train.main,
    "generate": bench_generate.main,
    "eval": bench_eval.main,
    "quant": bench_quant.main,
}


class _Tee(io.TextIOBase):
    """Writes to the real stdout and keeps a copy (each script prints its own tables)."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.stream.write(text)
        return self.copy.write(text)

    def flush(self) -> None:
        self.stream.flush()


def _tables_only(printed: str) -> str:
    """A script's printed report without its progress lines (indented) and its 'written to' line."""
    lines = [line for line in printed.splitlines() if not line.startswith("  ") and not line.startswith("written to")]
    return "\n".join(lines).strip()


THREADED = ("train", "generate", "quant")  # the benchmarks that take --threads
ROUNDED = ("train", "generate")  # the benchmarks that take --rounds


def run_all(
    names: list[str], quick: bool, output_dir: Path, threads: int | None = None, rounds: int | None = None
) -> tuple[dict, dict[str, str]]:
    """Run the named benchmarks (with `--threads` / `--rounds` where they take them, when given); returns
    their reports (or errors) and their printed tables."""
    results: dict = {"errors": {}}
    sections: dict[str, str] = {}
    for name in names:
        argv = (["--quick"] if quick else []) + ["--output", str(output_dir / f"bench_{name}.json")]
        if threads is not None and name in THREADED:
            argv += ["--threads", str(threads)]
        if rounds is not None and name in ROUNDED:
            argv += ["--rounds", str(rounds)]
        print(f"\n# {name}: {' '.join(argv)}", flush=True)
        tee = _Tee(sys.stdout)
        process_threads = torch.get_num_threads()
        try:
            with contextlib.redirect_stdout(tee):
                results[name] = BENCHMARKS[name](argv)
        except Exception as err:  # noqa: BLE001 - one broken benchmark must not lose the others' results
            results["errors"][name] = f"{type(err).__name__}: {err}"
            print(f"{name} failed: {results['errors'][name]}", flush=True)
        finally:
            torch.set_num_threads(process_threads)  # bench_quant sets its own; callers keep theirs
        sections[name] = _tables_only(tee.copy.getvalue())
    return results, sections


def chart(results: dict, path: Path) -> None:
    """Bars: training tokens/s per setting and generation tokens/s per batch size, ours beside the peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if "train" in results:
        panels.append(("Training tokens/s (P-tuning v2 step)", results["train"]["rows"],
                       lambda r: f"{r['size']} {r['dtype']}\nckpt {r['checkpointing']}"))
    if "generate" in results:
        panels.append(("Generation tokens/s (greedy)", results["generate"]["rows"],
                       lambda r: f"{r['size']} {r['dtype']}\nbatch {r['batch']}"))
    figure, axes = plt.subplots(1, max(len(panels), 1), figsize=(7 * max(len(panels), 1), 4.5), squeeze=False)
    variants = (OURS, PEER, OURS_NO_PREFIX, PEER_NO_PREFIX)
    width = 0.8 / len(variants)
    for axis, (title, rows, label) in zip(axes[0], panels):
        groups = list(dict.fromkeys(label(r) for r in rows))
        for i, variant in enumerate(variants):
            values = {label(r): r.get("tokens_per_s") or 0 for r in rows if r["variant"] == variant}
            axis.bar([g + i * width for g in range(len(groups))], [values.get(g, 0) for g in groups], width, label=variant)
        axis.set_xticks([g + width * (len(variants) - 1) / 2 for g in range(len(groups))], groups, fontsize=8)
        axis.set_yscale("log")
        axis.set_title(title)
        axis.legend(fontsize=8)
    figure.suptitle(machine_line(results["machine"]), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report_markdown(results: dict, sections: dict[str, str]) -> str:
    header = [
        "# Benchmarks",
        "",
        f"Run {results['generated_at']} on: {machine_line(results['machine'])}"
        + (" (quick mode: smoke-test sizes, not figures to quote)" if results["quick"] else ""),
    ]
    if results["errors"]:
        header += ["", "Failed: " + "; ".join(f"{k}: {v}" for k, v in results["errors"].items())]
    body = [f"{text}" for text in sections.values() if text]
    return "\n\n".join(["\n".join(header), *body]) + "\n"


def update_readme(readme: Path, results: dict) -> None:
    """Replace README's benchmark section (between the marker comments; appended when absent) with the
    machine line, the training goals and the training and generation tables."""
    intro = (
        f"Latest run ({results['generated_at']}): {machine_line(results['machine'])}. "
        "All tables: [benchmarks/results.md](benchmarks/results.md); chart: "
        "[benchmarks/results.png](benchmarks/results.png). Re-run: `python -m scripts.bench --readme README.md`."
    )
    parts = [README_START, "## Benchmarks", "", intro]
    if "train" in results:
        parts += ["", "Training (P-tuning v2 step), ours against PEFT + GlmForCausalLM:", "",
                  markdown(results["train"]["goals"], bench_train.GOAL_COLUMNS),
                  "", markdown(results["train"]["rows"], bench_train.COLUMNS)]
    if "generate" in results:
        parts += ["", "Generation:", "", markdown(results["generate"]["rows"], bench_generate.COLUMNS)]
    section = "\n".join(parts + [README_END])
    text = readme.read_text(encoding="utf-8")
    if README_START in text and README_END in text:
        before, rest = text.split(README_START, 1)
        text = before + section + rest.split(README_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    readme.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark's smoke-test mode")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {list(BENCHMARKS)}")
    parser.add_argument("--output-dir", type=Path, default=REPO / "benchmarks")
    parser.add_argument("--readme", type=Path, default=None, help="update this README's benchmark section")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for train, generate and quant (0 = torch's default); default: each script's own")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of every variant for train and generate (the fastest is reported); default: theirs (1)")
    args = parser.parse_args(argv)
    names = args.only.split(",")
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    args.output_dir.mkdir(parents=True, exist_ok=True)

    machine = machine_info()
    results, sections = run_all(names, args.quick, args.output_dir, args.threads, args.rounds)
    results.update(machine=machine, quick=args.quick,
                   generated_at=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    (args.output_dir / "results.md").write_text(report_markdown(results, sections), encoding="utf-8")
    chart(results, args.output_dir / "results.png")
    if args.readme is not None:
        update_readme(args.readme, results)
    print(f"\nwritten: {args.output_dir / 'results.json'}, results.md, results.png")
    return results


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
