"""GPU tests: real TensorRT on a real CUDA GPU, through the subprocess protocol (tasks.gpu_client).

Run them with the GPU worker's interpreter, e.g. on the lent H100::

    /opt/trt/bin/trt-python -m pytest tests/gpu -q -s

Every test runs once per CUDA backend of tasks/gpu/cuda_backend.py that imports here (ids
``[pycuda]`` / ``[cuda_python]``; the subprocesses get ``TRTFLOW_CUDA``); with ``TRTFLOW_CUDA`` set
in the environment only that backend runs, e.g. ``TRTFLOW_CUDA=cuda-python ... -k cuda_python``.

Every test here is marked ``gpu`` and skipped, with the reason, where ``import tensorrt`` fails
(CI, the Python 3.11 venv) or where no CUDA GPU is visible. This file and the tests import only
what the TensorRT interpreter has (Python 3.9: numpy, onnx, onnxruntime, pytest; no prefect).
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Optional

import pytest

HERE = Path(__file__).resolve().parent
_REASON: list = []


def _why_skip() -> Optional[str]:
    """None when TensorRT imports and a CUDA device is visible, else the skip reason."""
    if _REASON:
        return _REASON[0]
    reason = None
    try:
        import tensorrt  # noqa: F401
    except Exception as err:  # noqa: BLE001 - ImportError, or OSError from a missing libnvinfer
        reason = (f"TensorRT is not importable in {sys.executable} ({type(err).__name__}: {err}): run these with the "
                  f"GPU worker's interpreter (TRT_PYTHON, e.g. /opt/trt/bin/trt-python)")
    else:
        try:
            libcuda = ctypes.CDLL("libcuda.so.1")
            count = ctypes.c_int(0)
            # cuInit creates no context; the GPU work happens in the tasks.gpu subprocesses.
            if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
                reason = f"TensorRT imports in {sys.executable}, but no CUDA GPU is visible: run these on a GPU worker"
        except OSError as err:
            reason = f"TensorRT imports in {sys.executable}, but there is no CUDA driver ({err}): run these on a GPU worker"
    _REASON.append(reason)
    return reason


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs TensorRT and a CUDA GPU (run with TRT_PYTHON's interpreter on a GPU worker)")


def pytest_collection_modifyitems(config, items):
    mine = [item for item in items if HERE in Path(str(item.fspath)).resolve().parents]
    if not mine:
        return
    reason = _why_skip()
    for item in mine:
        item.add_marker(pytest.mark.gpu)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def trt_python_is_this_interpreter(monkeypatch):
    """tasks.gpu_client runs ``$TRT_PYTHON -m tasks.gpu``: here, the interpreter running the tests."""
    monkeypatch.setenv("TRT_PYTHON", sys.executable)


def _backend_imports(name: str) -> Optional[str]:
    """None when CUDA backend ``name`` imports in this interpreter, else why not."""
    try:
        if name == "pycuda":
            import pycuda.driver  # noqa: F401
        else:
            from tasks.gpu.cuda_backend import _import_cudart

            _import_cudart()
    except Exception as err:  # noqa: BLE001 - ImportError, or OSError from a missing libcuda
        return f"{name} does not import in {sys.executable} ({type(err).__name__}: {err})"
    return None


@pytest.fixture(autouse=True, params=["pycuda", "cuda-python"], ids=["pycuda", "cuda_python"])
def cuda_backend(request, monkeypatch):
    """Each GPU test once per CUDA backend (TRTFLOW_CUDA reaches the tasks.gpu subprocesses)."""
    import os

    name = request.param
    wanted = os.environ.get("TRTFLOW_CUDA")
    if wanted and wanted != name:
        pytest.skip(f"TRTFLOW_CUDA={wanted}: the {name} run is left out")
    why = _backend_imports(name)
    if why:
        pytest.skip(why)
    monkeypatch.setenv("TRTFLOW_CUDA", name)
    return name
