"""Whole-model memory of INT4/INT8 P-tuning at the real 6B shapes (a section of bench_quant).

For a ChatGLM2-6B-shaped and a ChatGLM-6B-shaped model (28 layers, hidden 4096, real vocabulary
sizes) with random weights:
1. a synthetic fp16 checkpoint in the official sharded layout is streamed to disk, one shard
   at a time (the dense model never exists in memory);
2. a fresh process loads it with `load_model(..., quantization_bit=b)` (quantize while loading,
   tensor by tensor from memory-mapped shards) and reports its loading peak RSS (VmHWM: the
   mapped checkpoint pages it touches count too) and the resident weight bytes; the same process
   then runs one P-tuning
   v2 training step (batch 1, 64 + 128 tokens, pre_seq_len 128, gradient checkpointing) and
   reports the step time and the step's peak RSS.
The dense fp16 checkpoint size is the baseline the ratios refer to.

    python -m scripts.bench_model_memory --arch chatglm2 --bits 4 [--workdir /tmp/bench6b]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARD_BYTES = 2 * 1024**3

SIX_B = {
    "chatglm2": dict(
        num_layers=28, padded_vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696, kv_channels=128,
        num_attention_heads=32, seq_length=32768, add_qkv_bias=True, multi_query_attention=True, multi_query_group_num=2,
    ),
    "chatglm": dict(
        num_layers=28, vocab_size=130528, hidden_size=4096, inner_hidden_size=16384, num_attention_heads=32,
        max_sequence_length=2048, position_encoding_2d=True, bos_token_id=130004, eos_token_id=130005,
        mask_token_id=130000, gmask_token_id=130001, pad_token_id=3,
    ),
}


def _peak_rss_gib() -> float:
    """Peak resident set size since the last `_reset_peak_rss` (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _reset_peak_rss() -> None:
    """Start a new peak measurement: writing 5 to clear_refs resets VmHWM to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def write_synthetic_checkpoint(arch: str, folder: Path) -> int:
    """Random fp16 weights under the official names, written shard by shard; returns total bytes."""
    from transformers import AutoModelForCausalLM

    import chatglm_ptuning  # noqa: F401
    from chatglm_ptuning import ChatGLMConfig
    from chatglm_ptuning.official_format import official_config_dict

    config = ChatGLMConfig(**SIX_B[arch])
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if arch == "chatglm":
        shapes["lm_head.weight"] = shapes["transformer.word_embeddings.weight"]  # the official files hold both
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if size + nbytes > SHARD_BYTES and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for index, keys in enumerate(groups, 1):
        shard = {}
        for key in keys:
            tensor = torch.empty(shapes[key], dtype=torch.float16)
            if "norm" in key:
                tensor.fill_(1.0)
            else:
                tensor.normal_(0.0, 0.02, generator=gen)
            shard[key] = tensor
        name = f"pytorch_model-{index:05d}-of-{len(groups):05d}.bin"
        torch.save(shard, folder / name)
        total += sum(t.numel() * 2 for t in shard.values())
        weight_map.update(dict.fromkeys(keys, name))
        del shard
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    (folder / "config.json").write_text(json.dumps(official_config_dict(config), indent=2))
    return total


def measure(folder: Path, bits: int, steps: int = 2) -> dict:
    """Runs in a fresh process: load with quantize-while-loading, then P-tuning steps."""
    from chatglm_ptuning.loading import load_model_weights

    start = time.perf_counter()
    model = load_model_weights(folder, pre_seq_len=128, quantization_bit=bits, device="cpu", dtype=torch.bfloat16)
    load_s = time.perf_counter() - start
    load_peak = _peak_rss_gib()
    resident = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    _reset_peak_rss()  # the step's own peak, not the loading peak
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # fused: the Trainer's default optimizer (adamw_torch_fused), which train.sh uses
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, fused=True)
    vocab = model.config.vocab_size
    ids = torch.randint(10, 60000 if vocab > 60000 else vocab - 10, (1, 192))
    if model.config.architecture == "chatglm":  # a GLM row needs [gMASK] and <sop> (its context ends at <sop>)
        ids[0, 63], ids[0, 64] = model.config.gmask_token_id, model.config.bos_token_id
    labels = ids.clone()
    labels[:, :64] = -100
    step_times = []
    for _ in range(steps):
        begin = time.perf_counter()
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_times.append(time.perf_counter() - begin)
    return {
        "load_s": round(load_s, 1), "load_peak_rss_gib": round(load_peak, 2),
        "resident_weights_gib": round(resident / 1024**3, 2), "step_s": round(min(step_times), 1),
        "step_peak_rss_gib": round(_peak_rss_gib(), 2), "loss": round(float(loss), 3),
    }


def bench_model_memory(archs: list[str], bits_list: list[int], workdir: Path) -> list[dict]:
    """One row per (architecture, bits): each measured in its own process for a clean peak RSS."""
    rows = []
    for arch in archs:
        folder = workdir / f"{arch}-6b-synthetic"
        index = folder / "pytorch_model.bin.index.json"
        dense = json.loads(index.read_text())["metadata"]["total_size"] if index.exists() else write_synthetic_checkpoint(arch, folder)
        for bits in bits_list:
            out = subprocess.run(
                [sys.executable, "-m", "scripts.bench_model_memory", "--child", str(folder), "--bits", str(bits)],
                cwd=REPO, capture_output=True, text=True, check=False,
            )
            if out.returncode != 0:
                raise RuntimeError(f"measuring {arch} INT{bits} failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({
                "model": f"{arch}-6b shape", "bits": bits, "dense_fp16_checkpoint_gib": round(dense / 1024**3, 2),
                **result, "weights_vs_fp16": round(result["resident_weights_gib"] / (dense / 1024**3), 3),
            })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(SIX_B), action="append")
    parser.add_argument("--bits", type=int, action="append")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/chatglm-bench-6b"))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.bits[0])))
        return
    rows = bench_model_memory(args.arch or ["chatglm2", "chatglm"], args.bits or [4, 8], args.workdir)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
