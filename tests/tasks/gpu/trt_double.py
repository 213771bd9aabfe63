"""TEST DOUBLES of the ``tensorrt`` (8.6-shaped) and ``pycuda.driver`` modules, for CPU tests of
tasks/gpu's glue: request -> parse -> profiles -> config -> (calibrator) -> build -> plan file ->
inspector JSON -> runner -> eval outputs -> benchmark -> response.

Nothing here is TensorRT. The "engine" is the ONNX model run by onnxruntime; "device memory" is a
dict of bytearrays behind fake pointers. Names and signatures follow TensorRT 8.6's Python API (read
from its bindings) so the glue calls what the real module has; numerical behaviour is onnxruntime's.
``install(monkeypatch)`` puts both doubles into ``sys.modules``.
"""
from __future__ import annotations

import enum
import json
import sys
import types
from pathlib import Path
from typing import Any, Dict, List, Optional

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
    clock = 0.0

    def record(self, stream: Any = None) -> None:
        Event.clock += 0.25
        self.t = Event.clock

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


BuilderFlag = enum.IntEnum("BuilderFlag", "FP16 INT8 DEBUG GPU_FALLBACK REFIT DISABLE_TIMING_CACHE TF32 SPARSE_WEIGHTS "
                                          "VERSION_COMPATIBLE EXCLUDE_LEAN_RUNTIME FP8", start=0)
NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", "EXPLICIT_BATCH EXPLICIT_PRECISION", start=0)
MemoryPoolType = enum.IntEnum("MemoryPoolType", "WORKSPACE DLA_MANAGED_SRAM", start=0)
HardwareCompatibilityLevel = enum.IntEnum("HardwareCompatibilityLevel", "NONE AMPERE_PLUS", start=0)
LayerInformationFormat = enum.IntEnum("LayerInformationFormat", "ONELINE JSON", start=0)
ProfilingVerbosity = enum.IntEnum("ProfilingVerbosity", "LAYER_NAMES_ONLY NONE DETAILED", start=0)
TensorIOMode = enum.IntEnum("TensorIOMode", "NONE INPUT OUTPUT", start=0)
DataType = enum.IntEnum("DataType", "FLOAT HALF INT8 INT32 BOOL UINT8 FP8", start=0)
ErrorCode = enum.IntEnum("ErrorCode", "SUCCESS INTERNAL_ERROR MEM_ALLOC_FAILED MODEL_DESERIALIZE_FAILED INVALID_VALUE "
                                      "INVALID_GRAPH INVALID_NODE UNSUPPORTED_GRAPH UNSUPPORTED_NODE", start=0)
_ONNX_TO_TRT = {onnx.TensorProto.FLOAT: DataType.FLOAT, onnx.TensorProto.FLOAT16: DataType.HALF,
                onnx.TensorProto.INT64: DataType.INT32, onnx.TensorProto.INT32: DataType.INT32,
                onnx.TensorProto.BOOL: DataType.BOOL, onnx.TensorProto.INT8: DataType.INT8,
                onnx.TensorProto.UINT8: DataType.UINT8}
_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
       DataType.BOOL: np.bool_, DataType.UINT8: np.uint8}


def nptype(dtype: DataType) -> type:
    return _NP[dtype]


class Dims(tuple):
    def __new__(cls, shape: Optional[List[int]] = None):
        return super().__new__(cls, [int(d) for d in (shape or [])])


class ITensor:
    def __init__(self, name: str, shape: List[int], dtype: DataType) -> None:
        self.name, self.shape, self.dtype, self.is_shape_tensor = name, Dims(shape), dtype, False


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: List[ITensor] = []
        self.onnx_path: Optional[str] = None

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> ITensor:
        return self.inputs[i]


class ParserError:
    def __init__(self, desc: str, node: int) -> None:
        self._desc, self._node = desc, node

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
                # 8.6 reports the node index only; the name must come from the graph.
                self.errors.append(ParserError(f"In node {index} (importFallbackPluginImporter): UNSUPPORTED_NODE: "
                                               f"Assertion failed: creator && \"Plugin not found\"", index))
                self.logger.log(_Severity.ERROR, f"ModelImporter: failed to import node {index}")
                return False
        init = {i.name for i in model.graph.initializer}
        for vi in model.graph.input:
            if vi.name in init:
                continue
            t = vi.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            self.network.inputs.append(ITensor(vi.name, shape, _ONNX_TO_TRT[t.elem_type]))
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
        self.flags_set: List[BuilderFlag] = []
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

    def set_flag(self, flag: BuilderFlag) -> None:
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


