"""One small CUDA interface for tasks/gpu, over pycuda or cuda-python.

TensorRT 11.1 moves to CUDA 13, where pycuda does not build; cuda-python (NVIDIA's bindings) ships
for every CUDA. Both sit behind the same interface: the subset of ``pycuda.driver`` that the
runtime, the benchmark and the calibrator use::

    Device(0).name() / compute_capability() / total_memory() / pci_bus_id()
    get_driver_version() -> int (12040)      get_version() -> (12, 4, 0): the CUDA the bindings use
    mem_alloc(nbytes) -> allocation (int() is the device pointer; .free())
    pagelocked_empty(shape, dtype) -> numpy array in page-locked host memory
    memcpy_htod(dev, host) / memcpy_htod_async(dev, host, stream) / memcpy_dtoh_async(host, dev, stream)
    Stream() (.handle: int for execute_async_v3, .synchronize())
    Event() (.record(stream), .synchronize(), .time_till(other) -> ms)

For pycuda that is ``pycuda.driver`` itself (with device 0's primary context pushed); for
cuda-python, ``CudaPythonDriver`` maps it onto the runtime API (``cudart``, whose calls return
``(error, *values)``), which uses the primary context as TensorRT does. A hand-written adapter
rather than a library: no package offers this interface over both.

The backend is chosen once per process by what imports: pycuda first (the path measured on the
H100/H200), then cuda-python; ``TRTFLOW_CUDA=pycuda|cuda-python`` forces one. Python 3.9-compatible.
"""
from __future__ import annotations

import ctypes
import os
import sys
import weakref
from typing import Any, List, Sequence, Tuple

import numpy as np

from tasks.errors import InfraError

ENV = "TRTFLOW_CUDA"
BACKENDS = ("pycuda", "cuda-python")
_CHOSEN: List[Tuple[str, Any]] = []  # (name, interface), once per process
_PRIMARY: List[Any] = []


def _push_primary_context(cuda: Any) -> None:
    """Retain device 0's primary context and push it (popped at exit); a no-op the second time.

    This is what pycuda.autoprimaryctx does, minus its import of pycuda.tools, which uses
    ``X | Y`` annotations at run time and so fails on Python 3.9 (measured on the H100 bundle).
    """
    if _PRIMARY:
        return
    import atexit

    cuda.init()
    context = cuda.Device(0).retain_primary_context()
    context.push()
    _PRIMARY.append(context)

    def _pop() -> None:
        try:
            _PRIMARY.pop().pop()
        except Exception:  # noqa: BLE001 - the process is exiting; the driver reclaims the context
            pass

    atexit.register(_pop)


def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6 layout (the only one in 13)
    except ImportError:
        from cuda import cudart  # 12.x layout (12.6.2 on the lent GPU machine)
    return cudart


