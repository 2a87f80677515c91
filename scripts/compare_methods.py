"""Compare every tuning method on the same data with the same budget.

Each method trains with `python -m chatglm_ptuning.train` (in a child process of its own, so peak
memory is its own), with the same model, data, steps, batch, sequence lengths and greedy
evaluation on the dev file; only the method's own settings and learning rate differ. Written to
--output_dir:
- `methods.md` and `methods.json`: trainable parameters (and their share of the model), peak
  memory, time per training step, final training loss, dev ROUGE-1/2/L and BLEU-4;
- `loss_curves.png`: the training loss of every method against the step;
- `<method>/`: each run's own output folder (checkpoint, trainer state, eval results).

    python scripts/compare_methods.py                      # the embedded model on data_samples/
    python scripts/compare_methods.py --model_name_or_path /models/chatglm2-6b --max_steps 300 \\
        --pre_seq_len 128 --quantization_bit 4 --train_file AdvertiseGen/train.json ...

Peak memory is the peak GPU memory allocated on CUDA; on CPU it is the peak resident memory of
the run above what the process held once its libraries were imported (model, data, activations,
optimizer states, evaluation; allocator noise of some MiB included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from chatglm_ptuning.prompt_learning import METHODS  # noqa: E402 - after the path insert
# Per-method learning rates for a short run: each method's usual scale (the reference's 2e-2 for
# P-tuning v2, Lester et al.'s 0.3 for Prompt Tuning, 5e-4..1e-3 for LoRA/P-tuning encoders, 1e-4
# for full fine-tuning of large models, raised where a tiny model and few steps need it).
LEARNING_RATES = {
    "ptuning_v2": 2e-2,
    "prefix_tuning": 5e-3,
    "prompt_tuning": 3e-1,
    "ptuning": 3e-3,
    "lora": 2e-3,
    "full": 5e-4,
}
MEMORY_FILE = "peak_memory.json"


def _rss_bytes() -> int:
    """Current resident memory of this process (Linux /proc; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def run_child(output_dir: str, train_argv: list[str]) -> int:
    """Child process: run the training CLI and record its peak memory into output_dir."""
    # Import (and initialise) every library the run uses first, so the baseline holds them.
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import jieba
    import peft  # noqa: F401
    import torch
    import transformers.trainer  # noqa: F401

    from chatglm_ptuning.train import main

    jieba.initialize()
    baseline = _rss_bytes()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    code = main(train_argv)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    memory = {"rss_baseline_bytes": baseline, "rss_peak_bytes": peak_rss}
    if cuda:
        memory["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    Path(output_dir, MEMORY_FILE).write_text(json.dumps(memory, indent=2) + "\n")
    return code


def method_flags(method: str, args: argparse.Namespace) -> list[str]:
    """The method's own settings (everything else is shared)."""
    flags = ["--method", method]
    if method in ("ptuning_v2", "prefix_tuning", "prompt_tuning", "ptuning"):
        flags += ["--pre_seq_len", str(args.pre_seq_len)]
    if method == "ptuning_v2" and args.prefix_projection:
        flags += ["--prefix_projection"]
    if method == "ptuning":
        flags += ["--encoder_type", args.encoder_type]
    if method == "lora":
        flags += ["--lora_rank", str(args.lora_rank)]
    if args.quantization_bit and method != "full":  # full fine-tuning needs a dense backbone
        flags += ["--quantization_bit", str(args.quantization_bit)]
    return flags


def train_argv(method: str, args: argparse.Namespace, output_dir: Path) -> list[str]:
    lr = args.learning_rate.get(method, LEARNING_RATES[method])
    return [
        "--model_name_or_path", str(args.model_name_or_path),
        "--train_file", str(args.train_file), "--validation_file", str(args.validation_file),
        "--prompt_column", args.prompt_column, "--response_column", args.response_column,
        "--do_train", "--do_eval", "--predict_with_generate", "--do_sample", "False",
        "--output_dir", str(output_dir), "--overwrite_output_dir",
        "--max_source_length", str(args.max_source_length), "--max_target_length", str(args.max_target_length),
        "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", str(args.eval_batch_size),
        "--max_steps", str(args.max_steps), "--logging_steps", str(args.logging_steps),
        "--save_steps", str(args.max_steps), "--learning_rate", str(lr), "--seed", str(args.seed),
        "--max_eval_samples", str(args.max_eval_samples), "--gradient_checkpointing", str(args.gradient_checkpointing),
        "--report_to", "none", *method_flags(method, args), *args.extra,
    ]


def summarise(method: str, run_dir: Path, lr: float) -> dict:
    """One row of the table from a finished run's files."""
    train = json.loads((run_dir / "train_results.json").read_text())
    evaluation = json.loads((run_dir / "eval_results.json").read_text())
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    losses = [(e["step"], e["loss"]) for e in history if "loss" in e]
    memory = json.loads((run_dir / MEMORY_FILE).read_text())
    if "cuda_peak_bytes" in memory:
        peak, kind = memory["cuda_peak_bytes"], "cuda"
    else:
        peak, kind = memory["rss_peak_bytes"] - memory["rss_baseline_bytes"], "cpu_rss_over_baseline"
    steps = max(step for step, _ in losses)
    return {
        "method": method,
        "learning_rate": lr,
        "trainable_parameters": train["trainable_parameters"],
        "total_parameters": train["total_parameters"],
        "trainable_share": train["trainable_parameters"] / train["total_parameters"],
        "peak_memory_mib": peak / 2**20,
        "peak_memory_kind": kind,
        "step_time_s": train["train_runtime"] / steps,
        "final_train_loss": losses[-1][1],
        "rouge-1": evaluation["eval_rouge-1"],
        "rouge-2": evaluation["eval_rouge-2"],
        "rouge-l": evaluation["eval_rouge-l"],
        "bleu-4": evaluation["eval_bleu-4"],
        "loss_curve": losses,
    }


def markdown_table(rows: list[dict]) -> str:
    header = (
        "| method | trainable params | share | peak memory (MiB) | step time (s) | final train loss "
        "| ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU-4 |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['method']} | {r['trainable_parameters']:,} | {100 * r['trainable_share']:.3g}% | {r['peak_memory_mib']:.0f} "
        f"| {r['step_time_s']:.3f} | {r['final_train_loss']:.3f} | {r['rouge-1']:.2f} | {r['rouge-2']:.2f} "
        f"| {r['rouge-l']:.2f} | {r['bleu-4']:.2f} |"
        for r in rows
    ]
    return header + "\n".join(lines) + "\n"


def describe_setup(args: argparse.Namespace, rows: list[dict]) -> str:
    """One paragraph saying what the table measured."""
    memory = "peak GPU memory allocated" if rows and rows[0]["peak_memory_kind"] == "cuda" else (
        "peak resident memory above the imported libraries (CPU)"
    )
    rates = ", ".join(f"{r['method']} {r['learning_rate']:g}" for r in rows)
    bits = f", INT{args.quantization_bit} backbone (full: dense)" if args.quantization_bit else ""
    return (
        f"Model `{Path(args.model_name_or_path).name}`{bits}; {args.max_steps} steps of batch {args.batch_size} "
        f"from `{Path(args.train_file).name}` (prompt/response up to {args.max_source_length}/{args.max_target_length} "
        f"tokens); soft prompts of {args.pre_seq_len} virtual tokens, LoRA rank {args.lora_rank}; learning rates: {rates}. "
        f"Scores: greedy generation on the first {args.max_eval_samples} rows of `{Path(args.validation_file).name}`. "
        f"Memory: {memory}. Step time: training time / steps."
    )


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        steps, losses = zip(*row["loss_curve"])
        ax.plot(steps, losses, label=row["method"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss by method (same data, steps and batch)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _learning_rates(text: str) -> dict[str, float]:
    """"lora=1e-3,full=1e-4" -> {"lora": 0.001, "full": 0.0001}."""
    rates = {}
    for item in filter(None, text.split(",")):
        method, _, value = item.partition("=")
        if method not in METHODS or not value:
            raise argparse.ArgumentTypeError(f"expected METHOD=RATE with METHOD in {', '.join(METHODS)}, found {item!r}")
        rates[method] = float(value)
    return rates


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", default=str(REPO_ROOT / "chatglm_ptuning" / "embedded"))
    parser.add_argument("--train_file", default=str(REPO_ROOT / "data_samples" / "adgen_train.json"))
    parser.add_argument("--validation_file", default=str(REPO_ROOT / "data_samples" / "adgen_dev.json"))
    parser.add_argument("--prompt_column", default="content")
    parser.add_argument("--response_column", default="summary")
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "output" / "compare_methods"))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset, in table order")
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--eval_batch_size", type=int, default=8)
    parser.add_argument("--max_eval_samples", type=int, default=20)
    parser.add_argument("--max_source_length", type=int, default=64)
    parser.add_argument("--max_target_length", type=int, default=64)
    parser.add_argument("--logging_steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--pre_seq_len", type=int, default=16, help="virtual tokens of the soft-prompt methods")
    parser.add_argument("--prefix_projection", action="store_true", help="ptuning_v2 with the MLP reparameterisation")
    parser.add_argument("--encoder_type", default="lstm", choices=("lstm", "mlp"), help="ptuning's prompt encoder")
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--quantization_bit", type=int, choices=(4, 8), help="quantized backbone (not for full)")
    parser.add_argument("--gradient_checkpointing", default="False", choices=("True", "False"), help="for every method")
    parser.add_argument("--learning_rate", type=_learning_rates, default={}, help="overrides, e.g. lora=1e-3,full=1e-4")
    parser.add_argument("extra", nargs="*", help="after --: more flags for chatglm_ptuning.train, given to every run")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if not Path(args.model_name_or_path, "config.json").is_file():
        parser.error(f"{args.model_name_or_path} is not a model folder (no config.json)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return run_child(argv[1], argv[2:])
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods:
        run_dir = out / method
        run_dir.mkdir(parents=True, exist_ok=True)
        started = time.time()
        with open(run_dir / "run.log", "w") as log:
            code = subprocess.call(
                [sys.executable, str(Path(__file__).resolve()), "--child", str(run_dir), *train_argv(method, args, run_dir)],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            )
        if code != 0:
            print(f"error: {method} failed (exit {code}); see {run_dir / 'run.log'}", file=sys.stderr)
            return 1
        rows.append(summarise(method, run_dir, args.learning_rate.get(method, LEARNING_RATES[method])))
        print(f"{method}: done in {time.time() - started:.0f} s, final loss {rows[-1]['final_train_loss']:.3f}", flush=True)

    setup = {k: v for k, v in vars(args).items() if k not in ("learning_rate", "output_dir")}
    (out / "methods.json").write_text(json.dumps({"setup": setup, "results": rows}, indent=2, ensure_ascii=False) + "\n")
    table = markdown_table(rows)
    (out / "methods.md").write_text(describe_setup(args, rows) + "\n\n" + table)
    plot_curves(rows, out / "loss_curves.png")
    print(table)
    print(f"written: {out / 'methods.md'}, {out / 'methods.json'}, {out / 'loss_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
