"""Evaluation rows for tests: ADGEN dev prompts with their reference answers, preprocessed as
`--do_predict` preprocesses them."""

from __future__ import annotations

from official_layout import REPO_ROOT

ADGEN_DEV = str(REPO_ROOT / "data_samples" / "adgen_dev.json")


def adgen_eval_rows(tokenizer, count: int, max_source: int, max_target: int):  # noqa: ANN001, ANN201
    """The first `count` rows of data_samples/adgen_dev.json as input_ids (prompt) + labels (answer)."""
    from chatglm_ptuning.arguments import DataTrainingArguments
    from chatglm_ptuning.data import build_preprocess_function, load_rows

    args = DataTrainingArguments(test_file=ADGEN_DEV, prompt_column="content", response_column="summary",
                                 max_source_length=max_source, max_target_length=max_target)
    dataset = load_rows(ADGEN_DEV, args).to_dataset().select(range(count))
    dataset = dataset.map(build_preprocess_function(tokenizer, args, train=False), batched=True, batch_size=1,
                          remove_columns=dataset.column_names)
    return dataset.select_columns(["input_ids", "labels"])


def predicting_trainer(model, tokenizer, output_dir, eval_batch_size: int, generation_kwargs: dict, **options):  # noqa: ANN001, ANN201
    """A PromptTrainer that predicts by generation on the CPU, the eval collator batching prompts;
    `options` are further PromptTrainer arguments."""
    from chatglm_ptuning.arguments import TrainingArguments
    from chatglm_ptuning.collator import PromptBatchCollator
    from chatglm_ptuning.trainer import PromptTrainer

    args = TrainingArguments(output_dir=str(output_dir), per_device_eval_batch_size=eval_batch_size,
                             predict_with_generate=True, report_to=[], use_cpu=True, disable_tqdm=True)
    collator = PromptBatchCollator(tokenizer)
    return PromptTrainer(model=model, args=args, processing_class=tokenizer, data_collator=collator, eval_collator=collator,
                         generation_kwargs=generation_kwargs, **options)
