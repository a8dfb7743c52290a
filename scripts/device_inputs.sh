#!/usr/bin/env bash
# Run on a machine with network, before a call on a GPU machine without it: puts into the
# checkout (both paths git ignores) what scripts/gpu_check.sh reads there.
#
#   scripts/device_inputs.sh [BASELINE_REV]
#
# .whl/       the cudnn-frontend wheel for the GPU machine's Python (DEVICE_PYTHON, default
#             3.12): its headers build the convolution and batch norm graph paths; the
#             build stage installs it from there without network.
# .baseline/  with BASELINE_REV: that commit's tree (git archive), for the baseline stage
#             (BASELINE_DIR=.baseline), which builds and benchmarks it before this tree.
# Both must travel with the working tree to the GPU machine (they are ignored files).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}
# The bound `make install` puts on the frontend (Makefile).
FRONTEND=${FRONTEND:-"nvidia-cudnn-frontend>=1.16,<1.29"}

rm -rf .whl && mkdir -p .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$FRONTEND"
ls -l .whl

if [ $# -ge 1 ]; then
  rm -rf .baseline && mkdir -p .baseline
  git archive "$1" | tar -x -C .baseline
  echo "baseline $(git rev-parse --short "$1") in .baseline"
  if ! grep -q "NVRTC_LIBRARY\|CUDA::nvrtc" .baseline/CMakeLists.txt; then
    echo "note: this baseline links no NVRTC; with frontend 1.19+ headers its extension will"
    echo "not import until .baseline/CMakeLists.txt links CUDA::nvrtc (gpu_check.sh's baseline)"
  fi
fi
echo "carry: .whl${1:+ .baseline}"
