#!/usr/bin/env bash
# A whole GPU round on the lent machine, started once in the background (setsid) right after
# ../shared/gpu/install.sh --finish, so that the work does not stop at the 10-minute call boundary:
# each later device call only runs `bash bench/gpu_wait.sh <seconds>`, which prints what finished
# and brings /tmp/res back as $OUT/res.tgz. Start it from a copy of the tree, so that a later call
# may carry fixed code for a re-run without changing what the round runs:
#   cp -a . /tmp/round && cd /tmp/round && (ROUND_S=1500 setsid bash bench/gpu_round.sh > /tmp/round.log 2>&1 < /dev/null &)
#
# The zoo (issue 10; bench/zoo/gpu.sh all: export, every model's FP16, then the INT8 pass, 3 jobs)
# runs in the background for the whole round: it is the longest part and needs only correct builds.
# Its conversions build under one host GPU lock of their own (TRTFLOW_GPU_LOCK_DIR=$ZOO_LOCKS), one
# build at a time. The steps run one after another beside it:
#   tests  tests/gpu on both CUDA backends, 4 xdist workers, every outcome listed (-rA); beside the
#          zoo's builds (correctness only)
#   fp16   issue 14: FP16 from the graph against the FP16 flag on the zoo's detector  } quiet: they hold the
#   bench  issue 13's measures 1-4 (bench/gpu_bench.sh), one model per process        } zoo's lock, so no zoo
#                                                                                      } build shares the GPU
#   stack  issue 13 measure 5 and issue 9's journey: bench/pipeline_overhead.py --real (`trtflow up` with a
#          real GPU worker on a local folder and on moto S3, drop, published; `trtflow convert` cold and
#          against the stack); its builds take a lock of their own, so they do not queue behind the zoo's
# On 2026-12-02 everything at once without limits (GPU tests, 4 zoo jobs with a lock each, the stack)
# made every build ~10x slower and nothing finished: CPU threads are now shared out (TRTFLOW_CPU_THREADS,
# torch threads) and at most one zoo build runs beside the steps.
set -uo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1
export TRT_PYTHON=${TRT_PYTHON:-/opt/trt/bin/trt-python} PYTHONPATH=/opt/py312:$PWD
RES=/tmp/res; mkdir -p "$RES"/zoo "$RES"/bench
ROUND_S=${ROUND_S:-1500}; STEPS=${STEPS:-tests fp16 bench stack}; ZOO_JOBS=${ZOO_JOBS:-3}
ZOO_LOCKS=/tmp/zoo-gpu-locks; mkdir -p "$ZOO_LOCKS"
# the zoo's passes (bench/zoo/gpu.sh): the quick quirks' and the CNNs' FP16, the CNNs' INT8, then the
# long FP16 builds (transformers, text, sequence, the 2.4 GB model)
QUIRKS=shared_dim_param,ir9_opset17,ir10_opset17,opset18,opset19,opset20,fp16_graph,dynamic_axes_slice
CNNS=resnet50,yolo_style,efficientnet_b0,mobilenet_v3_large,convnext_tiny,ssdlite320,deeplabv3_mobilenet_v3_large
LONG=vit_b_16,swin_t,lstm_tagger,crnn_text,bert_base,gpt2_small,wide_mlp_2gb
export ZOO_PASSES=${ZOO_PASSES:-fp16:$QUIRKS,$CNNS int8:$CNNS fp16:$LONG}
start=$(date +%s)
say() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$RES/summary.txt"; }
left() { echo $(( ROUND_S - ($(date +%s) - start) )); }
cap() { local want=$1 l; l=$(left); echo $(( want < l ? want : l )); }
nvidia-smi --query-gpu=name,driver_version,memory.total,uuid --format=csv,noheader > "$RES/gpu.txt"
say "round starts on $(cut -d, -f1-3 "$RES/gpu.txt"); nproc $(nproc); steps: $STEPS; $ROUND_S s"

# the zoo's lock file, named as flows/gpu_slot.py names it for this GPU (its UUID, as the probe reads it)
uuid=$(cut -d, -f4 "$RES/gpu.txt" | head -1 | tr -d ' ')
TRTFLOW_GPU_LOCK_DIR=$ZOO_LOCKS python3 -c "import sys; from flows.gpu_slot import gpu_lock_path; gpu_lock_path(sys.argv[1]).touch()" \
  "$uuid" 2>> "$RES/summary.txt"
