#!/usr/bin/env bash
# The one prepared GPU check (bench/gpu_check.py says what it measures). Before a session's device call,
# here on CPU:
#     EXTRA="liger-kernel==0.8.5 compressed-tensors==0.19.0 loguru==0.7.3" ../shared/device/make-gpu-bundle
#     .venv/bin/python bench/gpu_check.py --prepare .gpu-check
# then run `bash bench/gpu_check.sh` on the device with carry [".gpu-bundle", ".gpu-check"]: it installs the
# bundle (Ray, DeepSpeed, Liger Kernel, compressed-tensors) and writes $OUT/gpu_check.json in under 9 minutes.
#     bash bench/gpu_check.sh --dry-run   # CPU, tiny shapes: what the test suite runs (PYTHON= picks the python)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != "--dry-run" ]; then
  # shellcheck disable=SC1091
  source .gpu-bundle/install.sh
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"${PYTHON:-python3}" bench/gpu_check.py "$@" --out "${OUT:-runs}/gpu_check.json"
