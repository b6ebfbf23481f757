#!/usr/bin/env bash
# Set up and run the CPU test suite (GPU tests are marked and skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ${PYTHON:-python3} -m pytest tests -q -p no:cacheprovider "$@"
