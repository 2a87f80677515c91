"""A short, prepared check of the accelerator paths: INT8/INT4 and half precision on a device.

For a ChatGLM2-shaped model (the embedded one) and a tiny ChatGLM-6B-shaped one (random weights,
official layout, fp16 safetensors), at no quantization, INT8 and INT4:
1. load with `load_model_weights(..., quantization_bit=b, device=D, dtype=T)` (quantize while loading
   on the device);
2. compare the logits with the same model loaded on the CPU in fp32 (max abs diff, top-1 agreement);
3. run one P-tuning v2 step: the loss is finite, every prefix gradient is finite and non-zero, no
   backbone weight has a gradient;
4. generate a few greedy tokens.
It prints a table, writes JSON with --output, and exits 1 if any row fails.

    python -m scripts.check_device --device cuda               # fp16 and bf16
    python -m scripts.check_device --device cpu --dtypes bf16  # the same checks on the CPU (tests)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "chatglm_ptuning" / "embedded"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Logit differences allowed against the fp32 CPU model of the same bits (half-precision rounding only).
MAX_ABS_DIFF = {"fp16": 0.25, "bf16": 0.5, "fp32": 1e-3}
TINY_GLM1 = dict(
    num_layers=2, vocab_size=130528, hidden_size=64, inner_hidden_size=256, num_attention_heads=4,
    max_sequence_length=256, position_encoding_2d=True, bos_token_id=130004, eos_token_id=130005,
    mask_token_id=130000, gmask_token_id=130001, pad_token_id=3,
)


def tiny_glm1_folder(folder: Path) -> Path:
    """A random tiny ChatGLM-6B-shaped model in the official layout (fp16 safetensors)."""
    from transformers import AutoModelForCausalLM

    from chatglm_ptuning import ChatGLMConfig
    from chatglm_ptuning.official_format import write_official_folder

    config = ChatGLMConfig(**TINY_GLM1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return write_official_folder(config, model.half().state_dict(), folder, fmt="safetensors")


def sample_inputs(architecture: str, vocab: int) -> torch.Tensor:
    """Seeded ids [2, 16]; a ChatGLM-6B row needs [gMASK] and <sop> (its context ends at <sop>)."""
    ids = torch.randint(10, min(vocab, 60000), (2, 16), generator=torch.Generator().manual_seed(0))
    if architecture == "chatglm":
        ids[:, -2], ids[:, -1] = TINY_GLM1["gmask_token_id"], TINY_GLM1["bos_token_id"]
    return ids


def check(folder: Path, bits: int | None, device: str, dtype_name: str) -> dict:
    """One row: load on the device, compare with the CPU fp32 model, train a step, generate."""
    from chatglm_ptuning.loading import load_model_weights

    dtype = DTYPES[dtype_name]
    reference = load_model_weights(folder, pre_seq_len=4, quantization_bit=bits, device="cpu", dtype=torch.float32)
    model = load_model_weights(folder, pre_seq_len=4, quantization_bit=bits, device=device, dtype=dtype)
    reference.transformer.prefix_encoder.load_state_dict(model.transformer.prefix_encoder.state_dict())
    ids = sample_inputs(model.config.architecture, model.config.vocab_size)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits.float()
        logits = model(input_ids=ids.to(device)).logits.float().cpu()
    row = {
        "model": folder.name, "bits": bits or "-", "device": device, "dtype": dtype_name,
        "max_abs_diff": round(float((logits - expected).abs().max()), 4),
        "top1_agreement": round(float((logits.argmax(-1) == expected.argmax(-1)).float().mean()), 3),
    }
    model.train()
    labels = ids.clone()
    labels[:, :8] = -100
    loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    row["loss"] = round(float(loss.detach()), 4)
    row["prefix_grads_ok"] = all(g is not None and bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0) for g in grads)
    row["frozen_ok"] = all(p.grad is None for p in model.parameters() if not p.requires_grad)
    model.eval()
    with torch.no_grad():
        out = model.generate(ids[:1].to(device), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    row["generated"] = int(out.shape[1] - ids.shape[1])
    row["ok"] = (
        row["max_abs_diff"] <= MAX_ABS_DIFF[dtype_name] and bool(torch.isfinite(loss)) and row["prefix_grads_ok"]
        and row["frozen_ok"] and row["generated"] == 4
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="fp16,bf16", help=f"comma-separated, from {','.join(DTYPES)}")
    parser.add_argument("--bits", default="0,8,4", help="comma-separated; 0 = no quantization")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    dtypes = args.dtypes.split(",")
    if unknown := [d for d in dtypes if d not in DTYPES]:
        parser.error(f"--dtypes: expected names from {', '.join(DTYPES)}; found {', '.join(unknown)}")
    bits_list = [int(b) or None for b in args.bits.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for folder in (EMBEDDED, tiny_glm1_folder(Path(tmp) / "tiny-chatglm-6b")):
            for bits in bits_list:
                for dtype_name in dtypes:
                    try:
                        rows.append(check(folder, bits, args.device, dtype_name))
                    except Exception as error:  # noqa: BLE001 - one failing path must not hide the others
                        rows.append({"model": folder.name, "bits": bits or "-", "device": args.device,
                                     "dtype": dtype_name, "ok": False, "error": f"{type(error).__name__}: {error}"})
    columns = ["model", "bits", "device", "dtype", "max_abs_diff", "top1_agreement", "loss", "prefix_grads_ok",
               "frozen_ok", "generated", "ok", "error"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2))
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
