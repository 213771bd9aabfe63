#!/usr/bin/env bash
# A whole GPU round on the lent machine, started once in the background (setsid) right after
# ../shared/gpu/install.sh --finish, so that the work does not stop at the 10-minute call boundary:
# each later device call only runs `bash bench/gpu_wait.sh <seconds>`, which prints what finished
# and brings /tmp/res back as $OUT/res.tgz.
#   ROUND_S=1500 STEPS="tests bench fp16 stack zoo" setsid bash bench/gpu_round.sh > /tmp/round.log 2>&1 < /dev/null &
#
# Steps run ONE AFTER ANOTHER, in the order given, each within its cap and the round's deadline: on
# 2026-12-02 everything at once (GPU tests, 4 zoo jobs, the stack) made every build ~10x slower (a
# small CNN's FP16 build 93 s instead of ~7 s) and nothing finished. Only the detector's export (CPU,
# torch) runs beside them, from the start.
#   tests  tests/gpu, both CUDA backends, 3 xdist workers, every test's outcome listed (-rA)
#   bench  issue 13's four GPU measures (bench/gpu_bench.sh), one model per process
#   fp16   issue 14: FP16 from the graph against the FP16 flag on the zoo's detector
#   stack  the user journey: `trtflow up` with a real GPU worker, drop a model, wait for published
#   zoo    bench/zoo/gpu.sh all: every model's FP16, then the INT8 pass, 3 jobs sharing the GPU lock
set -uo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1
export TRT_PYTHON=${TRT_PYTHON:-/opt/trt/bin/trt-python} PYTHONPATH=/opt/py312:$PWD
RES=/tmp/res; mkdir -p "$RES"/zoo "$RES"/bench
ROUND_S=${ROUND_S:-1500}; STEPS=${STEPS:-tests bench fp16 stack zoo}; ZOO_JOBS=${ZOO_JOBS:-3}
ZOO_ORDER=${ZOO_ORDER:-shared_dim_param,ir9_opset17,ir10_opset17,opset18,opset19,opset20,fp16_graph,dynamic_axes_slice,resnet50,yolo_style,lstm_tagger,crnn_text,ssdlite320,efficientnet_b0,mobilenet_v3_large,convnext_tiny,deeplabv3_mobilenet_v3_large,vit_b_16,swin_t,bert_base,gpt2_small,wide_mlp_2gb}
start=$(date +%s)
say() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$RES/summary.txt"; }
left() { echo $(( ROUND_S - ($(date +%s) - start) )); }
cap() { local want=$1 l; l=$(left); echo $(( want < l ? want : l )); }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$RES/gpu.txt"
say "round starts on $(cat "$RES/gpu.txt"); nproc $(nproc); steps: $STEPS; $ROUND_S s"
# the detector (bench and fp16 need it) is CPU work, exported now beside the GPU steps; the zoo step
# exports the rest, whose classifiers train on the GPU (train_on_photos) and so wait for their step
setsid bash -c "OUT=$RES/zoo timeout 300 python3 bench/zoo/export_zoo.py --bucket .zoo --only yolo_style \
  > $RES/zoo/export.log 2>&1" < /dev/null &

detector_exported() { for _ in $(seq 1 40); do [ -f .zoo/models/yolo_style/trtflow.yaml ] && return; sleep 3; done; }
step_tests() {
  TRT_EXTRA_PYTHONPATH=/opt/py39x timeout -s INT "$(cap 540)" $TRT_PYTHON -m pytest tests/gpu -q -p no:cacheprovider \
    -n 3 -rA --tb=short --durations=10 > "$RES/tests-gpu.txt" 2>&1
  say "tests/gpu rc $?: $(grep -E '[0-9]+ (passed|failed)' "$RES/tests-gpu.txt" | tail -1)"
  grep -E "^(FAILED|ERROR)" "$RES/tests-gpu.txt" | cut -c1-300 | tee -a "$RES/summary.txt"
}
step_bench() {
  mkdir -p /tmp/gpu-bench/zoo/models
  detector_exported
  ln -sfn "$PWD/.zoo/models/yolo_style" /tmp/gpu-bench/zoo/models/yolo_style
  OUT=$RES/bench BUDGET_S=$(cap 600) bash bench/gpu_bench.sh > "$RES/bench/run.log" 2>&1
  say "bench: $(grep -E '^\{"(measure|step)' "$RES/bench/run.log" | cut -c1-260 | tr '\n' ' ')"
}
step_fp16() {
  detector_exported
  TRTFLOW_FP16_COMPARE=$PWD/.zoo/models/yolo_style/model.onnx timeout -s INT "$(cap 300)" $TRT_PYTHON -m pytest \
    tests/gpu/test_fp16_graph.py -q -s -p no:cacheprovider -rA --tb=short -k "model and pycuda" > "$RES/fp16-graph.txt" 2>&1
  say "fp16 graph rc $?: $(grep -E 'graph/flag|passed|failed' "$RES/fp16-graph.txt" | tr '\n' ' ' | cut -c1-400)"
}
step_stack() {
  LIMIT=$(( $(cap 330) - 60 )) timeout "$(cap 330)" bash bench/gpu_stack.sh > "$RES/stack.txt" 2>&1
  say "stack rc $?: $(grep -E '^\{|up took' "$RES/stack.txt" | tr '\n' ' ' | cut -c1-600)"
}
step_zoo() {
  ZOO_BIG=1 OUT=$RES/zoo bash bench/zoo/gpu.sh all --jobs "$ZOO_JOBS" --budget "$(left)" --per-model 420 \
    --only "$ZOO_ORDER" > "$RES/zoo/zoo-run.log" 2>&1
  say "zoo: $(tail -2 "$RES/zoo/zoo-run.log" | tr '\n' ' ' | cut -c1-300)"
}
for s in $STEPS; do
  if [ "$(left)" -lt 60 ]; then say "no time left for $s"; continue; fi
  say "step $s ($(left) s left)"
  "step_$s"
done
python3 bench/zoo/run_zoo.py table --bucket .zoo --out "$RES/zoo/zoo-table.md" > /dev/null 2>&1
say "round done"
touch "$RES/DONE"
