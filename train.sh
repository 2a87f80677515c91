#!/usr/bin/env bash
# P-tuning v2 training, the reference recipe's train.sh on this toolkit.
#
#   bash train.sh                      # the embedded tiny model on data_samples/ (CPU, a few minutes)
#   MODEL_PATH=/models/chatglm2-6b TRAIN_FILE=AdvertiseGen/train.json VALIDATION_FILE=AdvertiseGen/dev.json bash train.sh
#
# Environment (reference defaults for a real model; unset MODEL_PATH selects the embedded default):
#   MODEL_PATH        local ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B folder
#   TRAIN_FILE VALIDATION_FILE PROMPT_COLUMN (content) RESPONSE_COLUMN (summary) HISTORY_COLUMN (none)
#   PRE_SEQ_LEN (128) PREFIX_PROJECTION (empty; 1 = MLP reparameterisation) LR (2e-2)
#   QUANTIZATION_BIT (4; empty = no quantization) NUM_GPUS (1; >1 launches torchrun)
#   MAX_SOURCE_LENGTH (64) MAX_TARGET_LENGTH (128) BATCH_SIZE (1) GRAD_ACCUM (16)
#   MAX_STEPS (3000) LOGGING_STEPS (10) SAVE_STEPS (1000) OUTPUT_DIR (output/adgen-<model>-pt-<PRE_SEQ_LEN>-<LR>)
# Arguments given to this script are passed on to `python -m chatglm_ptuning.train` (e.g. --bf16).
# A rerun into the same OUTPUT_DIR starts over: the earlier run's checkpoints and results are removed
# first (files this toolkit did not write are left). To continue a run instead:
#   bash train.sh --resume_from_checkpoint True      # the same settings (LR may be lowered)
set -euo pipefail
cd "$(dirname "$0")"
source scripts/recipe_env.sh

args=(
  --do_train
  --train_file "$TRAIN_FILE"
  --prompt_column "$PROMPT_COLUMN" --response_column "$RESPONSE_COLUMN"
  --overwrite_cache
  --model_name_or_path "$MODEL_PATH"
  --output_dir "$OUTPUT_DIR" --overwrite_output_dir
  --max_source_length "$MAX_SOURCE_LENGTH" --max_target_length "$MAX_TARGET_LENGTH"
  --per_device_train_batch_size "$BATCH_SIZE" --per_device_eval_batch_size "$BATCH_SIZE"
  --gradient_accumulation_steps "$GRAD_ACCUM"
  --predict_with_generate
  --max_steps "$MAX_STEPS" --logging_steps "$LOGGING_STEPS" --logging_first_step --save_steps "$SAVE_STEPS"
  --learning_rate "$LR"
  --pre_seq_len "$PRE_SEQ_LEN"
)
[ -n "${VALIDATION_FILE:-}" ] && args+=(--validation_file "$VALIDATION_FILE")
[ -n "${HISTORY_COLUMN:-}" ] && args+=(--history_column "$HISTORY_COLUMN")
[ -n "${PREFIX_PROJECTION:-}" ] && args+=(--prefix_projection)
[ -n "${QUANTIZATION_BIT:-}" ] && args+=(--quantization_bit "$QUANTIZATION_BIT")
[ -n "${REPORT_TO:-}" ] && args+=(--report_to "$REPORT_TO")
run_recipe "${args[@]}" "$@"
