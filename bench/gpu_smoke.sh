#!/usr/bin/env bash
# A short check of the GPU side on the lent machine after install (../shared/gpu/README.md): the zoo's
# export in the background (to find export problems early), the engine / CUDA-backend / INT8 GPU tests
# on pycuda, the backend tests on cuda-python, and whole in-process conversions. ~5 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME=/tmp/prefect-home PYTHONUNBUFFERED=1
export TRT_PYTHON=${TRT_PYTHON:-/opt/trt/bin/trt-python} PYTHONPATH=/opt/py312:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/zres
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
setsid bash -c "OUT=/tmp/zres timeout 280 bash bench/zoo/gpu.sh export > /tmp/zres/export.log 2>&1" &
timeout 200 $TRT_PYTHON -m pytest tests/gpu/test_engines.py tests/gpu/test_cuda_backends.py tests/gpu/test_int8_trained.py \
  -q -p no:cacheprovider -rfE -x 2>&1 | tee "$OUT/gpu-tests.txt" | grep -vE "^\s*$" | tail -30
TRTFLOW_CUDA=cuda-python timeout 60 $TRT_PYTHON -m pytest -q -p no:cacheprovider -rfE tests/gpu/test_cuda_backends.py \
  tests/gpu/test_engines.py -k "cuda_python and (probe or dynamic_batch or two_inputs or calibrator_builds or backend)" \
  2>&1 | tee "$OUT/cuda-python.txt" | tail -6
rm -rf /tmp/b && python3 -c "
from pathlib import Path
from tests import models
models.save(models.small_cnn(), Path('/tmp/b/models/cnn.onnx'))
models.save(models.two_input_model(), Path('/tmp/b/models/two/model.onnx'))"
timeout 100 python3 -m flows.cli convert /tmp/b/models/cnn.onnx -p fp16 -p fp32 --strategy all 2>&1 | tee "$OUT/flow-cnn.txt" | tail -12
python3 -m flows.cli status /tmp/b 2>&1 | tail -6
for i in $(seq 1 60); do pgrep -f export_zoo.py >/dev/null || break; sleep 2; done
cat /tmp/zres/export.log /tmp/zres/zoo-export.txt 2>/dev/null > "$OUT/zoo-export.txt"; tail -25 "$OUT/zoo-export.txt"
