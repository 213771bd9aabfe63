"""TEST DOUBLES of the ``tensorrt`` (8.6-, 10.x- or 11.x-shaped), ``pycuda.driver`` and cuda-python
``cudart`` modules, for CPU tests of
tasks/gpu's glue: request -> parse -> profiles -> config -> (calibrator) -> build -> plan file ->
inspector JSON -> runner -> eval outputs -> benchmark -> response.

Nothing here is TensorRT. The "engine" is the ONNX model run by onnxruntime; "device memory" is a
dict of bytearrays behind fake pointers. Names and signatures follow TensorRT 8.6's Python API (read
from its bindings) so the glue calls what the real module has; numerical behaviour is onnxruntime's.
``install(monkeypatch, version=..., cuda=...)`` puts the doubles into ``sys.modules``.

Per version (from NVIDIA's Python API references and the 10.x -> 11.x migration guide):
- 8.6: weakly typed only; ONNX networks must be created with EXPLICIT_BATCH; int64 inputs become int32.
- 10.x: STRONGLY_TYPED exists; EXPLICIT_BATCH is deprecated and ignored (the double refuses it, so
  trtflow never sets it); a strongly typed network refuses the FP16/INT8 flags and calibrators;
  INT64 tensors; ParserError.node_name(); device_memory_size_v2.
- 11.x: strongly typed only (STRONGLY_TYPED kept as an ignored flag); BuilderFlag.FP16/INT8,
  ``int8_calibrator``, ``set_calibration_profile``, ``IInt8EntropyCalibrator2`` and
  ``device_memory_size`` are gone; the inspector's JSON has "I/O Tensors" instead of "Bindings" and
  tensors name their "DataType".
The inspector reports each ONNX node's precision as the real one would: INT8 where a node reads a
DequantizeLinear output (Q/DQ fused), else the graph's float type (strongly typed) or the one the
builder flags allow (weakly typed).
"""
from __future__ import annotations

import enum
import json
import sys
import types
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import onnx

PLAN_HEADER = b"TRT-DOUBLE-PLAN\n"


# ---- pycuda.driver double ---------------------------------------------------------------------------

class _Memory:
    def __init__(self) -> None:
        self.blocks: Dict[int, bytearray] = {}
        self.next = 0x1000
        self.live_allocations = 0

    def alloc(self, nbytes: int) -> int:
        ptr = self.next
        self.next += max(int(nbytes), 1) + 256
        self.blocks[ptr] = bytearray(max(int(nbytes), 1))
        self.live_allocations += 1
        return ptr

    def read(self, ptr: int, nbytes: int) -> bytes:
        return bytes(self.blocks[ptr][:nbytes])

    def write(self, ptr: int, data: bytes) -> None:
        block = self.blocks[ptr]
        assert len(data) <= len(block), f"device write of {len(data)} bytes into a {len(block)}-byte buffer"
        block[:len(data)] = data


MEMORY = _Memory()

# The doubles' GPU clock: each enqueued inference "takes" launch_ms of GPU time and events read the
# clock, so enqueue-ahead windows and per-inference events measure launches, not host time.
GPU_CLOCK = {"ms": 0.0, "launch_ms": 0.25}


class DeviceAllocation:
    def __init__(self, nbytes: int) -> None:
        self.ptr = MEMORY.alloc(nbytes)

    def __int__(self) -> int:
        return self.ptr

    def free(self) -> None:
        MEMORY.blocks.pop(self.ptr, None)
        MEMORY.live_allocations -= 1


class Stream:
    handle = 7

    def synchronize(self) -> None:
        pass


class Event:
    def record(self, stream: Any = None) -> None:
        self.t = GPU_CLOCK["ms"]

    def synchronize(self) -> None:
        pass

    def time_till(self, other: "Event") -> float:
        return other.t - self.t


class Device:
    def __init__(self, index: int) -> None:
        self.index = index

    def name(self) -> str:
        return "Double GPU (no CUDA)"

    def compute_capability(self):
        return (9, 0)

    def total_memory(self) -> int:
        return 80 << 30

    def pci_bus_id(self) -> str:
        return "0000:00:00.0"

    def retain_primary_context(self) -> "Context":
        return Context()


