#!/usr/bin/env bash
# Feasibility probes: stand-alone C++ programs that ask cuDNN a question the library's
# design depends on, compiled and run on a GPU machine against the installed cuDNN and
# cudnn-frontend headers (no network; a frontend wheel in ./.whl is installed first).
#
#   benchmarks/probes/run.sh PROBE [LOG_DIR]     PROBE: resample_probe | conv_engines_probe
#
# LOG_DIR defaults to $OUT, else ./probe-logs; the probe's output goes to LOG_DIR/PROBE.log.
# What each probe found is in BENCHMARKS.md.
set -u
cd "$(dirname "$0")/../.."
PROBE=${1:?"usage: $0 resample_probe|conv_engines_probe [LOG_DIR]"}
LOG_DIR=${2:-${OUT:-probe-logs}}
mkdir -p "$LOG_DIR"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install --no-index --no-deps --no-cache-dir .whl/*.whl >/dev/null 2>&1
fi
CUDNN=$(python3 -c "import nvidia.cudnn as m; print(list(m.__path__)[0])")
FRONTEND=$(python3 -c "import cudnn, os; print(os.path.join(os.path.dirname(cudnn.__file__), '..', 'include'))")
nvidia-smi --query-gpu=name --format=csv,noheader
nvcc -O1 -std=c++17 -Xcompiler -Wno-deprecated-declarations "benchmarks/probes/$PROBE.cc" \
  -o "/tmp/$PROBE" -I"$FRONTEND" -I"$CUDNN/include" -L"$CUDNN/lib" -l:libcudnn.so.9 \
  -Xlinker -rpath -Xlinker "$CUDNN/lib" || exit 1
"/tmp/$PROBE" 2>&1 | tee "$LOG_DIR/$PROBE.log"
