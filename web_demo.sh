#!/usr/bin/env bash
# Browser chat with a P-tuned model, the reference recipe's web_demo.sh on this toolkit.
#
#   bash web_demo.sh                   # the prefix the embedded `bash train.sh` run wrote, on 127.0.0.1:7860
#   MODEL_PATH=/models/chatglm2-6b CHECKPOINT=output/adgen-chatglm2-6b-pt-128-2e-2/checkpoint-3000 bash web_demo.sh
#   bash web_demo.sh --model_name_or_path /models/chatglm2-6b   # flags only: no defaults filled in
#
# Environment: the same as train.sh, plus
#   CHECKPOINT      checkpoint folder, any method (default: the last complete checkpoint in OUTPUT_DIR, which
#                   holds only the checkpoints of the last train.sh run there)
# Arguments are passed on to `python -m chatglm_ptuning.web_demo` (--host, --port, --share, ...;
# see --help).
set -euo pipefail
cd "$(dirname "$0")"
case " $* " in
  *" --model_name_or_path"* | *" -h "* | *" --help "*) exec python -m chatglm_ptuning.web_demo "$@" ;;
esac
source scripts/recipe_env.sh
if [ -z "${CHECKPOINT:-}" ]; then
  CHECKPOINT=$(python -c "import sys; from chatglm_ptuning.trainer import last_complete_checkpoint as f; print(f(sys.argv[1]) or '')" "$OUTPUT_DIR")
  if [ -z "$CHECKPOINT" ]; then
    echo "error: no complete checkpoint in $OUTPUT_DIR; run 'bash train.sh' first (the same environment), or set CHECKPOINT=" >&2
    exit 1
  fi
fi
echo "serving $CHECKPOINT" >&2
args=(--model_name_or_path "$MODEL_PATH" --ptuning_checkpoint "$CHECKPOINT")
[ -n "${QUANTIZATION_BIT:-}" ] && args+=(--quantization_bit "$QUANTIZATION_BIT")
exec python -m chatglm_ptuning.web_demo "${args[@]}" "$@"
