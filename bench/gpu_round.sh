#!/usr/bin/env bash
# A whole GPU round on the lent machine, started once in the background (setsid) right after
# ../shared/gpu/install.sh --finish, so that the work does not stop at the 10-minute call boundary:
# each later device call only runs `bash bench/gpu_wait.sh <seconds>`, which prints what finished
# and brings /tmp/res back as $OUT/res.tgz. Start it from a copy of the tree, so that a later call
# may carry fixed code for a re-run without changing what the round runs:
#   tar --exclude=./.gpu -cf - . | tar -C /tmp/round -xf - && cd /tmp/round && \
#     (ROUND_S=1500 STEPS="tests fp16 stack bench" setsid bash bench/gpu_round.sh > /tmp/round.log 2>&1 < /dev/null &)
#
# ONE GPU JOB AT A TIME. The steps run one after another, in the order given, each within its cap
# and the round's deadline; nothing else builds beside them. TensorRT builds side by side on one GPU
# are each many times slower (their tactic timings share the GPU by time slices): on 2026-12-02 a small
# CNN's build in tests/gpu took 80-99 s with 4 xdist workers and one zoo build beside it, against
# 6.7 s alone on the H100, while the CPUs stayed idle (load 3.8 of 16).
#   tests  tests/gpu on both CUDA backends (the FP16 comparison aside), serially, every outcome listed (-rA)
#   fp16   issue 14: FP16 from the graph against the FP16 flag, ResNet-50 and the zoo's detector
#   stack  issue 13 measure 5 and issue 9's journey: bench/pipeline_overhead.py --real (`trtflow up` with a
#          real GPU worker on a local folder and on moto S3, drop, published; `trtflow convert` cold and
#          against the stack)
#   bench  issue 13's measures 1-4 (bench/gpu_bench.sh), one model per process
#   zoo    issue 10: bench/zoo/gpu.sh all (export, then the passes of $ZOO_PASSES), 2 conversions at
#          once whose CPU stages overlap and whose builds queue on the host's GPU lock
# Only the detector's export (CPU, torch) runs beside the steps, from the start.
set -uo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1
export TRT_PYTHON=${TRT_PYTHON:-/opt/trt/bin/trt-python} PYTHONPATH=/opt/py312:$PWD
RES=/tmp/res; mkdir -p "$RES"/zoo "$RES"/bench
ROUND_S=${ROUND_S:-1500}; STEPS=${STEPS:-tests fp16 stack bench}; ZOO_JOBS=${ZOO_JOBS:-2}
# the zoo's passes (bench/zoo/gpu.sh): the CNNs' FP16 and INT8 first (INT8 is what the zoo has never
# shown), the quick quirks, then the long FP16 builds (transformers, text, sequence, the 2.4 GB model)
QUIRKS=shared_dim_param,ir9_opset17,ir10_opset17,opset18,opset19,opset20,fp16_graph,dynamic_axes_slice
CNNS=resnet50,efficientnet_b0,mobilenet_v3_large,convnext_tiny,ssdlite320,deeplabv3_mobilenet_v3_large,yolo_style
LONG=vit_b_16,swin_t,lstm_tagger,crnn_text,bert_base,gpt2_small,wide_mlp_2gb
export ZOO_PASSES=${ZOO_PASSES:-fp16:$CNNS int8:$CNNS fp16:$QUIRKS fp16:$LONG}
start=$(date +%s)
say() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$RES/summary.txt"; }
left() { echo $(( ROUND_S - ($(date +%s) - start) )); }
cap() { local want=$1 l; l=$(left); echo $(( want < l ? want : l )); }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$RES/gpu.txt"
say "round starts on $(cat "$RES/gpu.txt"); nproc $(nproc); steps: $STEPS; $ROUND_S s"
# the detector (fp16 and bench need it): CPU work, untrained, exported beside the first step
setsid bash -c "OUT=$RES/zoo timeout 300 python3 bench/zoo/export_zoo.py --bucket .zoo --only yolo_style --threads 4 \
  > $RES/zoo/export-detector.log 2>&1" < /dev/null &

detector_exported() { for _ in $(seq 1 60); do [ -f .zoo/models/yolo_style/trtflow.yaml ] && return; sleep 3; done; }
step_tests() {
  # the INT8 tests first: the third round's cap cut exactly those (they ran last, beside the zoo)
  TRT_EXTRA_PYTHONPATH=/opt/py39x timeout -s INT "$(cap 660)" $TRT_PYTHON -m pytest tests/gpu/test_int8_trained.py \
    tests/gpu/test_engines.py tests/gpu/test_cuda_backends.py -q -p no:cacheprovider -rA --tb=short --durations=15 \
    > "$RES/tests-gpu.txt" 2>&1
  say "tests/gpu rc $?: $(grep -E '[0-9]+ (passed|failed)' "$RES/tests-gpu.txt" | tail -1)"
  grep -E "^(FAILED|ERROR)" "$RES/tests-gpu.txt" | cut -c1-300 | tee -a "$RES/summary.txt"
}
step_fp16() {
  detector_exported
  TRTFLOW_FP16_COMPARE=$PWD/.zoo/models/yolo_style/model.onnx timeout -s INT "$(cap 360)" $TRT_PYTHON -m pytest \
    tests/gpu/test_fp16_graph.py -q -s -p no:cacheprovider -rA --tb=short -k pycuda > "$RES/fp16-graph.txt" 2>&1
  say "fp16 graph rc $?: $(grep -E 'graph/flag|passed|failed' "$RES/fp16-graph.txt" | tr '\n' ' ' | cut -c1-400)"
}
step_stack() {
  timeout "$(cap 420)" python3 bench/pipeline_overhead.py --real --limit 200 > "$RES/stack.txt" 2> "$RES/stack.err"
  say "stack rc $?: $(cut -c1-700 "$RES/stack.txt" | tr '\n' ' ')"
}
step_bench() {
  mkdir -p /tmp/gpu-bench/zoo/models
  detector_exported
  ln -sfn "$PWD/.zoo/models/yolo_style" /tmp/gpu-bench/zoo/models/yolo_style
  OUT=$RES/bench BUDGET_S=$(cap 560) bash bench/gpu_bench.sh > "$RES/bench/run.log" 2>&1
  say "bench: $(grep -E '^\{"(measure|step)' "$RES/bench/run.log" | cut -c1-260 | tr '\n' ' ')"
}
step_zoo() {
  OMP_NUM_THREADS=4 ZOO_BIG=1 OUT=$RES/zoo bash bench/zoo/gpu.sh all --jobs "$ZOO_JOBS" --budget "$(( $(left) - 20 ))" \
    --per-model 900 > "$RES/zoo/zoo-run.log" 2>&1
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