class Context:
    """TEST DOUBLE of a CUDA context: push/pop do nothing."""

    def push(self) -> None:
        pass

    def pop(self) -> None:
        pass


def _pycuda_driver() -> types.ModuleType:
    m = types.ModuleType("pycuda.driver")
    m.__doc__ = "TEST DOUBLE of pycuda.driver (tests/tasks/gpu/trt_double.py)"
    m.init = lambda: None
    m.Device, m.Stream, m.Event, m.DeviceAllocation = Device, Stream, Event, DeviceAllocation
    m.get_driver_version = lambda: 12040
    m.get_version = lambda: (12, 4, 0)
    m.mem_alloc = DeviceAllocation
    m.pagelocked_empty = lambda shape, dtype: np.empty(shape, dtype)
    m.memcpy_htod = lambda dev, host: MEMORY.write(int(dev), np.ascontiguousarray(host).tobytes())
    m.memcpy_htod_async = lambda dev, host, stream=None: MEMORY.write(int(dev), np.ascontiguousarray(host).tobytes())

    def dtoh(host, dev, stream=None):
        raw = MEMORY.read(int(dev), host.nbytes)
        host[...] = np.frombuffer(raw, dtype=host.dtype).reshape(host.shape)

    m.memcpy_dtoh_async = dtoh
    return m


# ---- cuda-python (cudart, 12.x API) double ------------------------------------------------------------

class _HostBlocks:
    """Page-locked host memory of the cudart double: real ctypes buffers behind real addresses."""

    def __init__(self) -> None:
        self.blocks: Dict[int, Any] = {}

    def alloc(self, nbytes: int) -> int:
        import ctypes

        buf = (ctypes.c_ubyte * max(int(nbytes), 1))()
        ptr = ctypes.addressof(buf)
        self.blocks[ptr] = buf
        return ptr


HOST = _HostBlocks()


def _cudart() -> types.ModuleType:
    """TEST DOUBLE of cuda-python's ``cuda.cudart`` (12.x): every call returns ``(cudaError_t, *values)``."""
    import ctypes

    m = types.ModuleType("cuda.cudart")
    m.__doc__ = "TEST DOUBLE of cuda-python's cudart (tests/tasks/gpu/trt_double.py)"
    m.cudaError_t = enum.IntEnum("cudaError_t", "cudaSuccess cudaErrorInvalidValue cudaErrorMemoryAllocation", start=0)
    m.cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", "cudaMemcpyHostToHost cudaMemcpyHostToDevice "
                                                      "cudaMemcpyDeviceToHost cudaMemcpyDeviceToDevice cudaMemcpyDefault",
                                    start=0)
    ok = m.cudaError_t.cudaSuccess
    m.calls = []
    state = {"events": {}, "clock": 0.0, "next_event": 100}

    class cudaStream_t(int):  # noqa: N801 - cuda-python's name; int() gives the handle
        pass

    class cudaEvent_t(int):  # noqa: N801
        pass

    def memcpy(dst, src, count, kind, stream=None):
        m.calls.append(("cudaMemcpyAsync" if stream is not None else "cudaMemcpy", int(kind)))
        if kind == m.cudaMemcpyKind.cudaMemcpyHostToDevice:
            MEMORY.write(int(dst), ctypes.string_at(int(src), int(count)))
        elif kind == m.cudaMemcpyKind.cudaMemcpyDeviceToHost:
            ctypes.memmove(int(dst), bytes(MEMORY.read(int(src), int(count))), int(count))
        else:
            return (m.cudaError_t.cudaErrorInvalidValue,)
        return (ok,)

    def record(event, stream):
        state["events"][int(event)] = GPU_CLOCK["ms"]
        return (ok,)

    props = types.SimpleNamespace(name=b"Double GPU (cuda-python, no CUDA)", major=9, minor=0, totalGlobalMem=80 << 30,
                                  pciDomainID=0, pciBusID=0, pciDeviceID=0, uuid=types.SimpleNamespace(bytes=bytes(range(16))))
    m.cudaSetDevice = lambda device: (ok,)
    def free(ptr):
        if int(ptr):  # cudaFree(0) only initialises the context
            MEMORY.blocks.pop(int(ptr), None)
            MEMORY.live_allocations -= 1
        return (ok,)

    m.cudaFree = free
    m.cudaMalloc = lambda nbytes: (ok, MEMORY.alloc(nbytes))
    m.cudaMallocHost = lambda nbytes: (ok, HOST.alloc(nbytes))
    m.cudaFreeHost = lambda ptr: (HOST.blocks.pop(int(ptr), None), (ok,))[-1]
    m.cudaMemcpy = lambda dst, src, count, kind: memcpy(dst, src, count, kind)
    m.cudaMemcpyAsync = memcpy
    m.cudaStreamCreate = lambda: (ok, cudaStream_t(11))
    m.cudaStreamSynchronize = lambda stream: (ok,)
    m.cudaStreamDestroy = lambda stream: (ok,)
    def event_create():
        state["next_event"] += 1
        return (ok, cudaEvent_t(state["next_event"]))

    m.cudaEventCreate = event_create
    m.cudaEventRecord = record
    m.cudaEventSynchronize = lambda event: (ok,)
    m.cudaEventElapsedTime = lambda start, end: (ok, state["events"][int(end)] - state["events"][int(start)])
    m.cudaEventDestroy = lambda event: (ok,)
    m.cudaGetDeviceProperties = lambda device: (ok, props)
    m.cudaDriverGetVersion = lambda: (ok, 12040)
    m.cudaRuntimeGetVersion = lambda: (ok, 12060)
    m.cudaGetErrorString = lambda err: (ok, str(err).encode())
    return m


