#!/usr/bin/env bash
# Install chatglm-ptuning and its dependencies into the current Python environment.
#
# torch comes first: an installed torch (your CUDA build, say) is kept; with none installed,
# machines with an NVIDIA GPU get the default (CUDA) wheel and machines without one get the
# CPU wheel, so no dependency (deepspeed, accelerate, peft) pulls a multi-GB CUDA build.
#   TORCH_CPU_VERSION  CPU torch version to install (default 2.13.0)
#   TORCH_INDEX_URL    extra index holding "+cpu" wheels (default: PyTorch's CPU index; empty: none)
# --test also installs what the browser test drives: Debian's chromium and a CJK font (apt-get, as root).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--test" ] && ! { command -v chromium && fc-list :lang=zh | grep -q .; } >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-wqy-zenhei
  else
    echo "install: the browser test needs chromium and a CJK font (Debian, as root: apt-get install chromium fonts-wqy-zenhei)" >&2
  fi
fi

if python -c "import torch" >/dev/null 2>&1; then
  echo "install: keeping torch $(python -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  python -m pip install torch
else
  index_url="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
  python -m pip install "torch==${TORCH_CPU_VERSION:-2.13.0}+cpu" ${index_url:+--extra-index-url "$index_url"}
fi
python -m pip install -r requirements.txt -r requirements-test.txt
python -m pip install --no-deps -e .
