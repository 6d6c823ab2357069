#!/usr/bin/env bash
# One command on the GPU machine: the end-to-end benchmark (benchmarks/e2e.py), then its plot.
# Results go to $OUT when set (the device tool's output folder), else benchmarks/results/:
#   $NAME.json (rewritten after every measurement), $NAME.log, $NAME.png      (NAME: e2e_h100)
#   FLUXC_COMMIT=$(git rev-parse HEAD) bash scripts/gpu_e2e.sh            # the copy there has no .git
#   E2E_BUDGET=500 bash scripts/gpu_e2e.sh --rs 0,0.75,1                  # extra args go to e2e.py
# The Python process gets E2E_BUDGET seconds (phases are planned inside it), then SIGINT (it writes what it
# has and prints its summary), then SIGKILL 20 s later; the plot runs after, on whatever the JSON holds.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT_DIR="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
NAME="${BENCH_NAME:-e2e_h100}"
BUDGET="${E2E_BUDGET:-500}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/fluxc-inductor-cache}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
unset TRITON_INTERPRET

# fluxc is not installed there and pip can reach no index: the checkout's fluxc/ is the package.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem --format=csv || true
start=$(date +%s)
timeout --signal=INT --kill-after=20 "$((${BUDGET%.*} + 30))" \
  "$PY" benchmarks/e2e.py --out "$OUT_DIR/$NAME.json" --time-budget "$BUDGET" "$@" 2>&1 | tee "$OUT_DIR/$NAME.log"
rc=${PIPESTATUS[0]}
echo "e2e: rc=$rc in $(( $(date +%s) - start )) s"
"$PY" benchmarks/plot_e2e.py "$OUT_DIR/$NAME.json" "$OUT_DIR/$NAME.png" \
  || echo "plot skipped (run: python benchmarks/plot_e2e.py $NAME.json $NAME.png elsewhere)"
exit "$rc"
