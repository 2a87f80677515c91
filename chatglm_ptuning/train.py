"""`python -m chatglm_ptuning.train`: train, evaluate and predict, with the reference flags.

The reference recipe's command lines run unchanged but for the entry point (a single .json
argument file works too). Stages: arguments -> model/tokenizer (load_model) -> data
(data.py) -> PromptTrainer -> checkpoints, metrics and predictions under --output_dir.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import HfArgumentParser, set_seed

from .arguments import DataTrainingArguments, ModelArguments, TrainingArguments
from .checkpoint import CheckpointError, PromptSettings, read_checkpoint_settings
from .collator import PromptBatchCollator, TrainBatchCollator
from .constants import IGNORE_INDEX
from .data import DataError, build_preprocess_function, load_rows, tokenizer_family, train_label_pad_id
from .loading import load_model
from .lora import LoraOptions
from .methods import MethodError, count_parameters, resolve_method
from .metrics import build_trainer_metrics
from .prompt_learning import SOFT_PROMPT_METHODS
from .run_folder import (
    RunFolderError,
    RunLock,
    check_resume,
    claim,
    clear_earlier_run,
    file_sha256,
    warn_if_low_space,
    write_run_settings,
)
from .trainer import (
    FinalCheckpointCallback,
    LossPlotCallback,
    PromptTrainer,
    StepKeyedDropoutCallback,
    TrainingDiverged,
    last_complete_checkpoint,
)

logger = logging.getLogger("chatglm_ptuning.train")


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataTrainingArguments, TrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def _gradient_checkpointing_given(argv: list[str]) -> bool:
    return any(a.split("=")[0] in ("--gradient_checkpointing", "--activation_checkpointing") for a in argv)


def _guard_data_parallel(training_args: TrainingArguments) -> None:
    """Plain `python` with several GPUs would wrap the model in DataParallel (one full copy per
    GPU, the reference's common out-of-memory); use one GPU and say how to use them all."""
    if training_args.world_size == 1 and training_args.n_gpu > 1:
        logger.warning(
            "%d GPUs are visible but the run was not started by a distributed launcher; training on one GPU. "
            "To use them all: torchrun --nproc_per_node %d -m chatglm_ptuning.train ...",
            training_args.n_gpu,
            training_args.n_gpu,
        )
        training_args._n_gpu = 1


def _method(model_args: ModelArguments) -> str:
    """--method, else the checkpoint's, else ptuning_v2 with --pre_seq_len, else full (the
    reference's fine-tuning command lines give no --pre_seq_len)."""
    checkpoint = None
    if model_args.ptuning_checkpoint is not None and model_args.method != "full":
        checkpoint = read_checkpoint_settings(model_args.ptuning_checkpoint)
    where = f"--ptuning_checkpoint {model_args.ptuning_checkpoint}"
    return resolve_method(model_args.method, checkpoint, model_args.pre_seq_len, where) or "full"


def _prefix_projection_flag(model_args: ModelArguments, method: str) -> bool | None:
    # P-tuning v2 keeps the reference's meaning (with --pre_seq_len, no flag means no projection);
    # for the other methods only a given flag counts (prefix_tuning always projects).
    if method == "ptuning_v2":
        return model_args.prefix_projection if model_args.pre_seq_len is not None else None
    return True if model_args.prefix_projection else None


def _lora_options(model_args: ModelArguments) -> LoraOptions:
    targets = tuple(t.strip() for t in model_args.lora_target_modules.split(",") if t.strip())
    return LoraOptions(model_args.lora_rank, model_args.lora_alpha, model_args.lora_dropout, targets)


def _model_dtype(training_args: TrainingArguments, prompt_only: bool) -> torch.dtype | None:
    """P-tuning, the other soft prompts and LoRA: half-precision backbone on GPU (or as --bf16/--fp16
    asks), fp32 trainable weights. Full fine-tuning: fp32 weights, mixed precision left to the
    Trainer (--fp16/--bf16)."""
    if not prompt_only:
        return torch.float32
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return None  # load_model's default: bf16/fp16 on GPU, fp32 on CPU


def _cache_file(data_path: str, cache_root: Path, tokenizer, data_args: DataTrainingArguments, train: bool) -> str:
    """A cache file name that changes whenever the data, the tokenizer or the settings do."""
    digest = hashlib.sha256(file_sha256(data_path).encode())
    digest.update(json.dumps(vars(data_args), sort_keys=True, default=str).encode())
    digest.update(f"{type(tokenizer).__name__}:{len(tokenizer)}:{train}".encode())
    return str(cache_root / f"{Path(data_path).stem}-{digest.hexdigest()[:16]}.arrow")


def _prepare(path: str, tokenizer, data_args, training_args, train: bool, limit: int | None):
    rows = load_rows(path, data_args, tokenizer_family(tokenizer))
    if rows.skipped:
        logger.info("%s: skipped %d row(s) with an empty prompt or response", path, rows.skipped)
    dataset = rows.to_dataset()
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    cache_root = Path(training_args.output_dir) / "preprocess_cache"
    cache_root.mkdir(parents=True, exist_ok=True)
    with training_args.main_process_first(desc="preprocessing"):
        processed = dataset.map(
            build_preprocess_function(tokenizer, data_args, train=train),
            batched=True,
            # Eval prompts are mapped one by one, so none is padded: each batch pads only as far as it needs.
            batch_size=1000 if train else 1,
            num_proc=data_args.preprocessing_num_workers,
            remove_columns=dataset.column_names,
            load_from_cache_file=not data_args.overwrite_cache,
            cache_file_name=_cache_file(path, cache_root, tokenizer, data_args, train),
            desc=f"tokenizing {Path(path).name}",
        )
    if len(processed) == 0:
        raise DataError(path, None, "no usable rows after preprocessing")
    return processed if train else processed.select_columns(["input_ids", "labels"])


_DATA_SETTINGS = (
    "prompt_column", "response_column", "history_column", "train_format", "all_turns", "source_prefix",
    "max_source_length", "max_target_length", "max_train_samples", "ignore_pad_token_for_loss",
)  # fmt: skip


def run_settings(model_args: ModelArguments, data_args: DataTrainingArguments, training_args: TrainingArguments, method: str) -> dict:
    """The settings that make a training run what it is, as the command line gives them; every
    checkpoint records them (run_settings.json) and a resume must repeat them (but the learning rate)."""
    train_file = Path(data_args.train_file)
    try:
        sha256 = file_sha256(train_file)
    except OSError as err:
        raise DataError(train_file, None, f"cannot read the file ({err.strerror})") from None
    settings = {
        "train_file": str(train_file.resolve()),
        "train_data_sha256": sha256,
        **{name: getattr(data_args, name) for name in _DATA_SETTINGS},
        "model": str(Path(model_args.model_name_or_path).resolve()),
        "method": method,
        "quantization_bit": model_args.quantization_bit or 0,
    }
    if method in SOFT_PROMPT_METHODS:
        settings.update(
            pre_seq_len=model_args.pre_seq_len,
            prefix_projection=_prefix_projection_flag(model_args, method),
            encoder_type=model_args.encoder_type,
            encoder_hidden_size=model_args.encoder_hidden_size,
        )
    if method == "lora":
        settings.update({name: getattr(model_args, name) for name in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules")})
    settings.update(
        learning_rate=training_args.learning_rate,
        per_device_train_batch_size=training_args.per_device_train_batch_size,
        gradient_accumulation_steps=training_args.gradient_accumulation_steps,
        world_size=training_args.world_size,
        seed=training_args.seed,
    )
    return json.loads(json.dumps(settings))  # as a checkpoint's file reads back


def _resume_checkpoint(training_args: TrainingArguments, settings: dict) -> str | None:
    """The checkpoint to resume from (checked against `settings`), or None to start afresh; refuses
    a folder holding checkpoints unless --overwrite_output_dir or --resume_from_checkpoint says which."""
    resume = training_args.resume_from_checkpoint
    existing = last_complete_checkpoint(training_args.output_dir)
    if resume in ("True", "true", "latest"):
        if existing is None:
            raise CheckpointError(f"--resume_from_checkpoint: no complete checkpoint in {training_args.output_dir}")
        resume = existing
    elif existing and resume is None and not training_args.overwrite_output_dir:
        raise CheckpointError(
            f"{training_args.output_dir} already holds {existing}; pass --resume_from_checkpoint True to continue "
            "or --overwrite_output_dir to start over (this removes the earlier run's checkpoints)"
        )
    if resume is not None:
        check_resume(resume, settings)
    return resume


def _checkpoint_bytes(trainable: int, total: int, method: str) -> int:
    """About what one checkpoint takes: fp32 trainable weights and two Adam moments (plus the whole
    model for full fine-tuning), and a few MB of tokenizer and config files."""
    return trainable * 12 + (total * 4 if method == "full" else 0) + 5_000_000


def run(model_args: ModelArguments, data_args: DataTrainingArguments, training_args: TrainingArguments, argv: list[str]) -> None:
    """Train, evaluate and/or predict as the command line says: choose the method, then (training)
    claim the output folder and check a resume, then `_run` the steps."""
    _setup_logging()
    _guard_data_parallel(training_args)
    set_seed(training_args.seed)
    method = _method(model_args)
    _check_method_fits(method, model_args, training_args)
    if not training_args.do_train:
        return _run(model_args, data_args, training_args, argv, method, None, None)
    if not data_args.train_file:
        raise ValueError("--do_train needs --train_file")
    settings = run_settings(model_args, data_args, training_args, method)
    lock: RunLock | None = None
    try:
        with training_args.main_process_first(desc="claiming the output folder"):
            if training_args.process_index == 0:  # one lock per run, taken by its main process
                lock = claim(training_args.output_dir)
            resume = _resume_checkpoint(training_args, settings)
        _run(model_args, data_args, training_args, argv, method, settings, resume)
    finally:
        if lock is not None:
            lock.release()


def _run(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    training_args: TrainingArguments,
    argv: list[str],
    method: str,
    settings: dict | None,
    resume: str | None,
) -> None:
    """Load, (clear the folder of an earlier run,) train, evaluate and predict; `settings` and
    `resume` are those of a training run (None without --do_train)."""
    model, tokenizer = _load(model_args, training_args, method)
    prompt_settings = _prompt_settings(model, tokenizer, model_args, method)
    _set_activation_checkpointing(model.config, training_args, argv)
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %d of %d (%.4f%%)", trainable, total, 100 * trainable / max(total, 1))
    if training_args.do_train:
        _start_run_folder(training_args, settings, resume, _checkpoint_bytes(trainable, total, method))
    datasets = _datasets(tokenizer, data_args, training_args)
    train_collator, eval_collator = _collators(tokenizer, data_args, training_args, datasets.train is not None)
    gen_kwargs = _generation_settings(data_args, training_args)
    trainer = PromptTrainer(
        model=model,
        args=training_args,
        train_dataset=datasets.train,
        eval_dataset=datasets.eval,
        processing_class=tokenizer,
        data_collator=train_collator,
        eval_collator=eval_collator if training_args.predict_with_generate else None,
        generation_kwargs=gen_kwargs,
        compute_metrics=build_trainer_metrics(tokenizer, data_args.ignore_pad_token_for_loss)
        if training_args.predict_with_generate
        else None,
        prompt_settings=prompt_settings,
        run_settings=settings,
        callbacks=[FinalCheckpointCallback(), LossPlotCallback(), StepKeyedDropoutCallback()],
    )
    if training_args.do_train:
        model.train()
        _train(trainer, datasets.train, resume, trainable, total)
    model.eval()
    if datasets.eval is not None and training_args.do_eval:
        _evaluate(trainer, datasets.eval)
    if datasets.predict is not None:
        _predict(trainer, datasets.predict, tokenizer, training_args, gen_kwargs)


# --- the steps of `run`, in order ------------------------------------------------------------------
def _setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()


def _check_method_fits(method: str, model_args: ModelArguments, training_args: TrainingArguments) -> None:
    if method == "full" and model_args.quantization_bit and training_args.do_train:
        raise MethodError(
            "full fine-tuning trains every weight, so it needs a dense backbone: drop --quantization_bit "
            "(or pick a parameter-efficient --method)"
        )


def _load(model_args: ModelArguments, training_args: TrainingArguments, method: str):  # noqa: ANN202
    """The model (with its method's weights) and tokenizer, as the flags describe them."""
    return load_model(
        model_args.model_name_or_path,
        ptuning_checkpoint=model_args.ptuning_checkpoint,
        pre_seq_len=model_args.pre_seq_len,
        prefix_projection=_prefix_projection_flag(model_args, method),
        quantization_bit=model_args.quantization_bit,
        device=training_args.device,
        dtype=_model_dtype(training_args, method != "full"),
        chatglm_version=model_args.chatglm_version,
        rope_scaling_mode=model_args.rope_scaling_mode,
        method=method,
        encoder_type=model_args.encoder_type,
        encoder_hidden_size=model_args.encoder_hidden_size,
        lora_options=_lora_options(model_args) if method == "lora" else None,
    )


def _prompt_settings(model, tokenizer, model_args: ModelArguments, method: str) -> PromptSettings | None:  # noqa: ANN001
    """The settings every checkpoint of this run carries; None for full fine-tuning (the Trainer
    saves the whole model, official key names)."""
    if method == "full":
        return None
    prompt_settings = PromptSettings.from_config(model.config, method)
    prompt_settings.base_model = str(Path(model_args.model_name_or_path).resolve())
    prompt_settings.family = tokenizer_family(tokenizer)
    return prompt_settings


def _set_activation_checkpointing(config, training_args: TrainingArguments, argv: list[str]) -> None:  # noqa: ANN001
    if config.pre_seq_len and not _gradient_checkpointing_given(argv):
        # The reference trains P-tuning with it on. Set the new name: after __post_init__ the
        # deprecated `gradient_checkpointing` alias is only a mirror the Trainer never reads.
        training_args.activation_checkpointing = True
    if training_args.activation_checkpointing:
        training_args.activation_checkpointing_kwargs = {"use_reentrant": False}


def _start_run_folder(training_args: TrainingArguments, settings: dict, resume: str | None, checkpoint_bytes: int) -> None:
    """Clear an earlier run's checkpoints (--overwrite_output_dir, unless resuming from this folder),
    write the run record and warn when a checkpoint may not fit."""
    with training_args.main_process_first(desc="clearing the output folder"):
        if training_args.process_index == 0:
            output_dir = Path(training_args.output_dir).resolve()
            resumes_here = resume is not None and output_dir in Path(resume).resolve().parents
            if training_args.overwrite_output_dir and not resumes_here:
                clear_earlier_run(output_dir)
            write_run_settings(training_args.output_dir, settings)  # the run record
            warn_if_low_space(training_args.output_dir, checkpoint_bytes)


@dataclass
class _Datasets:
    train: Any = None
    eval: Any = None
    predict: Any = None


def _datasets(tokenizer, data_args: DataTrainingArguments, training_args: TrainingArguments) -> _Datasets:  # noqa: ANN001
    """The preprocessed training, evaluation and prediction sets the flags ask for."""
    datasets = _Datasets()
    if training_args.do_train:
        datasets.train = _prepare(data_args.train_file, tokenizer, data_args, training_args, True, data_args.max_train_samples)
    if training_args.do_eval or training_args.eval_strategy != "no":
        if not data_args.validation_file:
            raise ValueError("--do_eval / --eval_strategy needs --validation_file")
        # Generation scores need prompt-only rows; the evaluation loss needs prompt + answer rows, as in training.
        as_training_rows = not training_args.predict_with_generate
        datasets.eval = _prepare(
            data_args.validation_file, tokenizer, data_args, training_args, as_training_rows, data_args.max_eval_samples
        )
    if training_args.do_predict:
        if not data_args.test_file:
            raise ValueError("--do_predict needs --test_file")
        if not training_args.predict_with_generate:
            raise ValueError("--do_predict generates answers: add --predict_with_generate")
        datasets.predict = _prepare(data_args.test_file, tokenizer, data_args, training_args, False, data_args.max_predict_samples)
    return datasets


def _collators(
    tokenizer, data_args: DataTrainingArguments, training_args: TrainingArguments, training: bool  # noqa: ANN001
) -> tuple[TrainBatchCollator, PromptBatchCollator]:
    """The training batches' collator and the eval/predict prompts' one (warning about padding
    settings that do not do what they seem to)."""
    if training and not data_args.ignore_pad_token_for_loss and not data_args.pad_to_max_length:
        logger.warning(
            "--ignore_pad_token_for_loss False trains on the padding, so per-batch padding changes the loss; "
            "add --pad_to_max_length for the reference's fixed layout"
        )
    if training_args.train_sampling_strategy == "group_by_length" and data_args.pad_to_max_length:
        logger.warning("--group_by_length has nothing to group with --pad_to_max_length: every row has the same length")
    train_collator = TrainBatchCollator(
        tokenizer.pad_token_id,
        label_pad_id=train_label_pad_id(tokenizer, data_args),
        pad_to_multiple_of=data_args.pad_to_multiple_of,
        fixed_layout=data_args.pad_to_max_length,
    )
    label_pad = IGNORE_INDEX if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id
    return train_collator, PromptBatchCollator(tokenizer, label_pad_id=label_pad)


def _generation_settings(data_args: DataTrainingArguments, training_args: TrainingArguments) -> dict:
    """generate() settings of evaluation and prediction: the reference's total length (prompt +
    answer) unless --generation_max_length, sampling and beams as the flags say. Also sets the
    Trainer's generation_max_length/generation_num_beams."""
    max_length = data_args.max_source_length + data_args.max_target_length + 1
    training_args.generation_max_length = training_args.generation_max_length or max_length
    if data_args.num_beams is not None:
        training_args.generation_num_beams = data_args.num_beams
    gen_kwargs = {"do_sample": data_args.do_sample, "max_length": training_args.generation_max_length}
    if data_args.do_sample:
        gen_kwargs.update(top_p=data_args.top_p, temperature=data_args.temperature)
    if training_args.generation_num_beams:
        gen_kwargs["num_beams"] = training_args.generation_num_beams
    return gen_kwargs


def _train(trainer: PromptTrainer, dataset, resume: str | None, trainable: int, total: int) -> None:  # noqa: ANN001
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics, train_samples=len(dataset), trainable_parameters=trainable, total_parameters=total)
    metrics.update(_token_metrics(trainer.train_token_counts(), result.metrics["train_runtime"]))
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():  # once, not once per rank
        if trainer.last_checkpoint is not None:
            print(f"checkpoint written to {trainer.last_checkpoint}")
        else:
            print(f"nothing to train: {resume} already reached step {trainer.state.global_step}; no checkpoint written")


def _evaluate(trainer: PromptTrainer, dataset) -> None:  # noqa: ANN001
    metrics = trainer.evaluate(metric_key_prefix="eval")
    metrics["eval_samples"] = len(dataset)
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)


def _token_metrics(counts: dict[str, int], runtime: float) -> dict[str, float]:
    """The token counts with their rates over the training runtime, and the padding share."""
    metrics = dict(counts)
    for key, value in counts.items():
        metrics[f"{key}_per_second"] = round(value / runtime, 3) if runtime else 0.0
    computed = counts["train_computed_tokens"]
    metrics["train_padding_share"] = round(1 - counts["train_real_tokens"] / computed, 4) if computed else 0.0
    return metrics


def _predict(trainer: PromptTrainer, dataset, tokenizer, training_args: TrainingArguments, gen_kwargs: dict) -> None:
    output = trainer.predict(dataset, metric_key_prefix="predict")
    metrics = dict(output.metrics, predict_samples=len(dataset))
    trainer.log_metrics("predict", metrics)
    trainer.save_metrics("predict", metrics)
    if not trainer.is_world_process_zero() or not training_args.predict_with_generate:
        return
    pad = tokenizer.pad_token_id
    predictions = tokenizer.batch_decode(
        [[t for t in row if t != IGNORE_INDEX] for row in output.predictions.tolist()], skip_special_tokens=True
    )
    labels = tokenizer.batch_decode(
        [[t if t != IGNORE_INDEX else pad for t in row] for row in output.label_ids.tolist()], skip_special_tokens=True
    )
    path = Path(training_args.output_dir) / "generated_predictions.txt"
    with open(path, "w", encoding="utf-8") as handle:
        for prediction, label in zip(predictions, labels):
            handle.write(json.dumps({"labels": label.strip(), "predict": prediction.strip()}, ensure_ascii=False) + "\n")
    settings_path = Path(training_args.output_dir) / "generation_settings.json"
    settings_path.write_text(json.dumps(gen_kwargs, indent=2) + "\n")
    print(f"predictions written to {path}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        model_args, data_args, training_args = parse_args(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finished = False
    try:
        run(model_args, data_args, training_args, argv)
        finished = True
    except (DataError, CheckpointError, MethodError, TrainingDiverged, RunFolderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a results file that cannot be written (full disk, permissions)
        print(f"error: {err.filename}: {err.strerror}" if err.filename and err.strerror else f"error: {err}", file=sys.stderr)
        return 1
    finally:
        _end_process_group(wait_for_all=finished)
    return 0


def _end_process_group(wait_for_all: bool) -> None:
    """Ends a launched run's process group before the interpreter exits. A rank that finished first and
    tore down its gloo connections while another still used them was seen to abort ("terminate called
    without an active exception", exit code -6), so a finished run first waits for every rank (not
    after an error: the other ranks may never arrive)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if wait_for_all:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
