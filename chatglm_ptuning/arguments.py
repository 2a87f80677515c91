"""Command-line arguments, with the reference recipe's flag names and defaults (ptuning/arguments.py of the
ChatGLM-6B/ChatGLM2-6B repositories).

Flags the reference parsed but never used are accepted (so its command lines run unchanged)
and marked as such in their help.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Seq2SeqTrainingArguments

from .checkpoint import METHODS
from .prompt_learning import ENCODER_TYPES, PREFIX_TUNING_HIDDEN_SIZE
_UNUSED = "Accepted for compatibility with the reference recipe; not used."


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Local ChatGLM model folder (config.json, weights, tokenizer)."})
    ptuning_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint folder of any method to load: a soft prompt (this toolkit's or the official "
            "pytorch_model.bin), a LoRA adapter, or a fully fine-tuned model."
        },
    )
    method: str | None = field(
        default=None,
        metadata={
            "help": "Tuning method: ptuning_v2 (deep prefix), prefix_tuning (deep prefix through an MLP), prompt_tuning "
            "(input embeddings), ptuning (input tokens from an LSTM/MLP encoder), lora (PEFT), full. Default: the "
            "checkpoint's method; ptuning_v2 when --pre_seq_len is given; full otherwise (the reference's fine-tuning).",
            "choices": list(METHODS),
        },
    )
    config_name: str | None = field(default=None, metadata={"help": _UNUSED})
    tokenizer_name: str | None = field(default=None, metadata={"help": _UNUSED})
    cache_dir: str | None = field(default=None, metadata={"help": "Where the datasets library caches processed data."})
    use_fast_tokenizer: bool = field(default=True, metadata={"help": _UNUSED})
    model_revision: str = field(default="main", metadata={"help": _UNUSED})
    use_auth_token: bool = field(default=False, metadata={"help": _UNUSED})
    resize_position_embeddings: bool | None = field(default=None, metadata={"help": _UNUSED})
    quantization_bit: int | None = field(
        default=None, metadata={"help": "4 or 8: weight-only quantized backbone, quantized while loading."}
    )
    pre_seq_len: int | None = field(default=None, metadata={"help": "Number of virtual prefix positions (P-tuning v2)."})
    prefix_projection: bool = field(default=False, metadata={"help": "Reparameterise the prefix through a two-layer MLP."})
    encoder_type: str | None = field(
        default=None,
        metadata={"help": "--method ptuning: prompt encoder, lstm (biLSTM + MLP, default) or mlp.", "choices": list(ENCODER_TYPES)},
    )
    encoder_hidden_size: int | None = field(
        default=None,
        metadata={
            "help": f"--method prefix_tuning / ptuning: width of the prompt encoder's MLP (default "
            f"{PREFIX_TUNING_HIDDEN_SIZE} / the model's hidden size)."
        },
    )
    lora_rank: int = field(default=8, metadata={"help": "--method lora: rank r of the adapters."})
    lora_alpha: float = field(default=32.0, metadata={"help": "--method lora: the update is scaled by alpha / rank."})
    lora_dropout: float = field(default=0.1, metadata={"help": "--method lora: dropout on the adapter input."})
    lora_target_modules: str = field(
        default="query_key_value",
        metadata={"help": "--method lora: comma-separated module-name suffixes to adapt (e.g. query_key_value,dense)."},
    )
    chatglm_version: int | None = field(
        default=None, metadata={"help": "2 or 3: which ChatGLM2/ChatGLM3 tokenizer, when the model folder does not say."}
    )
    rope_scaling_mode: str | None = field(
        default=None,
        metadata={
            "help": "How rope_ratio applies (ChatGLM2/3 long-context folders): interpolate (positions / rope_ratio, "
            "chatglm2-6b-32k) or base (RoPE base x rope_ratio, chatglm3-6b-32k/-128k). Default: decided from the folder.",
            "choices": ["interpolate", "base"],
        },
    )


@dataclass
class DataTrainingArguments:
    lang: str | None = field(default=None, metadata={"help": _UNUSED})
    dataset_name: str | None = field(default=None, metadata={"help": _UNUSED + " Give local files instead."})
    dataset_config_name: str | None = field(default=None, metadata={"help": _UNUSED})
    prompt_column: str | None = field(default=None, metadata={"help": "Input field (ADGEN: content; chat: prompt)."})
    response_column: str | None = field(default=None, metadata={"help": "Target field (ADGEN: summary; chat: response)."})
    history_column: str | None = field(default=None, metadata={"help": "Field holding earlier [query, response] turns."})
    train_file: str | None = field(default=None, metadata={"help": "Training data: .json (array or JSON Lines) or .jsonl."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data, same formats."})
    test_file: str | None = field(default=None, metadata={"help": "Prediction data, same formats."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Redo preprocessing instead of using the cache."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for preprocessing."})
    max_source_length: int = field(default=1024, metadata={"help": "Token budget of the prompt."})
    max_target_length: int = field(default=128, metadata={"help": "Token budget of the response in training."})
    val_max_target_length: int | None = field(
        default=None, metadata={"help": "Token budget of reference responses in eval/predict (default: max_target_length)."}
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={
            "help": "Pad every training row to the fixed length (max_source_length + max_target_length [+ 1]), the "
            "reference's layout. Default: each batch is padded to its own longest row (same losses, less work)."
        },
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Round each training batch's padded length up to a multiple of this (e.g. 8)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use only the first N prediction rows."})
    num_beams: int | None = field(default=None, metadata={"help": "Beams for generation in eval/predict."})
    ignore_pad_token_for_loss: bool = field(default=True, metadata={"help": "Label padding as -100 (no loss)."})
    source_prefix: str = field(default="", metadata={"help": "Text put before every prompt."})
    forced_bos_token: str | None = field(default=None, metadata={"help": _UNUSED})
    do_sample: bool = field(
        default=True, metadata={"help": "Sample in eval/predict generation (reference); False: greedy, deterministic scores."}
    )
    top_p: float = field(default=0.7, metadata={"help": "Nucleus sampling threshold for eval/predict (reference 0.7)."})
    temperature: float = field(default=0.95, metadata={"help": "Sampling temperature for eval/predict (reference 0.95)."})
    train_format: str | None = field(
        default=None,
        metadata={"help": "'conversations' for ChatGLM3 role/content message lists; default: prompt/response columns."},
    )
    all_turns: bool = field(
        default=False, metadata={"help": "Multi-turn data: learn every assistant turn (reference: the last turn only)."}
    )

    def __post_init__(self) -> None:
        if not any((self.dataset_name, self.train_file, self.validation_file, self.test_file)):
            raise ValueError("give at least one of --train_file, --validation_file or --test_file")
        for flag in ("train_file", "validation_file", "test_file"):
            path = getattr(self, flag)
            if path is not None and Path(path).suffix not in (".json", ".jsonl"):
                raise ValueError(f"--{flag} {path}: expected a .json or .jsonl file, found {Path(path).suffix or 'no extension'}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"--pad_to_multiple_of: expected a positive integer, found {self.pad_to_multiple_of}")
        if self.val_max_target_length is None:
            self.val_max_target_length = self.max_target_length


@dataclass
class TrainingArguments(Seq2SeqTrainingArguments):
    """transformers' Seq2SeqTrainingArguments plus flags the reference scripts pass that
    transformers 5 removed."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over in an output_dir that already holds checkpoints."}
    )
    evaluation_strategy: str | None = field(default=None, metadata={"help": "Old name of --eval_strategy."})
    group_by_length: bool = field(
        default=False,
        metadata={"help": "Batch training rows of similar length (old name of --train_sampling_strategy group_by_length)."},
    )

    def __post_init__(self) -> None:
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if not self.use_cpu and launched_ranks() > 1 and not torch.accelerator.is_available():
            # accelerate treats ranks on a machine without an accelerator as data-parallel only with
            # use_cpu; otherwise each rank trains alone (no gradient all-reduce) and saves its own result.
            self.use_cpu = True
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        super().__post_init__()


def launched_ranks() -> int:
    """The world size a distributed launcher (torchrun, deepspeed, mpirun) announced; 1 without one."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1
