"""`python -m chatglm_ptuning.export_merged`: fold a LoRA checkpoint into its base model and write
the result as an ordinary model folder in the official layout (config.json + pytorch_model.bin
shards, the tokenizer files beside them), loadable by `load_model`, the Auto classes and the
official code alike.

    python -m chatglm_ptuning.export_merged --model_name_or_path /models/chatglm2-6b \\
        --checkpoint output/adgen-lora/checkpoint-3000 --output_dir /models/chatglm2-6b-adgen

Only LoRA merges: a soft prompt is not a weight update (it stays a separate checkpoint), and a
full fine-tuning checkpoint is already a whole model. The merge runs on the dense base (fp32 by
default), also for adapters trained on an INT8/INT4 backbone.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError, read_checkpoint_settings
from .loading import load_model
from .lora import merge_lora
from .official_format import WEIGHT_FORMATS, write_official_folder


def export_merged(
    model_name_or_path: str | os.PathLike,
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str = "float16",
    fmt: str = "bin",
    num_shards: int = 1,
) -> Path:
    """Merge the LoRA `checkpoint` into the base model and write it to `output_dir`; returns the folder.

    The merge is computed in fp32 and the weights are stored in `dtype` (the official files are fp16).
    """
    settings = read_checkpoint_settings(checkpoint)
    if settings.method != "lora":
        raise CheckpointError(
            f"{checkpoint} is a {settings.method} checkpoint; only LoRA adapters merge into the weights "
            "(soft prompts stay separate checkpoints; a full fine-tuning checkpoint is already a model folder)"
        )
    model, tokenizer = load_model(model_name_or_path, ptuning_checkpoint=checkpoint, device="cpu", dtype=torch.float32)
    merged = merge_lora(model)
    target = getattr(torch, dtype)
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in merged.state_dict().items()}
    folder = write_official_folder(
        merged.config, state, output_dir, fmt=fmt, num_shards=num_shards, torch_dtype=dtype, name_or_path=str(output_dir)
    )
    tokenizer.save_pretrained(str(folder))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="the base model folder the adapter was trained on")
    parser.add_argument("--checkpoint", required=True, help="the LoRA checkpoint folder (adapter_config.json inside)")
    parser.add_argument("--output_dir", required=True, help="where to write the merged model")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"), help="stored weight dtype")
    parser.add_argument("--format", default="bin", choices=WEIGHT_FORMATS, help="pytorch_model.bin (official) or safetensors")
    parser.add_argument("--num_shards", type=int, default=1, help="number of weight files")
    args = parser.parse_args(argv)
    try:
        folder = export_merged(args.model_name_or_path, args.checkpoint, args.output_dir, args.dtype, args.format, args.num_shards)
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"merged model written to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
