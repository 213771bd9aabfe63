#!/usr/bin/env bash
# One device call on the lent GPU machine, after ../shared/gpu/install.sh: the zoo in the background
# (bench/zoo/gpu.sh all) while the foreground runs the kill/cancel checks (bench/kill_gpu.sh), the user
# journey on the local stack (bench/gpu_stack.sh) and the GPU tests the last changes touched, on both
# CUDA backends. Everything lands in /tmp/res and comes back as $OUT/res.tgz (the device returns at most
# 8 files) plus the summary lines on stdout.
#   bash bench/gpu_session.sh [seconds, default 570]
set -uo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1
export TRT_PYTHON=${TRT_PYTHON:-/opt/trt/bin/trt-python} PYTHONPATH=/opt/py312:$PWD
TOTAL=${1:-570}; start=$SECONDS
OUT=${OUT:-/tmp/out}; RES=/tmp/res; mkdir -p "$OUT" "$RES"/zoo "$RES"/kill
left() { echo $((TOTAL - (SECONDS - start))); }
finish() {
  tar -C "$RES" -czf "$OUT/res.tgz" . 2>/dev/null
  cp "$RES"/zoo/zoo-table.md "$OUT/" 2>/dev/null; cp "$RES"/summary.txt "$OUT/" 2>/dev/null; true
}
trap finish EXIT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$RES/gpu.txt"
setsid bash -c "OUT=$RES/zoo bash bench/zoo/gpu.sh all --jobs ${ZOO_JOBS:-6} --budget $((TOTAL - 30)) > $RES/zoo/zoo-run.log 2>&1" &
{
  echo "== kill_gpu.sh"; OUT=$RES/kill timeout 260 bash bench/kill_gpu.sh 2>&1 | tail -20
  echo "== gpu_stack.sh"; LIMIT=120 timeout 170 bash bench/gpu_stack.sh 2>&1 | grep -E '^\{|up took|GPU workers|Stopped' 
  echo "== GPU tests (both CUDA backends)"
  timeout -s INT $(( $(left) > 130 ? 120 : 30 )) $TRT_PYTHON -m pytest -q -p no:cacheprovider -rfE --tb=line \
    tests/gpu/test_engines.py tests/gpu/test_cuda_backends.py \
    -k "instance_norm or phase_lines or parser_error_names or probe or dynamic_batch or backend or two_inputs" 2>&1 | tail -12
} 2>&1 | tee "$RES/summary.txt"
# The zoo's own budget ends it; wait for its table, within this call's time.
while pgrep -f "bench/zoo/gpu.sh" >/dev/null && [ "$(left)" -gt 8 ]; do sleep 2; done
echo "== zoo"; tail -4 "$RES/zoo/zoo-run.log"; grep -E "published and passing" "$RES/zoo/zoo-run.log" | tail -2
