#!/usr/bin/env bash
# The second device call, on a quiet GPU after bench/gpu_session.sh (its zoo export is in .zoo/):
# issue 14's FP16-graph comparison (ResNet-50 and the zoo's YOLO-style detector, forced graph FP16
# against the builder flag) and issue 13's fidelity + honesty measures. Results: $OUT/res2.tgz + stdout.
#   bash bench/gpu_session2.sh [seconds, default 390]
set -uo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1
export TRT_PYTHON=${TRT_PYTHON:-/opt/trt/bin/trt-python}
TOTAL=${1:-390}; end=$(( $(date +%s) + TOTAL ))
OUT=${OUT:-/tmp/out}; RES=/tmp/res2; WORK=/tmp/gpu-bench; mkdir -p "$OUT" "$RES/bench" "$WORK/zoo/models"
trap 'cp /tmp/res/zoo/zoo-table.md /tmp/res/zoo/zoo-results.jsonl "$RES/" 2>/dev/null; tar -C "$RES" -czf "$OUT/res2.tgz" .' EXIT
pkill -f "bench/zoo/" 2>/dev/null; pkill -f "tasks.gpu" 2>/dev/null   # the zoo's budget is over: a quiet GPU
det=$PWD/.zoo/models/yolo_style/model.onnx
[ -f "$det" ] && ln -sfn "$PWD/.zoo/models/yolo_style" "$WORK/zoo/models/yolo_style"
echo "== fp16 graph vs flag (ResNet-50, detector)"
TRTFLOW_FP16_COMPARE=$det timeout -s INT 220 $TRT_PYTHON -m pytest tests/gpu/test_fp16_graph.py -q -s -p no:cacheprovider \
  -rfE --tb=short -k pycuda 2>&1 | tee "$RES/fp16-graph.txt" | grep -E "graph|flag|ratio|passed|failed|Error" | cut -c1-300 | tail -20
echo "== bench: fidelity, honesty"
timeout 60 python3 bench/export_resnet.py --out "$WORK/resnet50.onnx" > "$RES/bench/export.log" 2>&1
left=$(( end - $(date +%s) - 15 ))
timeout $left $TRT_PYTHON bench/gpu_bench.py --work "$WORK" --out "$RES/bench" --level 1 --rounds 3 \
  --deadline $(( end - 40 )) --only fidelity,honesty 2>&1 | tee "$RES/bench/run.log" | grep -E '^\{' | cut -c1-600
