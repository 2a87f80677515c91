"""What the training and generation benchmarks share: model shapes, the two model builders (ours and
the transformers + PEFT peer), isolated measurement in a fresh child process, the machine's dense
matmul peak, and Markdown tables.

Isolation: every measured configuration runs in its own child process started by a multiprocessing
*forkserver* whose process imported torch, transformers, peft and this package once. A child starts
from that clean server (never from the benchmark process, whose OpenMP thread pool may already be
running: a forked OpenMP pool hangs), builds its model, runs its steps and reports its peak memory as
`VmHWM` (the resident-set high-water mark, the same figure as `getrusage().ru_maxrss`) minus its
`VmRSS` when it started, both read from /proc/self/status. That difference is what the
configuration itself allocated: weights, activations, optimizer state, caches.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# The peer is transformers' GLM-4 design (GlmForCausalLM), which ChatGLM2/3 share, tuned with PEFT.
OURS = "ours"
OURS_NO_PREFIX = "ours, no prefix"
PEER = "peer (PEFT)"
PEER_NO_PREFIX = "peer, no prefix"
VARIANTS = (OURS, OURS_NO_PREFIX, PEER, PEER_NO_PREFIX)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CHATGLM2_VOCAB = 65024  # ChatGLM2/3's padded vocabulary (the real output-layer width)
_PRELOAD = ["torch", "transformers", "peft", "chatglm_ptuning", "scripts.bench_common"]


@dataclass(frozen=True)
class ModelShape:
    """A ChatGLM2/3-shaped model: multi-query attention with `kv_heads` groups, SwiGLU of width `ffn`,
    half-dim RoPE, qkv bias, RMSNorm; `prefix` is the P-tuning v2 prefix length P."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    prefix: int


SHAPES = {
    # the test suite's smoke size
    "quick": ModelShape("quick", hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, ffn=64, vocab=512, prefix=4),
    "tiny": ModelShape("tiny", hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32, ffn=352, vocab=CHATGLM2_VOCAB, prefix=16),
    # ChatGLM2-6B's proportions (head dim 128 -> 64, 2 groups, ffn ~8/3 H) at hidden 1024
    "mid": ModelShape("mid", hidden=1024, layers=8, heads=16, kv_heads=2, head_dim=64, ffn=2688, vocab=CHATGLM2_VOCAB, prefix=128),
}


def build_model(shape: ModelShape, variant: str, dtype: torch.dtype, use_cache: bool = True) -> torch.nn.Module:
    """Random-weight model of `variant` (one of VARIANTS) with backbone parameters in `dtype`.

    Weights are created directly in `dtype` (no fp32 copy first, which would inflate peak memory);
    prefix parameters stay fp32 on both sides, as mixed-precision training keeps trainable weights.
    Without a prefix every parameter is frozen. Seeded: the same call gives the same weights.
    """
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = _build_ours(shape, variant == OURS, use_cache) if variant in (OURS, OURS_NO_PREFIX) else _build_peer(shape, use_cache)
    finally:
        torch.set_default_dtype(previous)
    if variant == OURS:
        model.to(dtype)  # returns the prefix encoder to fp32 (its own rule under any cast)
    elif variant == PEER:
        from peft import PrefixTuningConfig, get_peft_model

        # built at the fp32 default dtype, so the prefix embedding is fp32 as ours is
        model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=shape.prefix))
    if variant in (OURS_NO_PREFIX, PEER_NO_PREFIX):
        model.requires_grad_(False)
    return model


def _build_ours(shape: ModelShape, prefix: bool, use_cache: bool) -> torch.nn.Module:
    from chatglm_ptuning import ChatGLM2ForConditionalGeneration, ChatGLMConfig

    config = ChatGLMConfig(
        padded_vocab_size=shape.vocab, hidden_size=shape.hidden, num_layers=shape.layers,
        num_attention_heads=shape.heads, multi_query_attention=True, multi_query_group_num=shape.kv_heads,
        kv_channels=shape.head_dim, ffn_hidden_size=shape.ffn, add_qkv_bias=True, layernorm_epsilon=1e-5,
        pre_seq_len=shape.prefix if prefix else None, use_cache=use_cache,
    )
    return ChatGLM2ForConditionalGeneration(config)


def _build_peer(shape: ModelShape, use_cache: bool) -> torch.nn.Module:
    from transformers import GlmConfig, GlmForCausalLM

    config = GlmConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        intermediate_size=shape.ffn, attention_bias=True, rms_norm_eps=1e-5, partial_rotary_factor=0.5,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, bos_token_id=None, use_cache=use_cache,
    )
    return GlmForCausalLM(config)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing of every block (the project's training default)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.activation_checkpointing_enable({"use_reentrant": False})


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------- isolated children

def status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (e.g. VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _child(conn, fn: Callable[..., dict], kwargs: dict, threads: int) -> None:
    try:
        if threads:
            torch.set_num_threads(threads)
        start_rss = status_mib("VmRSS")
        result = fn(**kwargs)
        # fn may read the peak itself before work that must not count (e.g. a FLOP-counting pass)
        peak = result.pop("vmhwm_mib", None) or status_mib("VmHWM")
        result.update(peak_rss_mib=round(peak, 1), peak_growth_mib=round(peak - start_rss, 1), threads=torch.get_num_threads())
    except Exception as err:  # noqa: BLE001 - reported as the configuration's result; the benchmark goes on
        result = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:300], "traceback": traceback.format_exc()[-2000:]}
    conn.send(result)
    conn.close()