quiet() {  # run "$@" holding every zoo build lock: the zoo's CPU stages go on, its builds wait
  local cmd=("$@") f
  for f in "$ZOO_LOCKS"/*.lock; do [ -e "$f" ] && cmd=(flock "$f" "${cmd[@]}"); done
  "${cmd[@]}"
}

# the zoo, in the background: the detector first (fp16 and bench need it), then everything else
( OMP_NUM_THREADS=4 OUT=$RES/zoo timeout 300 python3 bench/zoo/export_zoo.py --bucket .zoo --only yolo_style --threads 4 \
    > "$RES/zoo/export-detector.log" 2>&1
  TRTFLOW_GPU_LOCK_DIR=$ZOO_LOCKS OMP_NUM_THREADS=4 ZOO_BIG=1 OUT=$RES/zoo bash bench/zoo/gpu.sh all --jobs "$ZOO_JOBS" \
    --budget "$(( ROUND_S - 40 - ($(date +%s) - start) ))" --per-model 1200 > "$RES/zoo/zoo-run.log" 2>&1
  say "zoo: $(tail -2 "$RES/zoo/zoo-run.log" | tr '\n' ' ' | cut -c1-300)" ) < /dev/null &
zoo_pid=$!

detector_exported() { for _ in $(seq 1 60); do [ -f .zoo/models/yolo_style/trtflow.yaml ] && return; sleep 3; done; }
step_tests() {
  TRT_EXTRA_PYTHONPATH=/opt/py39x timeout -s INT "$(cap 480)" $TRT_PYTHON -m pytest tests/gpu -q -p no:cacheprovider \
    -n 4 -rA --tb=short --durations=12 -k "not test_fp16_graph" > "$RES/tests-gpu.txt" 2>&1
  say "tests/gpu rc $?: $(grep -E '[0-9]+ (passed|failed)' "$RES/tests-gpu.txt" | tail -1)"
  grep -E "^(FAILED|ERROR)" "$RES/tests-gpu.txt" | cut -c1-300 | tee -a "$RES/summary.txt"
}
step_fp16() {
  detector_exported
  TRTFLOW_FP16_COMPARE=$PWD/.zoo/models/yolo_style/model.onnx quiet timeout -s INT "$(cap 300)" $TRT_PYTHON -m pytest \
    tests/gpu/test_fp16_graph.py -q -s -p no:cacheprovider -rA --tb=short -k "model and pycuda" > "$RES/fp16-graph.txt" 2>&1
  say "fp16 graph rc $?: $(grep -E 'graph/flag|passed|failed' "$RES/fp16-graph.txt" | tr '\n' ' ' | cut -c1-400)"
}
step_bench() {
  mkdir -p /tmp/gpu-bench/zoo/models
  detector_exported
  ln -sfn "$PWD/.zoo/models/yolo_style" /tmp/gpu-bench/zoo/models/yolo_style
  OUT=$RES/bench BUDGET_S=$(cap 540) quiet bash bench/gpu_bench.sh > "$RES/bench/run.log" 2>&1
  say "bench: $(grep -E '^\{"(measure|step)' "$RES/bench/run.log" | cut -c1-260 | tr '\n' ' ')"
}
step_stack() {
  TRTFLOW_GPU_LOCK_DIR=/tmp/stack-gpu-locks timeout "$(cap 420)" python3 bench/pipeline_overhead.py --real --limit 240 \
    > "$RES/stack.txt" 2> "$RES/stack.err"
  say "stack rc $?: $(cut -c1-700 "$RES/stack.txt" | tr '\n' ' ')"
}
for s in $STEPS; do
  if [ "$(left)" -lt 60 ]; then say "no time left for $s"; continue; fi
  say "step $s ($(left) s left)"
  "step_$s"
done
say "steps done; the zoo goes on until its budget ($(left) s left)"
wait "$zoo_pid"
python3 bench/zoo/run_zoo.py table --bucket .zoo --out "$RES/zoo/zoo-table.md" > /dev/null 2>&1
say "round done"
touch "$RES/DONE"
