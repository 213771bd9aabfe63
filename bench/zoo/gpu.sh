#!/usr/bin/env bash
# The zoo on the GPU machine, one step per device call (each under 10 minutes), after
# ../shared/gpu/install.sh unpacked TensorRT (/opt/trt) and the wheels (/opt/py312, which must hold
# onnx-graphsurgeon for the adapt step: make-wheels .gpu/py312 "prefect>=3.9" boto3 pyyaml onnx-graphsurgeon).
#   bash bench/zoo/gpu.sh export [--only a,b]      # ~3-4 min: packages into $ZOO
#   bash bench/zoo/gpu.sh check  [--only a,b]      # CPU: validate + adapt + ORT on eval data
#   bash bench/zoo/gpu.sh convert [--only a,b]     # repeat until every model has a line; skips done ones
#   bash bench/zoo/gpu.sh table
#   [ZOO_BIG=1] bash bench/zoo/gpu.sh all --jobs 6 --budget 560   # ONE call (ZOO_BIG: also the 2.4 GB model): export what is missing, convert N at
#       once until the budget is spent, write $OUT/zoo-table.md + $OUT/zoo-results.jsonl; run it again
#       to continue where it stopped (done models are skipped; $ZOO lives in the ignored .zoo/).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME=/tmp/prefect-home PYTHONUNBUFFERED=1
export TRT_PYTHON=${TRT_PYTHON:-/opt/trt/bin/trt-python}
export PYTHONPATH=/opt/py312:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
ZOO=${ZOO:-$PWD/.zoo}
step=${1:?step: all | export | check | convert | table}; shift
case "$step" in
  export)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
    timeout 560 python3 bench/zoo/export_zoo.py --bucket "$ZOO" "$@" 2>&1 | grep -E '^\{' | tee -a "$OUT/zoo-export.txt"
    ;;
  check)
    timeout 560 python3 bench/zoo/check_zoo.py --bucket "$ZOO" "$@" 2>&1 | grep -E '^\{' | tee "$OUT/zoo-check.jsonl"
    ;;
  convert)
    timeout 590 python3 bench/zoo/run_zoo.py convert --bucket "$ZOO" --budget 540 "$@" 2>&1 | grep -E '^\{' | cut -c1-400
    python3 bench/zoo/run_zoo.py table --bucket "$ZOO" --out "$OUT/zoo-table.md" | tail -3
    cp "$ZOO/_zoo/results.jsonl" "$OUT/zoo-results-all.jsonl"
    ;;
  table)
    python3 bench/zoo/run_zoo.py table --bucket "$ZOO" --out "$OUT/zoo-table.md"
    ;;
  all)
    jobs=6; budget=560; rest=()
    while [ $# -gt 0 ]; do
      case "$1" in
        --jobs) jobs=$2; shift 2 ;;
        --budget) budget=$2; shift 2 ;;
        *) rest+=("$1"); shift ;;
      esac
    done
    start=$SECONDS
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
    # export: at most a third of the budget; what it does not finish, the next call exports
    timeout $((budget / 3 + 30)) python3 bench/zoo/export_zoo.py --bucket "$ZOO" --jobs 4 --budget $((budget / 3)) ${ZOO_BIG:+--big} 2>&1 \
      | grep -E '^\{' | cut -c1-300 | tee -a "$OUT/zoo-export.txt"
    # passes: by default every model's FP16 first (short builds), then INT8 for the models that try it,
    # so a slow INT8 build never keeps a model's FP16 result from the table. ZOO_PASSES="precision:names
    # ..." orders them otherwise, e.g. "fp16:a,b int8:a,b fp16:c" (names empty: --only's, or all)
    for pass in ${ZOO_PASSES:-fp16: int8:}; do
      precision=${pass%%:*}; names=${pass#*:}
      left=$((budget - (SECONDS - start) - 20))
      echo "$precision pass (${names:-all}) after $((SECONDS - start)) s; converting for $left s with $jobs jobs"
      [ "$left" -gt 45 ] || break
      timeout $((left + 15)) python3 bench/zoo/run_zoo.py convert --bucket "$ZOO" --budget "$left" --jobs "$jobs" \
        --precisions "$precision" "${rest[@]}" ${names:+--only "$names"} 2>&1 | grep -E '^\{' | cut -c1-300
    done
    python3 bench/zoo/run_zoo.py table --bucket "$ZOO" --out "$OUT/zoo-table.md" | tail -4
    cp "$ZOO/_zoo/results.jsonl" "$OUT/zoo-results.jsonl"
    ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