_CONTEXT: multiprocessing.context.BaseContext | None = None


def run_isolated(fn: Callable[..., dict], kwargs: dict, threads: int, timeout: float) -> dict:
    """Run `fn(**kwargs)` in a fresh child (see the module docstring) and return its dict, with
    `peak_rss_mib`, `peak_growth_mib` and `threads` added, or `{"error": ...}`. `fn` must be a
    module-level function of an importable module (it is pickled by name)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(_PRELOAD)
    receiver, sender = _CONTEXT.Pipe(duplex=False)
    process = _CONTEXT.Process(target=_child, args=(sender, fn, kwargs, threads))
    process.start()
    sender.close()
    result = {"error": f"timed out after {timeout:.0f} s"}
    if receiver.poll(timeout):
        try:
            result = receiver.recv()
        except EOFError:
            result = {"error": "child exited without a result"}
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
    if "error" in result and process.exitcode not in (0, None):
        result["error"] += f" (exit code {process.exitcode})"
    return result


def run_variants(
    case: Callable[..., dict],
    kwargs: dict,
    merge: Callable[[list[dict]], dict],
    threads: int,
    timeout: float,
    rounds: int,
    label: str,
) -> dict[str, dict]:
    """Every variant of one setting, each `rounds` times in its own child (`case(variant=v, **kwargs)`),
    the order rotated every round so a drift in the machine's load falls on all variants alike.
    `merge` turns one variant's per-round results (all without errors) into its row; a variant that
    failed in any round reports that round's error instead."""
    results: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for round_index in range(rounds):
        shift = round_index % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            result = run_isolated(case, {**kwargs, "variant": variant}, threads, timeout)
            result.pop("traceback", None)
            results[variant].append(result)
            print(f"  {label} {variant}: {result.get('tokens_per_s', result.get('error'))}", flush=True)
    rows = {}
    for variant, runs in results.items():
        failed = [run for run in runs if "error" in run]
        rows[variant] = failed[0] if failed else merge(runs)
    return rows


def merge_rounds(runs: list[dict], times: Sequence[str]) -> dict:
    """One row from per-round results: the smallest of each `times` field (other processes only ever add
    time, so the fastest round is the closest to the configuration's own cost), the largest peak memory,
    and the other fields of the first round; `rounds` records how many there were."""
    merged = dict(runs[0])
    for field in times:
        merged[field] = min(run[field] for run in runs)
    for field in ("peak_rss_mib", "peak_growth_mib"):
        merged[field] = max(run[field] for run in runs)
    merged["rounds"] = len(runs)
    return merged


# ---------------------------------------------------------------- machine

def _matmul_peak(dtype: str, size: int, repeats: int) -> dict:
    a = torch.randn(size, size, dtype=DTYPES[dtype])
    b = torch.randn(size, size, dtype=DTYPES[dtype])
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return {"gflops": round(2 * size**3 / best / 1e9, 2)}


def _timed(step: Callable[[], Any]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def matmul_peak(dtypes: Sequence[str], threads: int, size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """This machine's dense matmul rate, GFLOP/s: the best of `repeats` square `size` torch.mm runs per
    dtype, with the benchmark's thread count, in a fresh child. The reference for "fraction of peak"."""
    peaks = {}
    for dtype in dtypes:
        result = run_isolated(_matmul_peak, {"dtype": dtype, "size": size, "repeats": repeats}, threads, timeout=600)
        if "error" in result:
            raise RuntimeError(f"measuring the {dtype} matmul peak failed: {result['error']}")
        peaks[dtype] = result["gflops"]
    return peaks


def comma_separated(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: "a,b" -> ["a", "b"], each item one of `choices`."""

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items or any(item not in choices for item in items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list from {', '.join(choices)}; found {text!r}")
        return items

    return parse


def machine_info() -> dict:
    """CPU model, core count, instruction set torch uses, versions, and the load average right now."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    import transformers

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
    }


def machine_line(info: dict) -> str:
    load = ", ".join(str(x) for x in info["load_average_1_5_15min"])
    return (
        f"{info['cpu']}, {info['cores']} cores ({info['cpu_capability']}), torch {info['torch']}, "
        f"transformers {info['transformers']}; load average {load}"
    )


def markdown(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A Markdown table of `columns` (missing values: empty, None: "-")."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