# ---- tensorrt double ----------------------------------------------------------------------------------

class _Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    Severity = _Severity

    def __init__(self) -> None:
        pass


class _Shape:
    """Which TensorRT the double is shaped like (set by ``install``)."""

    major = 8
    version = "8.6.0"


SHAPE = _Shape()

MemoryPoolType = enum.IntEnum("MemoryPoolType", "WORKSPACE DLA_MANAGED_SRAM", start=0)
HardwareCompatibilityLevel = enum.IntEnum("HardwareCompatibilityLevel", "NONE AMPERE_PLUS", start=0)
LayerInformationFormat = enum.IntEnum("LayerInformationFormat", "ONELINE JSON", start=0)
ProfilingVerbosity = enum.IntEnum("ProfilingVerbosity", "LAYER_NAMES_ONLY NONE DETAILED", start=0)
TensorIOMode = enum.IntEnum("TensorIOMode", "NONE INPUT OUTPUT", start=0)
DataType = enum.IntEnum("DataType", "FLOAT HALF INT8 INT32 BOOL UINT8 FP8 BF16 INT64", start=0)
ErrorCode = enum.IntEnum("ErrorCode", "SUCCESS INTERNAL_ERROR MEM_ALLOC_FAILED MODEL_DESERIALIZE_FAILED INVALID_VALUE "
                                      "INVALID_GRAPH INVALID_NODE UNSUPPORTED_GRAPH UNSUPPORTED_NODE", start=0)


def _builder_flags(major: int) -> Any:
    names = "DEBUG GPU_FALLBACK REFIT DISABLE_TIMING_CACHE TF32 SPARSE_WEIGHTS VERSION_COMPATIBLE EXCLUDE_LEAN_RUNTIME"
    if major < 11:  # removed in 11: strong typing replaces them
        names = "FP16 INT8 " + names + " FP8 OBEY_PRECISION_CONSTRAINTS PREFER_PRECISION_CONSTRAINTS"
    return enum.IntEnum("BuilderFlag", names, start=0)


def _network_flags(major: int) -> Any:
    names = {8: "EXPLICIT_BATCH EXPLICIT_PRECISION", 10: "EXPLICIT_BATCH STRONGLY_TYPED"}.get(
        major, "STRONGLY_TYPED PREFER_AOT_PYTHON_PLUGINS")
    return enum.IntEnum("NetworkDefinitionCreationFlag", names, start=0)


BuilderFlag = _builder_flags(8)
NetworkDefinitionCreationFlag = _network_flags(8)


