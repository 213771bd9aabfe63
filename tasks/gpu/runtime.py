"""Run a TensorRT engine: the named-tensor API and ``execute_async_v3`` on a stream, over pycuda or
cuda-python (tasks/gpu/cuda_backend.py).

``EngineRunner`` takes any number of inputs and outputs of any dtype TensorRT exposes, sets the
input shapes on every call (dynamic shapes), sizes the outputs from the context, and copies through
page-locked host buffers that are kept and grown between calls. Inputs are cast where TensorRT
narrowed the ONNX type (int64 ids become an int32 engine input on TensorRT 8.6; bool stays bool).

``device_info`` describes the GPU for the probe. Python 3.9-compatible; tensorrt and the CUDA
bindings are imported inside functions, so the pure helpers (``coerce_input``) run on CPU.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from tasks.errors import InfraError, ModelError

log = logging.getLogger("trtflow.gpu.runtime")

_NUMPY_BY_TRT_NAME = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32,
                      "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8}


def numpy_dtype(trt: Any, dtype: Any) -> np.dtype:
    """numpy dtype of a TensorRT DataType; ModelError for types numpy cannot hold (bf16, fp8, int4)."""
    name = getattr(dtype, "name", str(dtype)).split(".")[-1]
    if name in _NUMPY_BY_TRT_NAME:
        return np.dtype(_NUMPY_BY_TRT_NAME[name])
    try:
        return np.dtype(trt.nptype(dtype))
    except Exception:  # noqa: BLE001 - nptype raises TypeError for types without a numpy twin
        raise ModelError(f"an engine I/O tensor has TensorRT type {name}, which numpy cannot hold.",
                         fix="Keep the model's inputs and outputs in float32/float16/int32/int64/bool "
                             "(e.g. ModelOpt AutoCast with keep_io_types).") from None


def coerce_input(name: str, array: Any, dtype: np.dtype) -> np.ndarray:
    """``array`` as the engine input's dtype, C-contiguous.

    Integer narrowing (int64 -> int32) is checked for overflow; floats convert freely (the
    accuracy gate judges the result); other conversions are a ModelError naming the input.
    """
    a = np.asarray(array)
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return np.ascontiguousarray(a)
    if dtype.kind in "iu" and a.dtype.kind in "iub":
        if a.size and a.dtype.kind != "b":
            info = np.iinfo(dtype)
            lo, hi = int(a.min()), int(a.max())
            if lo < info.min or hi > info.max:
                raise ModelError(f"input {name!r} holds values {lo}..{hi}, outside the engine's {dtype} range.",
                                 fix=f"TensorRT runs {name} as {dtype}; keep its values within {info.min}..{info.max}.")
        return np.ascontiguousarray(a.astype(dtype))
    if dtype.kind == "b" and a.dtype.kind in "biu":
        return np.ascontiguousarray(a.astype(np.bool_))
    if dtype.kind == "f" and a.dtype.kind in "fiub":
        return np.ascontiguousarray(a.astype(dtype))
    raise ModelError(f"input {name!r} is {a.dtype}, the engine takes {dtype}.",
                     fix=f"Give {name} as {dtype} (or a type that converts to it without loss).")


def cuda_init() -> Any:
    """Initialise CUDA and make device 0's primary context current (the one TensorRT's runtime API
    uses too). Returns the CUDA interface of tasks/gpu/cuda_backend.py (pycuda or cuda-python).
    InfraError where no CUDA bindings import or the GPU is missing."""
    from tasks.gpu.cuda_backend import cuda_api

    return cuda_api()


def _nvidia_driver_version() -> str:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return ""
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
    return found.group(1) if found else ""


def _cuda_python_info() -> Dict[str, str]:
    """GPU UUID and CUDA runtime version through cuda-python, where installed (pycuda has neither)."""
    out: Dict[str, str] = {}
    try:
        try:
            from cuda.bindings import driver as cu, runtime as cudart  # cuda-python >= 12.6 layout
        except ImportError:
            from cuda import cuda as cu, cudart  # older layout
        cu.cuInit(0)  # idempotent; the CUDA backend initialised the driver already
        _, dev = cu.cuDeviceGet(0)
        _, uuid = getattr(cu, "cuDeviceGetUuid_v2", cu.cuDeviceGetUuid)(dev)
        raw = bytes(uuid.bytes)
        if len(raw) == 16:
            h = raw.hex()
            out["gpu_uuid"] = f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        _, version = cudart.cudaRuntimeGetVersion()
        if int(version):
            out["cuda_runtime"] = f"{int(version) // 1000}.{int(version) % 1000 // 10}"
    except Exception as err:  # noqa: BLE001 - optional details
        log.debug("cuda-python details unavailable: %s", err)
    return out


def device_info(trt: Any) -> Dict[str, Any]:
    """The probe's ``env`` (without ``caps``): TensorRT, GPU, compute capability, driver, CUDA, Python."""
    import platform
    import sys

    cuda = cuda_init()
    dev = cuda.Device(0)
    major, minor = dev.compute_capability()
    driver_api = cuda.get_driver_version()  # e.g. 12040
    extra = _cuda_python_info()
    built = ".".join(str(v) for v in cuda.get_version()[:2])  # the CUDA the bindings were built against
    from tasks.gpu.cuda_backend import backend_name

    return {
        "cuda_backend": backend_name(),
        "tensorrt": str(trt.__version__),
        "gpu": str(dev.name()),
        "compute_capability": f"{major}.{minor}",
        "driver": _nvidia_driver_version() or f"CUDA driver API {driver_api // 1000}.{driver_api % 1000 // 10}",
        "cuda_runtime": extra.get("cuda_runtime") or built,
        "python": platform.python_version(),
        "interpreter": sys.executable,
        "gpu_uuid": extra.get("gpu_uuid") or f"pci:{dev.pci_bus_id()}",
        "memory_total_mib": int(dev.total_memory()) // (1 << 20),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    }


class _Buffer:
    """A page-locked host buffer and a device buffer of the same capacity, grown on demand."""

    def __init__(self, cuda: Any) -> None:
        self.cuda = cuda
        self.capacity = 0
        self.host: Any = None
        self.device: Any = None

    def ensure(self, nbytes: int) -> None:
        if nbytes <= self.capacity and self.device is not None:
            return
        capacity = max(int(nbytes), 1)
        if self.device is not None:
            self.device.free()
        self.host = self.cuda.pagelocked_empty((capacity,), np.uint8)
        self.device = self.cuda.mem_alloc(capacity)
        self.capacity = capacity

    def view(self, dtype: np.dtype, shape: Sequence[int]) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.host[:nbytes].view(dtype).reshape(tuple(shape))


class EngineRunner:
    """Runs one engine: ``run({input: array}) -> {output: array}``; dynamic shapes set per call.

    Usage::

        runner = EngineRunner.from_file("model.plan")
        outputs = runner.run({"images": batch})
    """

    def __init__(self, engine: Any, trt: Any = None, runtime: Any = None) -> None:
        if trt is None:
            from tasks.gpu.build import import_tensorrt

            trt = import_tensorrt()
        self.trt = trt
        self.cuda = cuda_init()
        self.engine = engine
        self.runtime = runtime  # the runtime must outlive its engines
        self.context = engine.create_execution_context()
        if self.context is None:
            raise InfraError("TensorRT could not create an execution context (GPU memory exhausted?).",
                             fix="Retry on a GPU with more free memory, or lower the profiles' max shapes.")
        self.stream = self.cuda.Stream()
        self.inputs: List[str] = []
        self.outputs: List[str] = []
        self.dtypes: Dict[str, np.dtype] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(name)
            self.dtypes[name] = numpy_dtype(trt, engine.get_tensor_dtype(name))
            if is_input and hasattr(engine, "is_shape_inference_io") and engine.is_shape_inference_io(name):
                raise ModelError(f"engine input {name!r} is a shape tensor, which trtflow cannot feed yet.",
                                 fix="Export the model with that input as a constant or an ordinary tensor.")
        self._buffers: Dict[str, _Buffer] = {name: _Buffer(self.cuda) for name in self.inputs + self.outputs}
        self._out_shapes: Dict[str, Tuple[int, ...]] = {}
        self._in_shapes: Dict[str, Tuple[int, ...]] = {}
        self._profile = 0
        self._kept: List[Any] = []

    @classmethod
    def from_file(cls, path: str, logger: Any = None, version_compatible: bool = False) -> "EngineRunner":
        """Deserialize a plan file and wrap it."""
        from tasks.gpu.build import import_tensorrt, make_logger

        trt = import_tensorrt()
        cuda_init()
        logger = logger or make_logger(trt)
        runtime = trt.Runtime(logger)
        if version_compatible and hasattr(runtime, "engine_host_code_allowed"):
            runtime.engine_host_code_allowed = True
        engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise ModelError(f"TensorRT could not load the engine {path}.",
                             fix="An engine only loads on the TensorRT version and GPU model it was built for; rebuild it.",
                             details=list(getattr(logger, "errors", [])))
        return cls(engine, trt=trt, runtime=runtime)

    # -- shapes ---------------------------------------------------------------------------------

    def profile_shapes(self, name: str, profile: int = 0) -> List[List[int]]:
        """[min, opt, max] of an input under a profile (its fixed shape three times if static)."""
        shape = [int(d) for d in self.engine.get_tensor_shape(name)]
        if all(d >= 0 for d in shape):
            return [shape, shape, shape]
        if hasattr(self.engine, "get_tensor_profile_shape"):
            dims = self.engine.get_tensor_profile_shape(name, profile)
        else:  # before 8.5
            dims = self.engine.get_profile_shape(profile, name)
        return [[int(d) for d in dims[k]] for k in range(3)]

    def opt_shapes(self, profile: int = 0) -> Dict[str, List[int]]:
        """Each input's opt shape under ``profile``: the shape the benchmark runs at."""
        return {name: self.profile_shapes(name, profile)[1] for name in self.inputs}

    def _pick_profile(self, shapes: Dict[str, Tuple[int, ...]]) -> int:
        count = int(getattr(self.engine, "num_optimization_profiles", 1) or 1)
        problems = []
        for p in range(count):
            fits = True
            for name, shape in shapes.items():
                lo, _, hi = self.profile_shapes(name, p)
                if len(shape) != len(lo) or any(not (a <= s <= b) for a, s, b in zip(lo, shape, hi)):
                    fits = False
                    problems.append(f"profile {p}: {name} {list(shape)} outside {lo}..{hi}")
                    break
            if fits:
                return p
        raise ModelError("input shapes fit none of the engine's optimisation profiles: " + "; ".join(problems),
                         fix="Add a profile covering these shapes in trtflow.yaml (profiles: min/opt/max) and rebuild.")

    # -- one inference ----------------------------------------------------------------------------

    def set_inputs(self, feeds: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
        """Copy ``feeds`` to the GPU (async), set shapes and addresses; returns the output shapes."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ModelError(f"no data for engine input(s) {', '.join(missing)} (got {', '.join(sorted(feeds)) or 'none'}).",
                             fix="Key the eval inputs by the model's input names.")
        extra = sorted(set(feeds) - set(self.inputs))
        if extra:
            log.warning("ignoring inputs the engine does not take: %s", ", ".join(extra))
        arrays = {n: coerce_input(n, feeds[n], self.dtypes[n]) for n in self.inputs}
        shapes = {n: tuple(int(d) for d in a.shape) for n, a in arrays.items()}
        profile = self._pick_profile(shapes)
        self._in_shapes = shapes
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, self.stream.handle)
            self._profile = profile
        for name, array in arrays.items():
            if not self.context.set_input_shape(name, self.trt.Dims(list(array.shape))):
                raise ModelError(f"TensorRT refused shape {list(array.shape)} for input {name!r}.",
                                 fix="Use shapes inside the engine's optimisation profile.")
            buf = self._buffers[name]
            buf.ensure(array.nbytes)
            if array.nbytes:
                host = buf.view(array.dtype, array.shape)
                np.copyto(host, array)
                self.cuda.memcpy_htod_async(buf.device, host, self.stream)
            self.context.set_tensor_address(name, int(buf.device))
        self._out_shapes = {}
        for name in self.outputs:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ModelError(f"output {name!r} has a data-dependent shape {list(shape)}, which trtflow cannot run yet.",
                                 fix="Export the model with static output shapes (e.g. pad NonZero/NMS outputs).")
            buf = self._buffers[name]
            buf.ensure(int(np.prod(shape)) * self.dtypes[name].itemsize)
            self.context.set_tensor_address(name, int(buf.device))
            self._out_shapes[name] = shape
        return dict(self._out_shapes)

    def launch(self) -> None:
        """Enqueue one inference on the stream (inputs as last set)."""
        if not self.context.execute_async_v3(self.stream.handle):
            raise InfraError("TensorRT could not enqueue the inference (execute_async_v3 returned false).",
                             fix="See build.log for TensorRT's error; retry on another worker if it is a CUDA error.")

    def upload(self) -> None:
        """Enqueue the H2D copies of the inputs as last set (from their page-locked buffers): what the
        benchmark times as host-to-device."""
        for name in self.inputs:
            buf = self._buffers[name]
            view = buf.view(self.dtypes[name], self._in_shapes[name])
            if view.nbytes:
                self.cuda.memcpy_htod_async(buf.device, view, self.stream)

    def download(self) -> Dict[str, np.ndarray]:
        """Enqueue the D2H copies of the outputs into their page-locked buffers; returns the views
        (valid after the stream synchronises)."""
        views = {}
        for name in self.outputs:
            buf = self._buffers[name]
            view = buf.view(self.dtypes[name], self._out_shapes[name])
            if view.nbytes:
                self.cuda.memcpy_dtoh_async(view, buf.device, self.stream)
            views[name] = view
        return views

    def fetch(self) -> Dict[str, np.ndarray]:
        """Copy the outputs back (async), wait for the stream, return copies."""
        views = self.download()
        self.stream.synchronize()
        return {name: np.array(view, copy=True) for name, view in views.items()}

    def keep(self, resource: Any) -> None:
        """Hold ``resource`` (a CUDA graph) until close(): it refers to this runner's buffers."""
        self._kept.append(resource)

    def io_bytes(self) -> int:
        """Bytes of the input and output tensors at the shapes last set."""
        total = 0
        for name, shape in list(self._in_shapes.items()) + list(self._out_shapes.items()):
            total += int(np.prod(shape)) * self.dtypes[name].itemsize
        return total

    def activation_bytes(self) -> int:
        """Activation memory for the shapes last set where TensorRT reports it per shape (10.1+:
        ``update_device_memory_size_for_shapes``), else the engine's worst case over its profiles."""
        update = getattr(self.context, "update_device_memory_size_for_shapes", None)
        if update is not None:
            try:
                value = int(update())
                if value > 0:
                    return value
            except Exception as err:  # noqa: BLE001 - older bindings or a static allocation strategy
                log.debug("update_device_memory_size_for_shapes unavailable: %s", err)
        return self.device_memory_bytes()

    def run(self, feeds: Dict[str, Any]) -> Dict[str, np.ndarray]:
        """One inference: ``{input name: array}`` -> ``{output name: array}``."""
        self.set_inputs(feeds)
        self.launch()
        return self.fetch()

    def close(self) -> None:
        """Free the device buffers and the context now (while the CUDA context is still current)."""
        self.stream.synchronize()
        for resource in self._kept:
            resource.close()
        self._kept = []
        for buf in self._buffers.values():
            if buf.device is not None:
                buf.device.free()
                buf.device, buf.host, buf.capacity = None, None, 0
        self.context = None

    def device_memory_bytes(self) -> int:
        from tasks.gpu.compat import device_memory_bytes

        return device_memory_bytes(self.engine)