class _DeviceAllocation:
    def __init__(self, driver: "CudaPythonDriver", nbytes: int) -> None:
        self._driver = driver
        self.ptr = int(driver.call(driver.cudart.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))

    def __int__(self) -> int:
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            self._driver.call(self._driver.cudart.cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class _Stream:
    def __init__(self, driver: "CudaPythonDriver") -> None:
        self._driver = driver
        self.stream = driver.call(driver.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.handle = int(self.stream)  # TensorRT's execute_async_v3 takes the handle as an int

    def synchronize(self) -> None:
        self._driver.call(self._driver.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")


class _Event:
    def __init__(self, driver: "CudaPythonDriver") -> None:
        self._driver = driver
        self.event = driver.call(driver.cudart.cudaEventCreate(), "cudaEventCreate")

    def record(self, stream: Any = None) -> None:
        self._driver.call(self._driver.cudart.cudaEventRecord(self.event, stream.stream if stream else 0),
                          "cudaEventRecord")

    def synchronize(self) -> None:
        self._driver.call(self._driver.cudart.cudaEventSynchronize(self.event), "cudaEventSynchronize")

    def time_till(self, other: "_Event") -> float:
        return float(self._driver.call(self._driver.cudart.cudaEventElapsedTime(self.event, other.event),
                                       "cudaEventElapsedTime"))


class _Device:
    def __init__(self, driver: "CudaPythonDriver", index: int) -> None:
        self.props = driver.call(driver.cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")

    def name(self) -> str:
        raw = self.props.name
        return raw.split(b"\0")[0].decode() if isinstance(raw, bytes) else str(raw)

    def compute_capability(self) -> Tuple[int, int]:
        return int(self.props.major), int(self.props.minor)

    def total_memory(self) -> int:
        return int(self.props.totalGlobalMem)

    def pci_bus_id(self) -> str:
        p = self.props
        return f"{int(p.pciDomainID):04x}:{int(p.pciBusID):02x}:{int(p.pciDeviceID):02x}.0"


class CudaPythonDriver:
    """The pycuda.driver subset above, over cuda-python's runtime API (``cudart``)."""

    name = "cuda-python"

    def __init__(self, cudart: Any) -> None:
        self.cudart = cudart
        self.call(cudart.cudaSetDevice(0), "cudaSetDevice")
        self.call(cudart.cudaFree(0), "cudaFree(0)")  # creates device 0's primary context now, not mid-build
        kinds = cudart.cudaMemcpyKind
        self._htod, self._dtoh = kinds.cudaMemcpyHostToDevice, kinds.cudaMemcpyDeviceToHost

    def call(self, result: Any, what: str) -> Any:
        """The value(s) of a cudart call, or an InfraError naming the call and CUDA's error."""
        err, rest = result[0], tuple(result[1:])
        if int(err) != 0:
            text = getattr(err, "name", str(err))
            raise InfraError(f"CUDA {what} failed: {text}" + (" (out of memory)" if "Allocation" in text else ""),
                             fix="Check the GPU with nvidia-smi; retry on another worker if it repeats.")
        return rest[0] if len(rest) == 1 else (rest or None)

    def Device(self, index: int) -> _Device:  # noqa: N802 - pycuda's spelling
        return _Device(self, index)

    def get_driver_version(self) -> int:
        return int(self.call(self.cudart.cudaDriverGetVersion(), "cudaDriverGetVersion"))

    def get_version(self) -> Tuple[int, int, int]:
        v = int(self.call(self.cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))
        return v // 1000, v % 1000 // 10, 0

    def mem_alloc(self, nbytes: int) -> _DeviceAllocation:
        return _DeviceAllocation(self, nbytes)

    def pagelocked_empty(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        ptr = int(self.call(self.cudart.cudaMallocHost(max(count * dtype.itemsize, 1)), "cudaMallocHost"))
        raw = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_ubyte)), (max(count * dtype.itemsize, 1),))
        array = raw[:count * dtype.itemsize].view(dtype).reshape(tuple(shape))
        freeing = weakref.finalize(raw, self.cudart.cudaFreeHost, ptr)  # when the last view is gone, as in pycuda
        freeing.atexit = False  # not at interpreter exit, after CUDA's own teardown: the driver reclaims it
        return array

    def _copy(self, dst: int, src: int, nbytes: int, kind: Any, stream: Any, what: str) -> None:
        if stream is None:
            self.call(self.cudart.cudaMemcpy(dst, src, nbytes, kind), what)
        else:
            self.call(self.cudart.cudaMemcpyAsync(dst, src, nbytes, kind, stream.stream), what)

    def memcpy_htod(self, dev: Any, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host)
        self._copy(int(dev), host.ctypes.data, host.nbytes, self._htod, None, "cudaMemcpy (host to device)")

    def memcpy_htod_async(self, dev: Any, host: np.ndarray, stream: Any = None) -> None:
        self._copy(int(dev), host.ctypes.data, host.nbytes, self._htod, stream, "cudaMemcpyAsync (host to device)")

    def memcpy_dtoh_async(self, host: np.ndarray, dev: Any, stream: Any = None) -> None:
        self._copy(host.ctypes.data, int(dev), host.nbytes, self._dtoh, stream, "cudaMemcpyAsync (device to host)")

    def Stream(self) -> _Stream:  # noqa: N802
        return _Stream(self)

    def Event(self) -> _Event:  # noqa: N802
        return _Event(self)


def _pycuda() -> Any:
    import pycuda.driver as cuda

    _push_primary_context(cuda)
    return cuda


def _cuda_python() -> Any:
    return CudaPythonDriver(_import_cudart())


_LOADERS = {"pycuda": _pycuda, "cuda-python": _cuda_python}


def cuda_api() -> Any:
    """The CUDA interface (see the module docstring), with device 0's primary context current.

    Raises:
        InfraError: TRTFLOW_CUDA names an unknown backend, the forced one does not import, neither
            imports, or CUDA cannot start (not retried where the interpreter lacks the bindings).
    """
    if _CHOSEN:
        return _CHOSEN[0][1]
    forced = os.environ.get(ENV, "").strip()
    if forced and forced not in BACKENDS:
        raise InfraError(f"{ENV}={forced!r} names no CUDA backend.", fix=f"Set {ENV} to one of {', '.join(BACKENDS)}, "
                                                                           f"or unset it to take what imports.",
                         retriable=False)
    failures = []
    for name in ([forced] if forced else list(BACKENDS)):
        try:
            api = _LOADERS[name]()
        except InfraError:
            raise
        except (ImportError, OSError) as err:  # OSError: the bindings' libcuda.so.1 is missing
            failures.append(f"{name}: {type(err).__name__}: {err}")
            continue
        except Exception as err:  # noqa: BLE001 - pycuda.driver.Error, OSError for a missing libcuda.so.1
            raise InfraError(f"CUDA could not start on this worker through {name} ({type(err).__name__}: {err}).",
                             fix="Check the NVIDIA driver and CUDA_VISIBLE_DEVICES (nvidia-smi); retry on another "
                                 "worker.") from None
        _CHOSEN.append((name, api))
        return api
    raise InfraError(f"no CUDA bindings import in {sys.executable} ({'; '.join(failures)}).",
                     fix="Install pycuda or cuda-python in the TensorRT interpreter (pip install 'trtflow[gpu]', or "
                         f"cuda-python for CUDA 13), or set {ENV} to the one installed; see README 'GPU worker'.",
                     retriable=False)


def backend_name() -> str:
    """"pycuda" or "cuda-python": the backend ``cuda_api`` chose ("" before it was called)."""
    return _CHOSEN[0][0] if _CHOSEN else ""


# ---- CUDA graphs ------------------------------------------------------------------------------------
# Through the driver API with ctypes rather than each binding's own graph API: pycuda's graph calls
# differ between its releases and are missing from older ones, cuda-python's differ again; the driver
# entry points below are stable since CUDA 11.4 and take the same stream handle both backends expose.
_CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1  # other threads may still call unsafe APIs (the Prefect worker's)


def _libcuda() -> Any:
    return ctypes.CDLL("libcuda.so.1")


def _check(lib: Any, result: int, what: str) -> None:
    if int(result) != 0:
        name = ctypes.c_char_p()
        lib.cuGetErrorName(int(result), ctypes.byref(name))
        raise InfraError(f"CUDA {what} failed: {(name.value or b'?').decode()} ({int(result)})",
                         fix="The benchmark falls back to plain enqueues; nothing to do unless it repeats.")


class CudaGraph:
    """An instantiated CUDA graph captured from one stream: ``launch(stream)``, ``close()``."""

    def __init__(self, lib: Any, graph: Any, graph_exec: Any) -> None:
        self._lib, self._graph, self._exec = lib, graph, graph_exec

    def launch(self, stream: Any) -> None:
        _check(self._lib, self._lib.cuGraphLaunch(self._exec, ctypes.c_void_p(int(stream.handle))), "cuGraphLaunch")

    def close(self) -> None:
        if self._exec:
            self._lib.cuGraphExecDestroy(self._exec)
            self._lib.cuGraphDestroy(self._graph)
            self._exec = self._graph = None


def capture_graph(stream: Any, enqueue: Any) -> CudaGraph:
    """Capture ``enqueue()`` (e.g. one ``execute_async_v3``) on ``stream`` into an instantiated graph.

    Raises:
        InfraError (or whatever ``enqueue`` raises): no libcuda, or the work cannot be captured
        (TensorRT refuses for some engines, e.g. data-dependent shapes or host-synchronising
        plugins); the capture is always ended so the stream stays usable.
    """
    lib = _libcuda()
    handle = ctypes.c_void_p(int(stream.handle))
    _check(lib, lib.cuStreamBeginCapture_v2(handle, ctypes.c_int(_CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)),
           "cuStreamBeginCapture")
    graph = ctypes.c_void_p()
    try:
        enqueue()
    finally:
        ended = lib.cuStreamEndCapture(handle, ctypes.byref(graph))
    _check(lib, ended, "cuStreamEndCapture")
    graph_exec = ctypes.c_void_p()
    result = lib.cuGraphInstantiateWithFlags(ctypes.byref(graph_exec), graph, ctypes.c_ulonglong(0))
    if int(result) != 0:
        lib.cuGraphDestroy(graph)
        _check(lib, result, "cuGraphInstantiateWithFlags")
    return CudaGraph(lib, graph, graph_exec)