def _onnx_to_trt(elem_type: int) -> DataType:
    table = {onnx.TensorProto.FLOAT: DataType.FLOAT, onnx.TensorProto.FLOAT16: DataType.HALF,
             onnx.TensorProto.INT32: DataType.INT32, onnx.TensorProto.BOOL: DataType.BOOL,
             onnx.TensorProto.INT8: DataType.INT8, onnx.TensorProto.UINT8: DataType.UINT8,
             # 8.6 narrows int64 to int32; 10+ keeps INT64
             onnx.TensorProto.INT64: DataType.INT32 if SHAPE.major < 10 else DataType.INT64}
    return table[elem_type]


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
       DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}


def nptype(dtype: DataType) -> type:
    return _NP[dtype]


class Dims(tuple):
    def __new__(cls, shape: Optional[List[int]] = None):
        return super().__new__(cls, [int(d) for d in (shape or [])])


class ITensor:
    def __init__(self, name: str, shape: List[int], dtype: DataType) -> None:
        self.name, self.shape, self.dtype, self.is_shape_tensor = name, Dims(shape), dtype, False


class INetworkDefinition:
    def __init__(self, flags: int, strongly_typed: bool) -> None:
        self.flags = flags
        self.strongly_typed = strongly_typed
        self.inputs: List[ITensor] = []
        self.onnx_path: Optional[str] = None

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> ITensor:
        return self.inputs[i]


class ParserError:
    def __init__(self, desc: str, node: int, name: str = "", op: str = "") -> None:
        self._desc, self._node, self._name, self._op = desc, node, name, op

    def desc(self) -> str:
        return self._desc

    def code(self) -> ErrorCode:
        return ErrorCode.UNSUPPORTED_NODE

    def node(self) -> int:
        return self._node

    def file(self) -> str:
        return "double.cpp"

    def func(self) -> str:
        return "parseGraph"

    def line(self) -> int:
        return 1


class _ParserError10(ParserError):
    """10+ names the failing node itself."""

    def node_name(self) -> str:
        return self._name

    def node_operator(self) -> str:
        return self._op


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
        self.network, self.logger, self.errors = network, logger, []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> ParserError:
        return self.errors[i]

    def parse_from_file(self, path: str) -> bool:
        model = onnx.load(path)
        for index, node in enumerate(model.graph.node):
            if not onnx.defs.has(node.op_type, node.domain or ""):
                kind = ParserError if SHAPE.major < 10 else _ParserError10  # 8.6 reports the node index only
                self.errors.append(kind(f"In node {index} (importFallbackPluginImporter): UNSUPPORTED_NODE: "
                                        f"Assertion failed: creator && \"Plugin not found\"", index, node.name, node.op_type))
                self.logger.log(_Severity.ERROR, f"ModelImporter: failed to import node {index}")
                return False
        init = {i.name for i in model.graph.initializer}
        for vi in model.graph.input:
            if vi.name in init:
                continue
            t = vi.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            self.network.inputs.append(ITensor(vi.name, shape, _onnx_to_trt(t.elem_type)))
        self.network.onnx_path = str(path)
        return True


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: Dict[str, List[List[int]]] = {}

    def set_shape(self, name: str, lo: Dims, opt: Dims, hi: Dims) -> None:
        assert all(isinstance(d, Dims) for d in (lo, opt, hi))
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class ITimingCache:
    def __init__(self, entries: Optional[List[str]] = None) -> None:
        self.entries = set(entries or [])

    def combine(self, other: "ITimingCache", ignore_mismatch: bool) -> bool:
        self.entries |= other.entries
        return True

    def serialize(self) -> bytes:
        return json.dumps(sorted(self.entries)).encode()


class IBuilderConfig:
    # class-level, as the real bindings' properties are (compat.caps_from_module checks the class)
    builder_optimization_level = 3
    hardware_compatibility_level = HardwareCompatibilityLevel.NONE
    int8_calibrator: Any = None

    def __init__(self) -> None:
        self.flags_set: List[Any] = []
        self.pool_limits: Dict[int, int] = {}
        self.builder_optimization_level = 3
        self.hardware_compatibility_level = HardwareCompatibilityLevel.NONE
        self.profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY
        self.profiles: List[IOptimizationProfile] = []
        self.timing_cache: Optional[ITimingCache] = None
        self.int8_calibrator: Any = None
        self.calibration_profile: Optional[IOptimizationProfile] = None

    def set_memory_pool_limit(self, pool: MemoryPoolType, nbytes: int) -> None:
        self.pool_limits[int(pool)] = nbytes

    def set_flag(self, flag: Any) -> None:
        self.flags_set.append(flag)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> ITimingCache:
        return ITimingCache(json.loads(bytes(data).decode()) if data else [])

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache:
        return self.timing_cache

    def set_calibration_profile(self, profile: IOptimizationProfile) -> bool:
        self.calibration_profile = profile
        return True


