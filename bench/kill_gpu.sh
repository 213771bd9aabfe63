#!/usr/bin/env bash
# Kill and cancel a conversion mid-build on a real GPU (issue 11 item 4), on the lent GPU machine after
# ../shared/gpu/install.sh (TensorRT 8.6 in /opt/trt, Prefect wheels in /opt/py312):
#   bash bench/kill_gpu.sh
# A ResNet-50 FP16 build takes 80+ s there, so every kill lands mid-build. Prints one line per check:
#   1. kill -9 of conversion A mid-build -> tasks.gpu processes left after 5 s (want 0), GPU memory held
#   2. conversion B starts -> seconds from its launch to its build starting, and its GPU-slot wait
#   3. SIGTERM (what a worker's cancellation sends) of B mid-build -> tasks.gpu left after 5 s (want 0),
#      B's status record (want cancelled)
#   4. conversion C starts -> seconds to its build starting; then C is stopped too (clean-up)
# Exits within ~4 minutes (every wait has a deadline) and ends every process it started, by pid.
set -uo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1 DO_NOT_TRACK=1
export PREFECT_HOME=$(mktemp -d /tmp/kill-gpu-prefect.XXXX)
export TRT_PYTHON=${TRT_PYTHON:-/opt/trt/bin/trt-python}
export PYTHONPATH=/opt/py312:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/kill-gpu.XXXX)
BUCKET=$WORK/bucket
export TRTFLOW_WORKDIR=$WORK/work  # build folders, so our GPU children can be told from anyone else's
PORT=${PORT:-4297}
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
STARTED=()   # pids of everything this script started (each the leader of its own session)
GPU_PIDS=()  # tasks.gpu engine pids seen (they run in their own session)

cleanup() {
  for pid in "${STARTED[@]}" "${GPU_PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null && kill -TERM -- "-$pid" 2>/dev/null; kill -TERM "$pid" 2>/dev/null
  done
  sleep 2
  for pid in "${STARTED[@]}" "${GPU_PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null && { kill -KILL -- "-$pid" 2>/dev/null; kill -KILL "$pid" 2>/dev/null; }
  done
  return 0
}
trap cleanup EXIT

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.1f}')"; }
# What a GPU child's command line holds (a dry run with the test double: GPU_PATTERN=tests.doubles.gpu_double).
GPU_PATTERN=${GPU_PATTERN:-tasks.gpu}
# Ours: their request files lie under $WORK (TRTFLOW_WORKDIR), whoever else uses the machine.
gpu_count() { echo "$(pgrep -fc "$GPU_PATTERN .*$WORK" || true) (any: $(pgrep -fc "$GPU_PATTERN" || true))"; }  # finds, never kills by name

# wait_build DEADLINE_S: echo the pid of the `tasks.gpu engine` child of $CONVERT_PID (its build), or
# nothing at the deadline
wait_build() {
  local end=$(( $(date +%s) + $1 ))
  while [ "$(date +%s)" -lt "$end" ]; do
    local p; p=$(pgrep -P "$CONVERT_PID" -f "$GPU_PATTERN engine" | head -1)
    if [ -n "$p" ]; then echo "$p"; ps -o pid,ppid,etimes,args -p "$p" >&2; return 0; fi
    sleep 0.2
  done
}

convert() {  # convert NAME: start a conversion in its own session; sets CONVERT_PID
  setsid python3 -m flows.cli convert "$BUCKET/models/resnet50-$1/" --force -v >"$OUT/kill-$1.log" 2>&1 &
  CONVERT_PID=$!
  STARTED+=("$CONVERT_PID")
}

status_of() {  # status_of NAME
  python3 - "$BUCKET" "resnet50-$1" <<'PY'
import json, pathlib, sys
recs = [json.loads(p.read_text()) for p in pathlib.Path(sys.argv[1], "_trtflow/status", sys.argv[2]).glob("*.json")]
print(" ".join(f"{r['status']}({(r.get('message') or '')[:60]})" for r in recs) or "none")
PY
}

slot_wait() {  # seconds between "Waiting for GPU slot" and "Holding GPU slot" in a conversion's log
  python3 - "$1" <<'PY'
import re, sys
from datetime import datetime
text = open(sys.argv[1], errors="replace").read()
def at(word):
    m = re.search(r"(\d\d:\d\d:\d\d\.\d+).{0,80}" + word + " GPU slot", text)
    return datetime.strptime(m.group(1), "%H:%M:%S.%f") if m else None
w, h = at("Waiting for"), at("Holding")
print(f"{(h - w).total_seconds():.1f}" if w and h else "n/a")
PY
}

