#!/usr/bin/env bash
# One device call while bench/gpu_round.sh works in the background: wait up to $1 seconds (or until
# the round is done), print the round's summary, and bring /tmp/res back as $OUT/res.tgz (the device
# returns at most 8 files; a machine taken away later loses nothing this call packed).
#   bash bench/gpu_wait.sh 580
set -uo pipefail
OUT=${OUT:-/tmp/out}
cd /tmp/round 2>/dev/null || cd "$(dirname "$0")/.."  # the round runs from its copy (bench/gpu_round.sh)
export PYTHONPATH=/opt/py312:$PWD; RES=/tmp/res; mkdir -p "$OUT"
end=$(( $(date +%s) + ${1:-580} ))
while [ ! -f "$RES/DONE" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
cat "$RES/summary.txt" 2>/dev/null
echo "-- zoo so far:"; grep -cE '"model"' "$RES/zoo/zoo-results.jsonl" 2>/dev/null
python3 bench/zoo/run_zoo.py table --bucket .zoo --out "$RES/zoo/zoo-table.md" 2>/dev/null | tail -3
cp .zoo/_zoo/results.jsonl "$RES/zoo/zoo-results-all.jsonl" 2>/dev/null
tar -C "$RES" -czf "$OUT/res.tgz" . 2>/dev/null
cp "$RES/summary.txt" "$OUT/" 2>/dev/null
ps -eo pid,etimes,pcpu,args --sort=-pcpu | grep -E "tasks.gpu|pytest|run_zoo|export_zoo|gpu_bench|pipeline_overhead" \
  | grep -v grep | cut -c1-160 | head -8
uptime; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
