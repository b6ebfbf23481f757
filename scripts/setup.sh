#!/usr/bin/env bash
# Install megatron_ted and what it needs into the current Python environment.
# torch first (CPU build when there is no GPU), so that pip does not pull a multi-GB CUDA build
# on a CPU machine; then the package with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q "torch>=2.6"
  else
    # A CPU wheel: the pinned version first (a local copy may be on disk), else PyTorch's CPU index.
    "$PYTHON" -m pip install -q torch==2.13.0 2>/dev/null \
      || "$PYTHON" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$PYTHON" -m pip install -q -e ".[test]"
"$PYTHON" -c "import torch, megatron.core, sentencepiece; print(f'setup ok: torch {torch.__version__}')"
