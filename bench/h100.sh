#!/usr/bin/env bash
# Steps run on the lent H100 after ../shared/gpu/install.sh has unpacked TensorRT 8.6 (/opt/trt) and
# the Prefect wheels (/opt/py312). One step per device call; logs go to $OUT.
#   bash bench/h100.sh tests | flow | int8 | resnet-prep | resnet VARIANT | stack
set -uo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME=/tmp/prefect-home PYTHONUNBUFFERED=1
export TRT_PYTHON=${TRT_PYTHON:-/opt/trt/bin/trt-python}
export PYTHONPATH=/opt/py312:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
step=${1:?step}; shift
case "$step" in
  tests)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    $TRT_PYTHON -m pytest tests/tasks/gpu tests/gpu -q -s -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.txt" | grep -vE "^\s*$" | tail -60
    ;;
  flow)
    rm -rf /tmp/bucket && python3 - <<'PY'
from tests import models
models.save(models.small_cnn(), "/tmp/bucket/models/cnn.onnx")
models.save(models.two_input_model(), "/tmp/bucket/models/two/model.onnx")
PY
    python3 -m flows.cli convert /tmp/bucket/models/cnn.onnx -p fp16 -p fp32 --strategy all 2>&1 | tee "$OUT/flow-cnn.txt" | grep -vE "INFO|^\s*$" | tail -15
    if [ "${1:-}" != "--quick" ]; then
      python3 -m flows.cli convert /tmp/bucket/models/two/ -p fp32 2>&1 | tee "$OUT/flow-two.txt" | grep -vE "INFO|^\s*$" | tail -8
      python3 -m flows.cli convert /tmp/bucket/models/cnn.onnx -p fp16 -p fp32 --strategy all 2>&1 | grep -E "cached|published" | tail -2
    fi
    python3 -m flows.cli status /tmp/bucket
    python3 - <<'PY' | tee "$OUT/manifest-summary.txt"
import json
latest = json.load(open("/tmp/bucket/engines/cnn/latest.json"))
m = json.load(open("/tmp/bucket/" + latest["manifest"]))
print("latest:", latest["engine"])
print("target:", json.dumps(m["target"]))
print("engine:", m["engine"]["bytes"], "bytes", m["engine"]["builder_flags"], m["engine"]["layer_precisions"])
print("accuracy:", json.dumps(m["accuracy"]["metrics"]))
b = m["benchmark"]; print("bench p50 ms:", b["tensorrt"]["latency_ms"]["p50"], "throughput/s:", b["tensorrt"]["throughput_per_s"],
      "ORT CPU throughput/s:", b["onnxruntime_cpu"]["throughput"], "speedup:", b["speedup_vs_ort_cpu"])
print("build s:", m["build"]["seconds"], "timing cache:", m["build"]["timing_cache"])
PY
    find /tmp/bucket/engines/cnn -name layers.json | head -1 | xargs -I{} cp {} "$OUT/layers-cnn.json"
    cp /tmp/bucket/engines/cnn/latest.json "$OUT/latest.json"; cp "/tmp/bucket/$(python3 -c "import json;print(json.load(open('/tmp/bucket/engines/cnn/latest.json'))['manifest'])")" "$OUT/manifest.json"
    ;;
  int8)
    python3 bench/int8_trained.py --bucket /tmp/int8 --out "$OUT/int8-trained.json" 2>&1 | tee "$OUT/int8-trained.txt" | grep -vE "INFO|^\s*$" | tail -25
    ;;
  resnet-prep)
    python3 bench/export_resnet.py --out /tmp/bench/resnet50.onnx 2>&1 | tail -3
    python3 bench/qdq_resnet.py --onnx /tmp/bench/resnet50.onnx --out /tmp/bench "$@" 2>&1 | tail -8
    ;;
  resnet)
    variant=${1:?variant}; shift
    $TRT_PYTHON bench/int8_resnet.py --onnx /tmp/bench/resnet50.onnx --qdq /tmp/bench/resnet50.qdq.onnx --qdq-ort /tmp/bench/resnet50.qdq-ort.onnx --only "$variant" "$@" 2>&1 | tee -a "$OUT/resnet-$variant.txt" | tail -20
    cp /tmp/bench/work/results.json "$OUT/resnet-results.json" 2>/dev/null
    ;;
  stack)
    # issue 5: `trtflow up` with the real GPU worker; a model copied into the local bucket is converted
    # with no other command. Prints drop -> published and the GPU time inside it.
    export TRTFLOW_HOME=/tmp/tfstack; rm -rf "$TRTFLOW_HOME"
    python3 -m flows.cli up --watch-interval 5 --settle-seconds 5 2>&1 | tee "$OUT/stack-up.txt" | tail -8
    python3 - "$TRTFLOW_HOME/bucket" <<'PY' 2>&1 | tee "$OUT/stack-drop.txt"
import json, shutil, sys, time
from pathlib import Path
from tests import models
bucket = Path(sys.argv[1]); tmp = Path("/tmp/drop.onnx"); models.save(models.small_cnn(), tmp)
(bucket / "models").mkdir(parents=True, exist_ok=True)
t0 = time.time(); shutil.copy(tmp, bucket / "models" / "dropped.onnx")
latest = bucket / "engines" / "dropped" / "latest.json"
while not latest.exists() and time.time() - t0 < 400:
    time.sleep(1)  # waiting for an outcome, not timing anything with it
if not latest.exists():
    print("no engine after 400 s; status:", list((bucket / "_trtflow" / "status").rglob("*.json")))
    sys.exit(1)
dt = time.time() - t0
l = json.loads(latest.read_text()); conv = json.loads((bucket / l["conversion"]).read_text())
gpu = sum(r.get("gpu_seconds") or 0 for r in conv["precisions"].values())
print(f"drop -> published: {dt:.1f} s; GPU subprocess time inside: {gpu:.1f} s; engine {l['engine']} ({l['precision']})")
print("results:", {p: r["result"] for p, r in conv["precisions"].items()}, "target:", conv["target"])
PY
    PREFECT_API_URL=http://127.0.0.1:4200/api python3 -m prefect flow-run ls --limit 10 2>/dev/null | tail -14
    python3 -m flows.cli down 2>&1 | tail -3
    ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