class _BuilderConfig11(IBuilderConfig):
    """11.x: the calibrator API is gone. The class lacks the attributes (compat.caps_from_module
    looks at the class) and an instance refuses them, as the 11.x bindings raise AttributeError."""

    _REMOVED = ("int8_calibrator", "set_calibration_profile", "get_calibration_profile")

    def __getattribute__(self, name: str) -> Any:
        if name in _BuilderConfig11._REMOVED:
            raise AttributeError(f"'tensorrt.IBuilderConfig' object has no attribute '{name}' (removed in TensorRT 11)")
        return super().__getattribute__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _BuilderConfig11._REMOVED:
            raise AttributeError(f"'tensorrt.IBuilderConfig' object has no attribute '{name}' (removed in TensorRT 11)")
        super().__setattr__(name, value)

    def __init__(self) -> None:
        self.__dict__.update(flags_set=[], pool_limits={}, builder_optimization_level=3,
                             hardware_compatibility_level=HardwareCompatibilityLevel.NONE,
                             profiling_verbosity=ProfilingVerbosity.LAYER_NAMES_ONLY, profiles=[], timing_cache=None)


class _BuilderConfig11Class:
    """What ``tensorrt.IBuilderConfig`` (the class) shows on 11: no calibrator attributes."""

    builder_optimization_level = 3
    hardware_compatibility_level = HardwareCompatibilityLevel.NONE
    set_memory_pool_limit = IBuilderConfig.set_memory_pool_limit
    set_flag = IBuilderConfig.set_flag


def _calibrate(logger: ILogger, network: INetworkDefinition, calib: Any) -> Optional[str]:
    """Drive the implicit calibrator as TensorRT does; None (with an error logged) when it yields nothing."""
    assert calib.get_batch_size() == 1
    if calib.read_calibration_cache():
        return "cache"
    names = [t.name for t in network.inputs]
    batches = 0
    while True:
        ptrs = calib.get_batch(names)
        if not ptrs:
            break
        assert len(ptrs) == len(names)
        batches += 1
    if not batches:
        logger.log(_Severity.ERROR, "Calibration failure occurred with no scaling factors detected.")
        return None
    calib.write_calibration_cache(memoryview(b"TRT-8600-EntropyCalibration2\nimages: 3c010a14\n"))
    return f"{batches} batches"


class Builder:
    crash_on_build = False

    def __init__(self, logger: ILogger) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        names = {f.name for f in NetworkDefinitionCreationFlag if flags & (1 << int(f))}
        if SHAPE.major < 10:
            assert "EXPLICIT_BATCH" in names, "8.6 ONNX networks need EXPLICIT_BATCH"
        else:
            assert "EXPLICIT_BATCH" not in names, f"EXPLICIT_BATCH is deprecated and ignored in {SHAPE.version}: do not set it"
        if SHAPE.major >= 11:
            assert "STRONGLY_TYPED" not in names, "STRONGLY_TYPED is deprecated and ignored in 11: do not set it"
        return INetworkDefinition(flags, strongly_typed=SHAPE.major >= 11 or "STRONGLY_TYPED" in names)

    def create_builder_config(self) -> IBuilderConfig:
        return _BuilderConfig11() if SHAPE.major >= 11 else IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> Optional[bytes]:
        dynamic = any(d < 0 for t in network.inputs for d in t.shape)
        if dynamic and not config.profiles:
            self.logger.log(_Severity.ERROR, "Network has dynamic or shape inputs, but no optimization profile has been defined.")
            return None
        flags = [f.name for f in config.flags_set]
        calib = config.__dict__.get("int8_calibrator")
        if network.strongly_typed and ({"FP16", "INT8"} & set(flags) or calib is not None):
            # 10.x: a strongly typed network takes its types from the graph; precision flags are an error.
            self.logger.log(_Severity.ERROR, f"Strongly typed networks do not accept the builder flags {flags} or a calibrator.")
            return None
        calibrated = None
        if calib is not None:
            assert "INT8" in flags
            calibrated = _calibrate(self.logger, network, calib)
            if calibrated is None:
                return None
        shapes = [{n: s for n, s in p.shapes.items()} for p in config.profiles]
        if config.timing_cache is not None:
            config.timing_cache.entries.add(f"{Path(network.onnx_path).name}:{sorted(int(f) for f in config.flags_set)}")
        plan = {"onnx": network.onnx_path, "profiles": shapes, "flags": flags,
                "inputs": {t.name: int(t.dtype) for t in network.inputs}, "calibrated": calibrated,
                "strongly_typed": network.strongly_typed, "verbosity": int(config.profiling_verbosity),
                "trt": SHAPE.version}
        return PLAN_HEADER + json.dumps(plan).encode()


