#!/usr/bin/env bash
# Issue 13's four GPU measures (fidelity, honesty, INT8 payoff, warm rebuild) in ONE device call
# (< 10 min on an H200), after ../shared/gpu/install.sh has unpacked TensorRT 8.6 (/opt/trt) and,
# for the Q/DQ models, the Prefect wheels (/opt/py312: pydantic for tasks/quantize):
#   bash bench/gpu_bench.sh            # prints one JSON line per measure, writes $OUT/bench-<measure>-<models>.json
# Steps: export ResNet-50 (torchvision) and the zoo's YOLO-style detector with the machine's python3
# (torch), make their Q/DQ models (tasks/quantize, python3 + /opt/py312), then bench/gpu_bench.py
# under the TensorRT interpreter. Every build on both sides of a pair uses builder optimisation level
# $LEVEL (default 1; level 3 does not fit four measures into 10 minutes). A step that fails is
# reported and the rest still run; bench/gpu_bench.py skips what would run past the call's end.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TRT_PYTHON=${TRT_PYTHON:-/opt/trt/bin/trt-python}
WORK=${WORK:-/tmp/gpu-bench}; LEVEL=${LEVEL:-1}; BUDGET_S=${BUDGET_S:-560}
deadline=$(( $(date +%s) + BUDGET_S - 90 ))   # no new measure starts in the last 90 s
mkdir -p "$WORK"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
step() { local name=$1; shift; local t=$(date +%s); "$@" > "$OUT/step-$name.log" 2>&1; local rc=$?
         echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t ))}"; [ $rc -eq 0 ] || tail -5 "$OUT/step-$name.log"; }
[ -f "$WORK/resnet50.onnx" ] || step export-resnet50 timeout 150 python3 bench/export_resnet.py --out "$WORK/resnet50.onnx"
[ -f "$WORK/zoo/models/yolo_style/model.onnx" ] || \
  step export-detector timeout 150 python3 bench/zoo/export_zoo.py --bucket "$WORK/zoo" --only yolo_style
# Q/DQ models in parallel with nothing else on the GPU yet (CPU work: onnxruntime calibration on random images)
[ -f "$WORK/resnet50.qdq.onnx" ] || step qdq-resnet50 env PYTHONPATH=/opt/py312:. timeout 180 python3 bench/qdq_resnet.py \
  --onnx "$WORK/resnet50.onnx" --out "$WORK" --name resnet50 --skip-ort --samples 16 &
[ -f "$WORK/detector.qdq.onnx" ] || step qdq-detector env PYTHONPATH=/opt/py312:. timeout 180 python3 bench/qdq_resnet.py \
  --onnx "$WORK/zoo/models/yolo_style/model.onnx" --out "$WORK" --name detector --skip-ort --samples 16 --chw 3,640,640 &
# One process per (model, measures): each prints its JSON lines when done, so a call that ends early
# still brings back what finished. ResNet-50's fidelity/honesty/warm rebuild need no Q/DQ model and
# start now; the int8 runs wait for the Q/DQ jobs. Measure 4 builds at --warm-level (3).
bench() { local models=$1 only=$2 left=$(( deadline - $(date +%s) + 60 ))
  [ "$left" -gt 30 ] || { echo "{\"measure\": \"$only\", \"models\": \"$models\", \"skipped\": \"no time left\"}"; return; }
  timeout "$left" "$TRT_PYTHON" bench/gpu_bench.py --work "$WORK" --out "$OUT" --level "$LEVEL" --deadline "$deadline" \
    --models "$models" --only "$only" || echo "{\"measure\": \"$only\", \"models\": \"$models\", \"error\": \"timed out or crashed\"}"; }
# ResNet-50's four measures first (each goal is stated on it), then the detector's two
bench resnet50 fidelity,honesty
wait
bench resnet50 int8
bench resnet50 warm_rebuild
bench detector fidelity
bench detector int8
ls "$OUT"
