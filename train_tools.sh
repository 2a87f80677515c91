#!/usr/bin/env bash
# P-tuning v2 of ChatGLM3-6B on tool-use conversations (`tools` + `tool` steps), the old ChatGLM3
# finetune_pt_multiturn.sh on this toolkit:
#   MODEL_PATH=/models/chatglm3-6b bash train_tools.sh       # data_samples/tools_train.json
# Tool calls are ChatGLM3's: MODEL_PATH must be a ChatGLM3-6B folder (the embedded model is ChatGLM2).
# Environment as train.sh; defaults here: the tools sample files, max lengths 1024 / 128 (the tool
# definitions make long prompts), --train_format conversations.
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${MODEL_PATH:-}" ]; then
  echo "error: set MODEL_PATH to a ChatGLM3-6B folder (tool calls need ChatGLM3; the embedded model is ChatGLM2)" >&2
  exit 2
fi
: "${TRAIN_FILE:=data_samples/tools_train.json}" "${VALIDATION_FILE:=data_samples/tools_dev.json}"
: "${MAX_SOURCE_LENGTH:=1024}" "${MAX_TARGET_LENGTH:=128}"
export TRAIN_FILE VALIDATION_FILE MAX_SOURCE_LENGTH MAX_TARGET_LENGTH
exec bash train.sh --train_format conversations "$@"