_FORMAT_86 = {"int8": "Thirty-two wide channel vectorized row major Int8 format", "fp16": "Row major linear FP16 format",
              "fp32": "Row major linear FP32"}
_DATATYPE_11 = {"int8": "Int8", "fp16": "Half", "fp32": "Float"}


def _node_precisions(model: onnx.ModelProto, plan: Dict[str, Any]) -> List[Tuple[onnx.NodeProto, str]]:
    """(node, precision) for every node TensorRT would keep as a layer (Q/DQ fuse into their consumers)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types_ = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)
              + list(inferred.graph.output)}
    types_.update({i.name: i.data_type for i in model.graph.initializer})
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    flags = set(plan["flags"])
    out = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if plan["calibrated"] or (any(i in dq_outputs for i in node.input) and (plan["strongly_typed"] or "INT8" in flags)):
            out.append((node, "int8"))
            continue
        first = types_.get(node.input[0]) if node.input else None
        graph_type = "fp16" if first == onnx.TensorProto.FLOAT16 else "fp32"
        if plan["strongly_typed"]:
            out.append((node, graph_type))
        else:
            out.append((node, "fp16" if ("FP16" in flags or graph_type == "fp16") else "fp32"))
    return out


class EngineInspector:
    def __init__(self, engine: "ICudaEngine") -> None:
        self.engine = engine

    def get_engine_information(self, fmt: LayerInformationFormat) -> str:
        assert fmt == LayerInformationFormat.JSON
        layers = []
        for node, precision in _node_precisions(self.engine.model, self.engine.plan):
            if SHAPE.major >= 11:
                tensor = {"Name": node.input[0] if node.input else "", "DataType": _DATATYPE_11[precision],
                          "Format": "Row major linear format (kLINEAR)"}
            else:
                tensor = {"Name": node.input[0] if node.input else "", "Format/Datatype": _FORMAT_86[precision]}
            layers.append({"Name": node.name, "LayerType": node.op_type, "Inputs": [tensor]})
        if SHAPE.major >= 11:  # 11 replaced "Bindings" (names) by "I/O Tensors" (objects)
            io = [{"Name": n, "IOMode": "Input" if n in self.engine.input_names else "Output",
                   "DataType": "Float", "Location": "Device", "IsShapeInferenceIO": False} for n in self.engine.names]
            return json.dumps({"Layers": layers, "I/O Tensors": io})
        return json.dumps({"Layers": layers, "Bindings": list(self.engine.names)})


class ICudaEngine:
    def __init__(self, plan: Dict[str, Any]) -> None:
        import onnxruntime as ort

        self.plan = plan
        self.model = onnx.load(plan["onnx"])
        self.session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.names = self.input_names + self.output_names
        self.onnx_types = {i.name: i.type for i in self.session.get_inputs()}
        self.out_types = {o.name: o.type for o in self.session.get_outputs()}
        self.onnx_shapes = {v.name: [d if isinstance(d, int) else -1 for d in v.shape]
                            for v in list(self.session.get_inputs()) + list(self.session.get_outputs())}
        if SHAPE.major >= 10:
            self.device_memory_size_v2 = 4096
        if SHAPE.major < 11:
            self.device_memory_size = 4096  # removed in 11
        self.num_optimization_profiles = max(1, len(plan["profiles"]))

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name in self.input_names else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        if name in self.plan["inputs"]:
            return DataType(self.plan["inputs"][name])
        return DataType.HALF if "float16" in self.out_types.get(name, "") else DataType.FLOAT

    def get_tensor_shape(self, name: str) -> Dims:
        return Dims(self.onnx_shapes[name])

    def get_tensor_profile_shape(self, name: str, profile: int) -> List[Dims]:
        return [Dims(s) for s in self.plan["profiles"][profile][name]]

    def is_shape_inference_io(self, name: str) -> bool:
        return False

    def create_execution_context(self) -> "IExecutionContext":
        return IExecutionContext(self)

    def create_engine_inspector(self) -> EngineInspector:
        return EngineInspector(self)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self.shapes: Dict[str, List[int]] = {}
        self.addresses: Dict[str, int] = {}
        self.profile = 0
        self.profiler: Optional["IProfiler"] = None

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profile = index
        return True

    def set_input_shape(self, name: str, shape: Any) -> bool:
        assert isinstance(shape, (Dims, list, tuple))  # pybind11 converts a list to Dims, as the real one does
        shape = Dims(list(shape))
        if self.engine.plan["profiles"]:
            lo, _, hi = self.engine.plan["profiles"][self.profile][name]
            if any(not (a <= s <= b) for a, s, b in zip(lo, shape, hi)):
                return False
        self.shapes[name] = list(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = int(ptr)
        return True

    def _feeds(self, zeros: bool) -> Dict[str, np.ndarray]:
        feeds = {}
        for name in self.engine.input_names:
            shape = self.shapes[name]
            dtype = _NP[self.engine.get_tensor_dtype(name)]
            if zeros:
                a = np.zeros(shape, dtype)
            else:
                nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                a = np.frombuffer(MEMORY.read(self.addresses[name], nbytes), dtype=dtype).reshape(shape)
            if "int64" in self.engine.onnx_types[name]:
                a = a.astype(np.int64)  # the engine took int32 where ONNX said int64
            feeds[name] = a
        return feeds

    def get_tensor_shape(self, name: str) -> Dims:
        if name in self.engine.input_names:
            return Dims(self.shapes[name])
        outs = self.engine.session.run([name], self._feeds(zeros=True))
        return Dims(list(outs[0].shape))

    def execute_async_v3(self, stream_handle: int) -> bool:
        assert isinstance(stream_handle, int), f"execute_async_v3 takes an int stream handle, got {type(stream_handle)}"
        outs = self.engine.session.run(self.engine.output_names, self._feeds(zeros=False))
        for name, value in zip(self.engine.output_names, outs):
            dtype = _NP[self.engine.get_tensor_dtype(name)]
            MEMORY.write(self.addresses[name], np.ascontiguousarray(value.astype(dtype)).tobytes())
        GPU_CLOCK["ms"] += GPU_CLOCK["launch_ms"]
        if self.profiler is not None:  # as TensorRT does with enqueue_emits_profile (its default)
            nodes = list(self.engine.model.graph.node)
            for node in nodes:
                self.profiler.report_layer_time(node.name, GPU_CLOCK["launch_ms"] / len(nodes))
        return True


class IProfiler:
    """TEST DOUBLE of tensorrt.IProfiler: subclasses override report_layer_time."""

    def __init__(self) -> None:
        pass

    def report_layer_time(self, layer_name: str, ms: float) -> None:
        raise NotImplementedError


class Runtime:
    def __init__(self, logger: ILogger) -> None:
        self.logger = logger
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, data: Any) -> Optional[ICudaEngine]:
        raw = bytes(data)
        if not raw.startswith(PLAN_HEADER):
            return None
        plan = json.loads(raw[len(PLAN_HEADER):].decode())
        if plan.get("trt", SHAPE.version) != SHAPE.version:
            self.logger.log(_Severity.ERROR, f"The engine plan file is not compatible with this version of TensorRT "
                                             f"(built by {plan['trt']}, this is {SHAPE.version}).")
            return None
        return ICudaEngine(plan)


class IInt8EntropyCalibrator2:
    def __init__(self) -> None:
        pass


VERSIONS = {8: "8.6.0", 10: "10.13.0", 11: "11.1.0"}
_PLAIN = ("MemoryPoolType", "HardwareCompatibilityLevel", "LayerInformationFormat", "ProfilingVerbosity",
          "TensorIOMode", "DataType", "ErrorCode")


def _tensorrt(version: str) -> types.ModuleType:
    global BuilderFlag, NetworkDefinitionCreationFlag
    major = int(version.split(".")[0])
    SHAPE.major, SHAPE.version = major, version
    BuilderFlag, NetworkDefinitionCreationFlag = _builder_flags(major), _network_flags(major)
    m = types.ModuleType("tensorrt")
    m.__doc__ = f"TEST DOUBLE of tensorrt {version} (tests/tasks/gpu/trt_double.py)"
    m.__version__ = version
    for name in ("ILogger", "Dims", "ITensor", "INetworkDefinition", "OnnxParser", "IOptimizationProfile",
                 "ITimingCache", "Builder", "EngineInspector", "IExecutionContext", "Runtime", "IProfiler"):
        setattr(m, name, globals()[name])
    m.ParserError = ParserError if major < 10 else _ParserError10
    m.IBuilderConfig = IBuilderConfig if major < 11 else _BuilderConfig11Class
    m.ICudaEngine = type("ICudaEngine", (ICudaEngine,), {"device_memory_size_v2": 0} if major >= 10 else {})
    for name in _PLAIN:
        setattr(m, name, globals()[name])
    m.BuilderFlag, m.NetworkDefinitionCreationFlag = BuilderFlag, NetworkDefinitionCreationFlag
    if major < 10:
        m.DataType = enum.IntEnum("DataType", "FLOAT HALF INT8 INT32 BOOL UINT8 FP8", start=0)
    m.nptype = nptype
    if major < 11:
        m.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
    return m


def _install_pycuda(monkeypatch: Any) -> None:
    driver = _pycuda_driver()
    pycuda = types.ModuleType("pycuda")
    pycuda.__doc__ = "TEST DOUBLE of pycuda"
    pycuda.driver = driver
    autoprimaryctx = types.ModuleType("pycuda.autoprimaryctx")
    autoprimaryctx.__doc__ = "TEST DOUBLE: the real one pushes the primary CUDA context"
    pycuda.autoprimaryctx = autoprimaryctx
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    monkeypatch.setitem(sys.modules, "pycuda.autoprimaryctx", autoprimaryctx)


def _install_cuda_python(monkeypatch: Any) -> types.ModuleType:
    cudart = _cudart()
    cuda = types.ModuleType("cuda")
    cuda.__doc__ = "TEST DOUBLE of cuda-python 12.x (from cuda import cudart)"
    cuda.cudart = cudart
    cuda.__path__ = []  # a package, so "from cuda import cudart" and "import cuda.bindings" behave as for the real one
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.cudart", cudart)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # the 12.6+/13 layout is absent: 12.x's old layout is used
    return cudart


def install(monkeypatch: Any, version: str = "8.6.0", cuda: str = "pycuda", force: Optional[str] = None) -> types.ModuleType:
    """Put the doubles in ``sys.modules`` (undone by monkeypatch); returns the tensorrt double.

    Args:
        version: the TensorRT the double is shaped like ("8.6.0", "10.13.0", "11.1.0", or VERSIONS[major]).
        cuda: "pycuda", "cuda-python" or "both": which CUDA bindings import (the others do not).
        force: TRTFLOW_CUDA for the test (None: unset, so the backend follows what imports).
    """
    trt = _tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    if force is None:
        monkeypatch.delenv("TRTFLOW_CUDA", raising=False)
    else:
        monkeypatch.setenv("TRTFLOW_CUDA", force)
    if cuda in ("pycuda", "both"):
        _install_pycuda(monkeypatch)
    else:
        for name in ("pycuda", "pycuda.driver", "pycuda.autoprimaryctx"):
            monkeypatch.setitem(sys.modules, name, None)
    if cuda in ("cuda-python", "both"):
        _install_cuda_python(monkeypatch)
    else:
        # cuda-python is optional in tasks/gpu; make sure a real one does not try to reach a GPU here.
        monkeypatch.setitem(sys.modules, "cuda", None)
    from tasks.gpu import cuda_backend

    monkeypatch.setattr(cuda_backend, "_CHOSEN", [])  # each test chooses afresh from what imports
    return trt
