#!/usr/bin/env bash
# P-tuning v2 on multi-turn chat data (prompt / response / history), the reference train_chat.sh.
#   bash train_chat.sh                 # embedded model on data_samples/chat_train.json
# Environment as train.sh; defaults here: chat columns, LR 1e-2, max lengths 256 / 256.
set -euo pipefail
cd "$(dirname "$0")"
: "${TRAIN_FILE:=data_samples/chat_train.json}" "${VALIDATION_FILE:=data_samples/chat_dev.json}"
: "${PROMPT_COLUMN:=prompt}" "${RESPONSE_COLUMN:=response}" "${HISTORY_COLUMN:=history}"
: "${LR:=1e-2}" "${MAX_SOURCE_LENGTH:=256}" "${MAX_TARGET_LENGTH:=256}"
if [ -z "${MODEL_PATH:-}" ]; then : "${OUTPUT_DIR:=output/embedded-chat-pt}"; fi
export TRAIN_FILE VALIDATION_FILE PROMPT_COLUMN RESPONSE_COLUMN HISTORY_COLUMN LR MAX_SOURCE_LENGTH MAX_TARGET_LENGTH
export OUTPUT_DIR="${OUTPUT_DIR:-}"
[ -z "$OUTPUT_DIR" ] && unset OUTPUT_DIR
exec bash train.sh "$@"
