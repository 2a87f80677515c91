#!/usr/bin/env bash
# Full-parameter fine-tuning under DeepSpeed ZeRO-2, the reference recipe's ds_train_finetune.sh
# on this toolkit (no prefix: every weight is trained and the whole model is saved).
#
#   MODEL_PATH=/models/chatglm-6b TRAIN_FILE=AdvertiseGen/train.json bash scripts/ds_train_finetune.sh
#   # without GPUs (bf16 on CPU; fp16 needs a GPU):
#   MODEL_PATH=... NUM_GPUS=2 PRECISION="--bf16 --use_cpu" bash scripts/ds_train_finetune.sh
#
# Environment (reference defaults; relative paths are taken from the repository root):
#   MODEL_PATH (required) local ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B folder
#   TRAIN_FILE (AdvertiseGen/train.json) TEST_FILE (AdvertiseGen/dev.json)
#   PROMPT_COLUMN (content) RESPONSE_COLUMN (summary)
#   LR (1e-4) NUM_GPUS (4) MASTER_PORT (random) DS_CONFIG (scripts/ds_zero2.json)
#   MAX_SOURCE_LENGTH (64) MAX_TARGET_LENGTH (64) BATCH_SIZE (4) GRAD_ACCUM (1)
#   MAX_STEPS (5000) LOGGING_STEPS (10) SAVE_STEPS (1000) OUTPUT_DIR (output/adgen-<model>-ft-<LR>)
#   PRECISION (--fp16; "--bf16", "--bf16 --use_cpu", or empty for fp32)
# Arguments given to this script are passed on to `chatglm_ptuning.train`.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${MODEL_PATH:?set MODEL_PATH to a local ChatGLM model folder}"
: "${TRAIN_FILE:=AdvertiseGen/train.json}" "${TEST_FILE:=AdvertiseGen/dev.json}"
: "${PROMPT_COLUMN:=content}" "${RESPONSE_COLUMN:=summary}"
: "${LR:=1e-4}" "${NUM_GPUS:=4}" "${MASTER_PORT:=$(shuf -n 1 -i 10000-65535)}" "${DS_CONFIG:=scripts/ds_zero2.json}"
: "${MAX_SOURCE_LENGTH:=64}" "${MAX_TARGET_LENGTH:=64}" "${BATCH_SIZE:=4}" "${GRAD_ACCUM:=1}"
: "${MAX_STEPS:=5000}" "${LOGGING_STEPS:=10}" "${SAVE_STEPS:=1000}"
: "${OUTPUT_DIR:=output/adgen-$(basename "$MODEL_PATH")-ft-$LR}"
PRECISION=${PRECISION---fp16}
read -r -a precision_flags <<< "$PRECISION"

# The launcher runs `python -m chatglm_ptuning.train` from here, installed or not.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
deepspeed --num_gpus="$NUM_GPUS" --master_port "$MASTER_PORT" --module chatglm_ptuning.train \
  --deepspeed "$DS_CONFIG" \
  --do_train \
  --train_file "$TRAIN_FILE" \
  --test_file "$TEST_FILE" \
  --prompt_column "$PROMPT_COLUMN" --response_column "$RESPONSE_COLUMN" \
  --overwrite_cache \
  --model_name_or_path "$MODEL_PATH" \
  --output_dir "$OUTPUT_DIR" --overwrite_output_dir \
  --max_source_length "$MAX_SOURCE_LENGTH" --max_target_length "$MAX_TARGET_LENGTH" \
  --per_device_train_batch_size "$BATCH_SIZE" --per_device_eval_batch_size 1 \
  --gradient_accumulation_steps "$GRAD_ACCUM" \
  --predict_with_generate \
  --max_steps "$MAX_STEPS" --logging_steps "$LOGGING_STEPS" --save_steps "$SAVE_STEPS" \
  --learning_rate "$LR" \
  ${precision_flags[@]+"${precision_flags[@]}"} \
  "$@"
