"""trtflow's GPU side: the code that runs inside the TensorRT interpreter (``TRT_PYTHON``).

The flow never imports this package's TensorRT-using modules; it runs
``$TRT_PYTHON -m tasks.gpu <verb> request.json response.json`` in a subprocess (tasks/gpu_client.py)
and reads the JSON response. Verbs: ``probe`` (what this worker offers), ``engine`` (build an
engine from ONNX, then optionally run it on eval inputs and benchmark it, in one process), ``run``
(eval/benchmark an existing engine) and ``merge-cache`` (combine TensorRT timing caches).

Modules:
    compat      every TensorRT-version decision, as pure functions (unit-tested on CPU)
    build       ONNX -> serialized engine, timing cache, engine inspector
    calibrator  implicit INT8 calibration (IInt8EntropyCalibrator2) over .npz batches
    runtime     EngineRunner: run an engine through the named-tensor API
    cuda_backend  one small CUDA interface over pycuda or cuda-python (TRTFLOW_CUDA forces one)
    check       run an engine on the eval inputs, write its outputs
    bench       latency percentiles, throughput, device memory

The Python 3.9 rule: TensorRT 8.6's full builder only exists for Python <= 3.9 (see
../shared/gpu/README.md), so everything here must run on Python 3.9. Every module starts with
``from __future__ import annotations``; no ``match``; no ``X | Y`` outside annotations; runtime
typing uses ``typing.Optional/List/Dict``. Imports are limited to the standard library, numpy,
onnx, tensorrt, pycuda or cuda-python, tasks.errors, tasks.shapes and tasks.fixes; tensorrt and the CUDA bindings are imported
inside functions so that compat and the pure helpers import on any CPU machine.
"""
