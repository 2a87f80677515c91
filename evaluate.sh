#!/usr/bin/env bash
# Generate on a test set with a trained prefix and score it (ROUGE-1/2/L, BLEU-4), the
# reference recipe's evaluate.sh on this toolkit.
#
#   bash evaluate.sh                   # the checkpoint the embedded `bash train.sh` run wrote
#   MODEL_PATH=/models/chatglm2-6b CHECKPOINT=output/adgen-chatglm2-6b-pt-128-2e-2/checkpoint-3000 bash evaluate.sh
#
# Environment: the same as train.sh, plus
#   CHECKPOINT      checkpoint folder, any method (default: the last complete checkpoint in OUTPUT_DIR, which
#                   holds only the checkpoints of the last train.sh run there)
#   TEST_FILE       (default: VALIDATION_FILE)   EVAL_BATCH_SIZE (8)   DO_SAMPLE (True; False = greedy, deterministic)
# Results: OUTPUT_DIR/generated_predictions.txt and OUTPUT_DIR/predict_results.json.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/recipe_env.sh
: "${TEST_FILE:=$VALIDATION_FILE}" "${EVAL_BATCH_SIZE:=8}" "${DO_SAMPLE:=True}"
if [ -z "${CHECKPOINT:-}" ]; then
  CHECKPOINT=$(python -c "import sys; from chatglm_ptuning.trainer import last_complete_checkpoint as f; print(f(sys.argv[1]) or '')" "$OUTPUT_DIR")
  if [ -z "$CHECKPOINT" ]; then
    echo "error: no complete checkpoint in $OUTPUT_DIR; run 'bash train.sh' first or set CHECKPOINT=" >&2
    exit 1
  fi
fi
echo "evaluating $CHECKPOINT on $TEST_FILE"

args=(
  --do_predict
  --test_file "$TEST_FILE"
  --overwrite_cache
  --prompt_column "$PROMPT_COLUMN" --response_column "$RESPONSE_COLUMN"
  --model_name_or_path "$MODEL_PATH"
  --ptuning_checkpoint "$CHECKPOINT"
  --output_dir "$OUTPUT_DIR"
  --max_source_length "$MAX_SOURCE_LENGTH" --max_target_length "$MAX_TARGET_LENGTH"
  --per_device_eval_batch_size "$EVAL_BATCH_SIZE"
  --predict_with_generate
  --do_sample "$DO_SAMPLE"
)
[ -n "${HISTORY_COLUMN:-}" ] && args+=(--history_column "$HISTORY_COLUMN")
[ -n "${QUANTIZATION_BIT:-}" ] && args+=(--quantization_bit "$QUANTIZATION_BIT")
run_recipe "${args[@]}" "$@"
