#!/usr/bin/env bash
# One command on a GPU machine: the kernel GPU tests, then the kernel benchmark (JSON + PNG).
# Results go to $OUT when set (the device tool's output folder), else benchmarks/results/.
#   bash scripts/gpu.sh                 # tests + full benchmark
#   bash scripts/gpu.sh --decode-only   # tests + the decode benchmark only (~2-3 min on an H100)
#   GPU_SKIP_TESTS=1 bash scripts/gpu.sh --sweep-only
# Extra arguments are passed to benchmarks/kernels.py.  Works without installing fluxc: the kernels
# package is loaded from kernels/ by path (FLUXC_KERNELS_STANDALONE=1).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/benchmarks/results}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export FLUXC_KERNELS_STANDALONE="${FLUXC_KERNELS_STANDALONE:-1}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/fluxc-inductor-cache}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true

BENCH_NAME="${BENCH_NAME:-kernels_bench}"
for a in "$@"; do
  if [ "$a" = "--decode-only" ] && [ "$BENCH_NAME" = "kernels_bench" ]; then BENCH_NAME=kernels_bench_decode; fi
done

rc=0
if [ "${GPU_SKIP_TESTS:-0}" != "1" ]; then
  start=$(date +%s)
  "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_kernels_gpu.py 2>&1 | tee "$OUT_DIR/kernels_gpu_tests.log"
  rc=${PIPESTATUS[0]}
  echo "gpu tests: rc=$rc in $(( $(date +%s) - start )) s"
fi
if [ "${GPU_SKIP_BENCH:-0}" != "1" ]; then
  "$PY" benchmarks/kernels.py --out "$OUT_DIR/$BENCH_NAME.json" "$@" 2>&1 | tee "$OUT_DIR/$BENCH_NAME.log"
  "$PY" benchmarks/plot_kernels.py "$OUT_DIR/$BENCH_NAME.json" \
      "$OUT_DIR/$BENCH_NAME.png" || echo "plot skipped (run benchmarks/plot_kernels.py elsewhere)"
fi
exit $rc