class Builder:
    crash_on_build = False

    def __init__(self, logger: ILogger) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        assert flags & (1 << int(NetworkDefinitionCreationFlag.EXPLICIT_BATCH)), "8.6 ONNX networks need EXPLICIT_BATCH"
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> Optional[bytes]:
        dynamic = any(d < 0 for t in network.inputs for d in t.shape)
        if dynamic and not config.profiles:
            self.logger.log(_Severity.ERROR, "Network has dynamic or shape inputs, but no optimization profile has been defined.")
            return None
        calibrated = None
        calib = config.int8_calibrator
        if calib is not None:
            assert BuilderFlag.INT8 in config.flags_set
            assert calib.get_batch_size() == 1
            cache = calib.read_calibration_cache()
            if cache:
                calibrated = "cache"
            else:
                names = [t.name for t in network.inputs]
                batches = 0
                while True:
                    ptrs = calib.get_batch(names)
                    if not ptrs:
                        break
                    assert len(ptrs) == len(names)
                    batches += 1
                if not batches:
                    self.logger.log(_Severity.ERROR, "Calibration failure occurred with no scaling factors detected.")
                    return None
                calib.write_calibration_cache(memoryview(b"TRT-8600-EntropyCalibration2\nimages: 3c010a14\n"))
                calibrated = f"{batches} batches"
        shapes = [{n: s for n, s in p.shapes.items()} for p in config.profiles]
        if config.timing_cache is not None:
            config.timing_cache.entries.add(f"{Path(network.onnx_path).name}:{sorted(int(f) for f in config.flags_set)}")
        plan = {"onnx": network.onnx_path, "profiles": shapes, "flags": [f.name for f in config.flags_set],
                "inputs": {t.name: int(t.dtype) for t in network.inputs}, "calibrated": calibrated,
                "verbosity": int(config.profiling_verbosity)}
        return PLAN_HEADER + json.dumps(plan).encode()


class EngineInspector:
    def __init__(self, engine: "ICudaEngine") -> None:
        self.engine = engine

    def get_engine_information(self, fmt: LayerInformationFormat) -> str:
        assert fmt == LayerInformationFormat.JSON
        fmt_text = "Thirty-two wide channel vectorized row major Int8 format" if "INT8" in self.engine.plan["flags"] \
            else "Row major linear FP32"
        layers = [{"Name": n.name, "LayerType": n.op_type, "Inputs": [{"Name": i, "Format/Datatype": fmt_text}
                                                                      for i in n.input[:1]]}
                  for n in self.engine.model.graph.node]
        return json.dumps({"Layers": layers, "Bindings": [t for t in self.engine.names]})


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
        self.onnx_shapes = {v.name: [d if isinstance(d, int) else -1 for d in v.shape]
                            for v in list(self.session.get_inputs()) + list(self.session.get_outputs())}
        self.device_memory_size = 4096
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
        return DataType.FLOAT

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

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profile = index
        return True

    def set_input_shape(self, name: str, shape: Dims) -> bool:
        assert isinstance(shape, Dims)
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
        outs = self.engine.session.run(self.engine.output_names, self._feeds(zeros=False))
        for name, value in zip(self.engine.output_names, outs):
            MEMORY.write(self.addresses[name], np.ascontiguousarray(value.astype(np.float32)).tobytes())
        return True


class Runtime:
    def __init__(self, logger: ILogger) -> None:
        self.logger = logger
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, data: Any) -> Optional[ICudaEngine]:
        raw = bytes(data)
        if not raw.startswith(PLAN_HEADER):
            return None
        return ICudaEngine(json.loads(raw[len(PLAN_HEADER):].decode()))


class IInt8EntropyCalibrator2:
    def __init__(self) -> None:
        pass


def _tensorrt() -> types.ModuleType:
    m = types.ModuleType("tensorrt")
    m.__doc__ = "TEST DOUBLE of tensorrt 8.6 (tests/tasks/gpu/trt_double.py)"
    m.__version__ = "8.6.0"
    for name, value in list(globals().items()):
        if isinstance(value, type) and not name.startswith("_") and value.__module__ == __name__:
            setattr(m, name, value)
    for name in ("BuilderFlag", "NetworkDefinitionCreationFlag", "MemoryPoolType", "HardwareCompatibilityLevel",
                 "LayerInformationFormat", "ProfilingVerbosity", "TensorIOMode", "DataType", "ErrorCode"):
        setattr(m, name, globals()[name])
    m.nptype = nptype
    m.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
    return m


def install(monkeypatch: Any) -> types.ModuleType:
    """Put the doubles in ``sys.modules`` (undone by monkeypatch); returns the tensorrt double."""
    trt = _tensorrt()
    driver = _pycuda_driver()
    pycuda = types.ModuleType("pycuda")
    pycuda.__doc__ = "TEST DOUBLE of pycuda"
    pycuda.driver = driver
    autoprimaryctx = types.ModuleType("pycuda.autoprimaryctx")
    autoprimaryctx.__doc__ = "TEST DOUBLE: the real one pushes the primary CUDA context"
    pycuda.autoprimaryctx = autoprimaryctx
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    monkeypatch.setitem(sys.modules, "pycuda.autoprimaryctx", autoprimaryctx)
    # cuda-python is optional in tasks/gpu; make sure a real one does not try to reach a GPU here.
    monkeypatch.setitem(sys.modules, "cuda", None)
    return trt
