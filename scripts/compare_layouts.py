"""Train the same rows in three batch layouts and show that only the speed differs.

Each optimizer step sees the same N rows laid out as batch N, as batch 1 x gradient accumulation
N, and as 2 ranks (torchrun, gloo) x batch N/2. The logged loss of a step is the mean over that
step's label tokens in every layout, so the three loss curves and the trained prefixes agree.
Writes `layouts.md` and `layouts.json` into --output_dir (and each run's own folder).

    python scripts/compare_layouts.py                      # the embedded model on data_samples/
    python scripts/compare_layouts.py --model_name_or_path /models/chatglm2-6b --rows_per_step 16 ...
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _layouts(rows: int) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (launcher prefix, layout flags)."""
    python = [sys.executable, "-m", "chatglm_ptuning.train"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    return {
        f"batch {rows}": (python, ["--per_device_train_batch_size", str(rows), "--gradient_accumulation_steps", "1"]),
        f"batch 1 x accumulation {rows}": (python, ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", str(rows)]),
        f"2 ranks x batch {rows // 2}": (
            [*torchrun, "-m", "chatglm_ptuning.train"],
            ["--per_device_train_batch_size", str(rows // 2), "--gradient_accumulation_steps", "1", "--ddp_backend", "gloo"],
        ),
    }


def _prefix(checkpoint: Path):  # noqa: ANN202 - a dict of tensors
    from safetensors.torch import load_file

    return load_file(checkpoint / "model.safetensors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=str(REPO_ROOT / "chatglm_ptuning" / "embedded"))
    parser.add_argument("--train_file", default=str(REPO_ROOT / "data_samples" / "adgen_train.json"))
    parser.add_argument("--rows_per_step", type=int, default=16, help="rows per optimizer step (even)")
    parser.add_argument("--max_steps", type=int, default=5)
    parser.add_argument("--pre_seq_len", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-2)
    parser.add_argument("--output_dir", default="output/compare-layouts")
    args, extra = parser.parse_known_args(argv)
    if args.rows_per_step < 2 or args.rows_per_step % 2:
        parser.error(f"--rows_per_step must be an even number >= 2, found {args.rows_per_step}")
    out = Path(args.output_dir)
    common = [
        "--do_train", "--model_name_or_path", args.model_name_or_path, "--train_file", args.train_file,
        "--prompt_column", "content", "--response_column", "summary", "--max_source_length", "64",
        "--max_target_length", "96", "--pre_seq_len", str(args.pre_seq_len), "--prefix_projection",
        "--learning_rate", str(args.learning_rate), "--max_steps", str(args.max_steps), "--logging_steps", "1",
        "--save_steps", str(args.max_steps), "--max_train_samples", str(args.rows_per_step * args.max_steps),
        "--max_grad_norm", "0", "--dataloader_drop_last", "--seed", "42", "--overwrite_output_dir",
        "--report_to", "none", *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    results = {}
    for index, (name, (launcher, layout)) in enumerate(_layouts(args.rows_per_step).items()):
        run_dir = out / f"layout{index}"
        cmd = [*launcher, *common, *layout, "--output_dir", str(run_dir)]
        print(f"{name}: {' '.join(cmd)}", flush=True)
        done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            return done.returncode
        state = json.loads((run_dir / "trainer_state.json").read_text())
        results[name] = {
            "losses": [entry["loss"] for entry in state["log_history"] if "loss" in entry],
            "checkpoint": str(run_dir / f"checkpoint-{args.max_steps}"),
        }
    names = list(results)
    reference = _prefix(Path(results[names[0]]["checkpoint"]))
    lines = ["| layout | logged losses | max relative prefix difference |", "|---|---|---|"]
    for name in names:
        prefix = _prefix(Path(results[name]["checkpoint"]))
        difference = max(((prefix[k] - v).norm() / v.norm()).item() for k, v in reference.items())
        results[name]["max_relative_prefix_difference"] = difference
        losses = ", ".join(f"{loss:.4f}" for loss in results[name]["losses"])
        lines.append(f"| {name} | {losses} | {difference:.1e} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "layouts.md").write_text("\n".join(lines) + "\n")
    (out / "layouts.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
