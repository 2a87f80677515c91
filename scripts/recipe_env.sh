# Shared by train.sh, train_chat.sh and evaluate.sh: settings from the environment, the embedded
# default when MODEL_PATH is unset, and the launcher (python, or torchrun for NUM_GPUS > 1).
# shellcheck shell=bash

EMBEDDED_MODEL=chatglm_ptuning/embedded
if [ -z "${MODEL_PATH:-}" ]; then
  # The embedded default: a tiny ChatGLM2-architecture model this project pre-trained on its own
  # sample text, P-tuned on data_samples/ on a CPU in a few minutes.
  MODEL_PATH=$EMBEDDED_MODEL
  : "${TRAIN_FILE:=data_samples/adgen_train.json}" "${VALIDATION_FILE:=data_samples/adgen_dev.json}"
  : "${PRE_SEQ_LEN:=16}" "${PREFIX_PROJECTION:=1}" "${LR:=1e-2}" "${QUANTIZATION_BIT:=}"
  : "${MAX_SOURCE_LENGTH:=64}" "${MAX_TARGET_LENGTH:=96}" "${BATCH_SIZE:=8}" "${GRAD_ACCUM:=1}"
  : "${MAX_STEPS:=100}" "${LOGGING_STEPS:=10}" "${SAVE_STEPS:=50}"
  : "${OUTPUT_DIR:=output/embedded-pt-$PRE_SEQ_LEN-$LR}"
fi
: "${TRAIN_FILE:=AdvertiseGen/train.json}" "${VALIDATION_FILE:=AdvertiseGen/dev.json}"
: "${PROMPT_COLUMN:=content}" "${RESPONSE_COLUMN:=summary}"
: "${PRE_SEQ_LEN:=128}" "${LR:=2e-2}" "${QUANTIZATION_BIT=4}" "${NUM_GPUS:=1}"
: "${MAX_SOURCE_LENGTH:=64}" "${MAX_TARGET_LENGTH:=128}" "${BATCH_SIZE:=1}" "${GRAD_ACCUM:=16}"
: "${MAX_STEPS:=3000}" "${LOGGING_STEPS:=10}" "${SAVE_STEPS:=1000}"
: "${OUTPUT_DIR:=output/adgen-$(basename "$MODEL_PATH")-pt-$PRE_SEQ_LEN-$LR}"

run_recipe() {
  if [ "$NUM_GPUS" -gt 1 ]; then
    torchrun --standalone --nnodes=1 --nproc-per-node="$NUM_GPUS" -m chatglm_ptuning.train "$@"
  else
    python -m chatglm_ptuning.train "$@"
  fi
}