gpu_mem() { nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null | tr '\n' ';'; }

# ---- set-up: ResNet-50 packages a, b, c (FP16 only, no benchmark: the build is what gets killed) and a server.
# Three packages, not one: convert-model's per-version lock (a Prefect lease) of a SIGKILLed run holds
# that version for its lease; this script measures the GPU slot, which is shared by every package.
# EXPORT_CMD: a dry run without torch writes a small model instead (the test double then blocks mid-"build").
EXPORT_CMD=${EXPORT_CMD:-python3 bench/export_resnet.py --out}
timeout 120 $EXPORT_CMD "$BUCKET/models/resnet50-a/model.onnx" >/dev/null || { echo "export failed"; exit 1; }
printf 'precisions: [fp16]\nbench: {enabled: false}\neval: {synthetic_samples: 1}\n' > "$BUCKET/models/resnet50-a/trtflow.yaml"
cp -r "$BUCKET/models/resnet50-a" "$BUCKET/models/resnet50-b"; cp -r "$BUCKET/models/resnet50-a" "$BUCKET/models/resnet50-c"
setsid python3 -m prefect server start --host 127.0.0.1 --port "$PORT" >"$OUT/kill-server.log" 2>&1 &
STARTED+=("$!")
for _ in $(seq 1 120); do curl -sf "$PREFECT_API_URL/health" >/dev/null && break; sleep 0.5; done
curl -sf "$PREFECT_API_URL/health" >/dev/null || { echo "server did not start"; exit 1; }
echo "setup: leftover tasks.gpu before the first run: $(gpu_count)"

# ---- 1. kill -9 mid-build
convert a; t0=$(now)
g=$(wait_build 90); [ -n "$g" ] || { echo "kill9: build of A never started"; tail -20 "$OUT/kill-a.log"; exit 1; }
GPU_PIDS+=("$g"); tb=$(now)
sleep 10  # into the build (80+ s): the kill lands mid-build
kill -KILL "$CONVERT_PID"; tk=$(now)
sleep 5
echo "kill9: A's build started $(secs "$t0" "$tb") s after launch; killed $(secs "$tb" "$tk") s into it; tasks.gpu processes 5 s later: $(gpu_count) (want 0); GPU apps: $(gpu_mem)"
echo "kill9: A's status record: $(status_of a) (nothing runs after SIGKILL of a direct run to rewrite it); trtflow status says: $(python3 -m flows.cli status "$BUCKET" --json 2>/dev/null | python3 -c 'import json,sys; r=[m for m in json.load(sys.stdin)["models"] if m["model"] == "resnet50-a"][0]; print(r["status"], "-", r["reason"])') (want crashed)"

# ---- 2. the next conversion gets the GPU at once
convert b; t0=$(now)
g=$(wait_build 90); [ -n "$g" ] || { echo "next-after-kill9: build of B never started"; tail -20 "$OUT/kill-b.log"; exit 1; }
GPU_PIDS+=("$g"); tb=$(now)
echo "next-after-kill9: B's build started $(secs "$t0" "$tb") s after launch; its GPU-slot wait $(slot_wait "$OUT/kill-b.log") s (want < 10)"

# ---- 3. SIGTERM (cancel) mid-build
sleep 10
kill -TERM "$CONVERT_PID"; tk=$(now)
sleep 5
echo "sigterm: B terminated $(secs "$tb" "$tk") s into its build; tasks.gpu processes 5 s later: $(gpu_count) (want 0); B still running: $(kill -0 "$CONVERT_PID" 2>/dev/null && echo yes || echo no); GPU apps: $(gpu_mem)"
for _ in $(seq 1 20); do kill -0 "$CONVERT_PID" 2>/dev/null || break; sleep 0.5; done
echo "sigterm: B's status record: $(status_of b) (want cancelled)"

# ---- 4. and again the next conversion gets the GPU at once
convert c; t0=$(now)
g=$(wait_build 90); [ -n "$g" ] || { echo "next-after-sigterm: build of C never started"; tail -20 "$OUT/kill-c.log"; exit 1; }
GPU_PIDS+=("$g"); tb=$(now)
echo "next-after-sigterm: C's build started $(secs "$t0" "$tb") s after launch; its GPU-slot wait $(slot_wait "$OUT/kill-c.log") s (want < 10)"
kill -TERM "$CONVERT_PID"
for _ in $(seq 1 20); do kill -0 "$CONVERT_PID" 2>/dev/null || break; sleep 0.5; done
sleep 1
echo "done: tasks.gpu processes left: $(gpu_count) (want 0)"
