"""ONNX -> serialized TensorRT engine, with the timing cache, implicit calibrator and engine inspector.

``engine_from_onnx(request)`` is the build half of the ``engine`` verb (tasks/gpu/__main__.py holds
the request's fields). ``build_engine`` does the same and also hands back the deserialized engine,
so the same process can run the eval inputs and the benchmark without loading it twice.

tensorrt is imported inside the functions that need it: ``resolve_profiles`` and
``layer_precisions`` are pure and unit-tested on CPU. Python 3.9-compatible.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

from tasks.errors import InfraError, ModelError
from tasks.fixes import PARSER_REJECTED, fix_for_build_failure, fix_for_parser_details
from tasks.gpu import compat
from tasks.shapes import default_batch_range

log = logging.getLogger("trtflow.gpu.build")

TRT_PYTHON_FIX = ("Set TRT_PYTHON to an interpreter with tensorrt and pycuda (pip install 'trtflow[gpu]' on a GPU "
                  "worker, or /opt/trt/bin/trt-python), see README 'GPU worker'")

# TensorRT log lines that mean the GPU or its memory failed, not the model.
_CUDA_TROUBLE = re.compile(r"out of memory|could not be allocated|OutOfMemory|CUDA_ERROR|cudaError|Cuda Runtime|"
                           r"Cuda Driver|illegal memory access|CUDA initialization failure", re.IGNORECASE)
_OOM = re.compile(r"out of memory|could not be allocated|OutOfMemory|CUDA_ERROR_OUT_OF_MEMORY|"
                  r"cudaErrorMemoryAllocation", re.IGNORECASE)


# ---- TensorRT import and logger ------------------------------------------------------------------

def import_tensorrt() -> Any:
    """``import tensorrt``, or an InfraError that names this interpreter and how to fix it."""
    import sys

    try:
        import tensorrt as trt  # noqa: WPS433 - only the GPU interpreter has it
    except Exception as err:  # ImportError, or an OSError from a missing libnvinfer
        raise InfraError(f"TensorRT cannot be imported in {sys.executable} ({type(err).__name__}: {err})",
                         fix=TRT_PYTHON_FIX, retriable=False) from None  # a retry meets the same interpreter
    return trt


def make_logger(trt: Any, verbose: bool = False) -> Any:
    """A ``trt.ILogger`` that forwards TensorRT's messages to ``logging`` (WARNING and up, or all
    with ``verbose``) and keeps the last errors for error reports (``.errors``)."""

    class _ForwardingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # pybind11 trampolines crash without the explicit base init
            sev = trt.ILogger.Severity
            self.min_severity = int(sev.VERBOSE if verbose else sev.WARNING)
            self.errors: Deque[str] = collections.deque(maxlen=30)
            self.warnings: Deque[str] = collections.deque(maxlen=30)
            self._levels = {int(sev.INTERNAL_ERROR): logging.CRITICAL, int(sev.ERROR): logging.ERROR,
                            int(sev.WARNING): logging.WARNING, int(sev.INFO): logging.INFO,
                            int(sev.VERBOSE): logging.DEBUG}
            self._trt_log = logging.getLogger("tensorrt")

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
            elif level == int(trt.ILogger.Severity.WARNING):
                self.warnings.append(str(msg))
            if level <= self.min_severity:
                self._trt_log.log(self._levels.get(level, logging.INFO), "%s", msg)

    return _ForwardingLogger()


def create_builder(trt: Any, logger: Any) -> Any:
    """``trt.Builder``; an InfraError (CUDA unavailable) instead of pybind11's TypeError."""
    try:
        builder = trt.Builder(logger)
    except TypeError as err:  # "factory function returned nullptr": CUDA init failed
        raise InfraError(f"TensorRT could not create a builder ({err}); is a CUDA GPU visible?",
                         fix="Run on a GPU worker; check CUDA_VISIBLE_DEVICES and the NVIDIA driver (nvidia-smi).",
                         details=list(getattr(logger, "errors", [])) + list(getattr(logger, "warnings", []))) from None
    if builder is None:
        raise InfraError("TensorRT could not create a builder.", fix="Check the GPU worker's CUDA setup (nvidia-smi).")
    return builder


# ---- pure helpers --------------------------------------------------------------------------------

def resolve_profiles(inputs: Sequence[Dict[str, Any]], requested: Optional[Sequence[Dict[str, Any]]],
                     default_opt_batch: int = 8, default_max_batch: int = 32) -> List[Dict[str, Dict[str, List[int]]]]:
    """Complete min/opt/max shapes for every network input of every optimisation profile.

    Args:
        inputs: ``[{"name": str, "shape": [int, ...]}]`` with -1 for dynamic dims (the network's view).
        requested: the request's profiles (input name -> {"min","opt","max"}); empty -> one default profile.
        default_opt_batch, default_max_batch: the default range of a dynamic dim 0 (min is 1).

    Returns:
        One dict per profile, input name -> {"min","opt","max"} for every input (static ones too).
        A dynamic batch dim an input's profile does not give follows the batch range of the
        profile's other inputs (so all inputs agree on the batch), else the default.

    Raises:
        ModelError: unknown input, wrong rank, a static dim contradicted, min <= opt <= max violated,
            or a dynamic dim other than dim 0 without a profile.
    """
    names = [str(i["name"]) for i in inputs]
    profiles = [dict(p) for p in (requested or [])] or [{}]
    default_batch = default_batch_range(default_opt_batch, default_max_batch)
    out: List[Dict[str, Dict[str, List[int]]]] = []
    for index, profile in enumerate(profiles):
        unknown = sorted(set(profile) - set(names))
        if unknown:
            raise ModelError(f"profile {index} names {', '.join(unknown)}, which the network has no input called.",
                             fix=f"Use the model's input names in trtflow.yaml profiles: {', '.join(names)}.")
        given = {str(i["name"]): _check_range(index, str(i["name"]), [int(d) for d in i["shape"]], profile[i["name"]])
                 for i in inputs if i["name"] in profile}
        batch: Optional[Tuple[int, int, int]] = None
        for inp in inputs:
            rng = given.get(str(inp["name"]))
            if rng and inp["shape"] and int(inp["shape"][0]) < 0:
                batch = (rng["min"][0], rng["opt"][0], rng["max"][0])
                break
        resolved: Dict[str, Dict[str, List[int]]] = {}
        for inp in inputs:
            name = str(inp["name"])
            shape = [int(d) for d in inp["shape"]]
            if name in given:
                resolved[name] = given[name]
                continue
            dynamic = [axis for axis, d in enumerate(shape) if d < 0]
            if not dynamic:
                resolved[name] = {"min": list(shape), "opt": list(shape), "max": list(shape)}
                continue
            other = [axis for axis in dynamic if axis != 0]
            if other:
                raise ModelError(f"input {name!r} has dynamic dim {other[0]} (shape {shape}) and no optimisation "
                                 f"profile gives its range.",
                                 fix=f"add a profile for {name} in trtflow.yaml, e.g. profiles: [{{{name}: "
                                     f"{{min: [...], opt: [...], max: [...]}}}}]")
            lo, mid, hi = batch or default_batch
            resolved[name] = {"min": [lo] + shape[1:], "opt": [mid] + shape[1:], "max": [hi] + shape[1:]}
        out.append(resolved)
    return out


def _check_range(index: int, name: str, shape: List[int], rng: Dict[str, Any]) -> Dict[str, List[int]]:
    try:
        lo, mid, hi = ([int(d) for d in rng[k]] for k in ("min", "opt", "max"))
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"profile {index} for input {name!r} needs min, opt and max shapes, got {rng!r}.",
                         fix=f"Write {name}: {{min: [...], opt: [...], max: [...]}} in trtflow.yaml.") from None
    if not (len(lo) == len(mid) == len(hi) == len(shape)):
        raise ModelError(f"profile {index} gives input {name!r} ranks {len(lo)}/{len(mid)}/{len(hi)}; the network "
                         f"input has rank {len(shape)} ({shape}).",
                         fix=f"Give {len(shape)} dims for {name} in min, opt and max.")
    for axis, d in enumerate(shape):
        if not (0 <= lo[axis] <= mid[axis] <= hi[axis]):
            raise ModelError(f"profile {index} for input {name!r} needs min <= opt <= max in dim {axis}, got "
                             f"{lo} / {mid} / {hi}.", fix="Order the shapes min <= opt <= max in trtflow.yaml.")
        if d >= 0 and not (lo[axis] == mid[axis] == hi[axis] == d):
            raise ModelError(f"profile {index} for input {name!r} sets dim {axis} to {lo[axis]}..{hi[axis]}, but the "
                             f"model fixes it at {d} (shape {shape}).",
                             fix=f"Use {d} for dim {axis} of {name}, or export the model with that dim dynamic.")
    return {"min": lo, "opt": mid, "max": hi}


_PRECISION_PATTERNS = [  # order matters: UINT8 before INT8, BF16 before FP16/FLOAT
    ("uint8", re.compile(r"UINT8")), ("int8", re.compile(r"INT8")), ("int4", re.compile(r"INT4")),
    ("fp8", re.compile(r"FP8|E4M3")), ("fp4", re.compile(r"FP4")), ("bf16", re.compile(r"BF16|BFLOAT")),
    ("fp16", re.compile(r"FP16|HALF")), ("fp32", re.compile(r"FP32|FLOAT")), ("int64", re.compile(r"INT64")),
    ("int32", re.compile(r"INT32")), ("bool", re.compile(r"BOOL")),
]


def _first_match(patterns: List[Tuple[str, Any]], text: Any) -> Optional[str]:
    if not isinstance(text, str) or not text:
        return None
    upper = text.upper()
    return next((name for name, pattern in patterns if pattern.search(upper)), None)


def _precision_of_text(text: Any) -> Optional[str]:
    return _first_match(_PRECISION_PATTERNS, text)


def _precision_of_tensor(tensor: Any) -> Optional[str]:
    if not isinstance(tensor, dict):
        return None
    # 8.6/10: "Format/Datatype": "Row major linear FP32"; 11: "DataType": "Float" (+ "Format").
    for key in ("DataType", "Datatype", "Format/Datatype", "Format"):
        found = _precision_of_text(tensor.get(key))
        if found:
            return found
    return None


_TACTIC_PATTERNS = [  # kernel names spell their input/output types: ..._i8i8_i8i32_f32_..., ..._f16f16_..., FP32FP32NCHW
    ("fp16", re.compile(r"F16F16|H16H16|FP16|HMMA")),
    ("fp32", re.compile(r"F32F32|FP32|FFMA|SGEMM")),
]
# INT8 kernels name their type in many spellings (measured and from TensorRT's kernel names):
# i8i8_i8i32, _i8_, int8, Int8, INT8INT8NCxHWx4, imma (integer MMA), cutlass ..._s8_... / i8816fprop.
# Matched on word pieces (split at "_" and other separators) so "i8" inside e.g. "sm90" never counts;
# checked before any float pattern because INT8 kernels also name their f32 scale/accumulator type.
_INT8_PIECE = re.compile(r"^(?:[a-z]*int8.*|i8.*|s8|.*i8i8.*|.*imma.*)$")


def _int8_in_name(name: Any) -> bool:
    if not isinstance(name, str) or not name:
        return False
    return any(_INT8_PIECE.match(piece) for piece in re.split(r"[^a-z0-9]+", name.lower()) if piece)


def _precision_of_tactic(name: Any) -> Optional[str]:
    """Precision from the kernel (tactic) name: with dynamic shapes TensorRT 8.6's inspector reports
    tensor formats as 'N/A due to dynamic shapes' (measured on the H100), the tactic name still tells."""
    if _int8_in_name(name):
        return "int8"
    return _first_match(_TACTIC_PATTERNS, name)


def _layer_tensors(layer: Dict[str, Any]) -> List[Any]:
    return list(layer.get("Inputs") or []) + list(layer.get("Outputs") or [])


def _layer_precision(layer: Any) -> str:
    """One layer's precision; "unknown" only when nothing in it names a type.

    Order: the version's explicit "Precision"; INT8 named anywhere (tactic, layer name, any tensor
    format: an INT8 kernel often reads an FP32 input, so "first input" alone hid INT8 layers); the
    first input's, then first output's type; then the tactic's float type.
    """
    if not isinstance(layer, dict):
        return "unknown"
    explicit = _precision_of_text(layer.get("Precision"))
    if explicit:
        return explicit
    tactic = layer.get("TacticName")
    if _int8_in_name(tactic) or _int8_in_name(layer.get("Name")) or any(
            _precision_of_tensor(t) == "int8" for t in _layer_tensors(layer)):
        return "int8"
    for key in ("Inputs", "Outputs"):
        for tensor in layer.get(key) or []:
            found = _precision_of_tensor(tensor)
            if found:
                return found
    return _precision_of_tactic(tactic) or "unknown"


def _inspector_layers(info: Any) -> List[Any]:
    if isinstance(info, (str, bytes)):
        try:
            info = json.loads(info, strict=False)
        except ValueError:
            return []
    layers = info.get("Layers", []) if isinstance(info, dict) else info
    return list(layers or [])


def layer_table(info: Any) -> List[Dict[str, Any]]:
    """Per layer of the engine inspector's JSON: name, type, precision and tactic name."""
    rows = []
    for layer in _inspector_layers(info):
        is_dict = isinstance(layer, dict)
        rows.append({"name": str(layer.get("Name", "")) if is_dict else str(layer),
                     "type": str(layer.get("LayerType", "")) if is_dict else "",
                     "precision": _layer_precision(layer),
                     "tactic": str(layer.get("TacticName", "")) if is_dict else ""})
    return rows


def layer_precisions(info: Any) -> Dict[str, int]:
    """Count the engine's layers by precision from the engine inspector's JSON (see ``_layer_precision``).

    Layers without details (built without DETAILED profiling verbosity) count as "unknown".
    """
    counts: Dict[str, int] = {}
    for row in layer_table(info):
        counts[row["precision"]] = counts.get(row["precision"], 0) + 1
    return counts


def int8_layer_note(precision: str, int8_mode: Optional[str], precisions: Dict[str, int]) -> Optional[str]:
    """What to tell the user when an INT8 engine runs no layer in INT8 although every layer's precision
    was read. With the implicit calibrator TensorRT times INT8 against FP16/FP32 kernels per layer and
    keeps the fastest: on small layers (few channels, small images) those are float kernels, and the
    engine is then correct but no faster than FP16. Q/DQ nodes pin INT8 where they sit."""
    if precision != "int8" or not precisions or precisions.get("int8") or precisions.get("unknown", 0) >= sum(
            precisions.values()):
        return None
    floats = ", ".join(f"{n} {precisions[n]}" for n in ("fp16", "fp32") if precisions.get(n))
    how = ("TensorRT found its float kernels faster than INT8 for every layer (typical of small layers)"
           if int8_mode == "calibrator" else "TensorRT ran every layer in a float type")
    return (f"no layer of this INT8 engine runs in INT8 ({floats}): {how}; the engine is correct but gives no "
            f"INT8 speed-up. Q/DQ (calibration.mode: qdq) pins INT8 at its nodes; or build fp16 instead.")


def unknown_layers(info: Any, limit: int = 20) -> List[Dict[str, str]]:
    """The layers counted "unknown", with their tactic names: what to read when a precision is missing."""
    return [{"name": r["name"], "type": r["type"], "tactic": r["tactic"]}
            for r in layer_table(info) if r["precision"] == "unknown"][:limit]


def onnx_node_table(onnx_path: str) -> Tuple[List[str], List[str]]:
    """Names and op types of the ONNX graph's nodes, by index (TensorRT 8.6 parser errors give only the index)."""
    try:
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - only used to enrich a parser error
        log.debug("cannot read node names from %s: %s", onnx_path, err)
        return [], []
    return [n.name or f"<unnamed {n.op_type} #{i}>" for i, n in enumerate(model.graph.node)], \
           [n.op_type for n in model.graph.node]


def _tensor_inputs(network: Any) -> List[Dict[str, Any]]:
    out = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        out.append({"name": t.name, "shape": [int(d) for d in t.shape], "dtype": t.dtype,
                    "is_shape_tensor": bool(getattr(t, "is_shape_tensor", False))})
    return out


def _write_atomic(path: Path, data: Any) -> int:
    """Write bytes-like ``data`` to ``path`` via a temporary file; returns the byte count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    view = memoryview(data)
    with open(tmp, "wb") as f:
        f.write(view)
    os.replace(tmp, path)
    return int(view.nbytes)


# ---- the build ------------------------------------------------------------------------------------

@dataclass
class BuildResult:
    """The build half of an ``engine`` response, plus the live engine for eval and bench."""

    response: Dict[str, Any]
    engine: Any = None
    runtime: Any = None
    plan: Optional[compat.BuildPlan] = None
    profiles: List[Dict[str, Dict[str, List[int]]]] = field(default_factory=list)


def report_phase(text: str) -> None:
    """One progress line for the parent's heartbeat (tasks/gpu_client.py reads the newest)."""
    log.info("%s %s", compat.PHASE_PREFIX, text)


def _build_failure(logger: Any, what: str, caps: Optional[compat.Caps] = None, precision: str = "") -> Exception:
    errors = list(getattr(logger, "errors", []))
    text = "\n".join(errors)
    if _OOM.search(text):
        return InfraError(f"CUDA ran out of memory while {what}.",
                          fix="Retry on a GPU with more free memory, or lower build.workspace_mib or the profiles' max shapes.",
                          details=errors[-10:])
    if _CUDA_TROUBLE.search(text):
        return InfraError(f"a CUDA error stopped TensorRT while {what}.",
                          fix="Retry (another worker if it repeats); see build.log for the CUDA error.", details=errors[-10:])
    last = errors[-1] if errors else "no error was logged"
    matched = fix_for_build_failure(errors, caps.version if caps else "", precision)
    return ModelError(f"TensorRT failed while {what}: {last} (limit: {matched.limit})", fix=matched.fix,
                      details=errors[-10:] + [{"fix": matched.to_dict()}])


def _plan(caps: compat.Caps, request: Dict[str, Any]) -> compat.BuildPlan:
    precision = str(request.get("precision") or "fp32")
    plan = compat.plan_build(caps, precision, request.get("int8_mode"), request.get("graph_precision") or "fp32",
                             request.get("typing"))
    for note in plan.notes + plan.deprecations:
        log.warning("%s", note)
    if plan.needs_fp16_graph:
        raise ModelError(f"TensorRT {caps.version} builds FP16 engines only from an FP16 ONNX graph (strongly typed), "
                         f"and this request gave an FP32 graph.",
                         fix="Convert the model to FP16 first (NVIDIA ModelOpt AutoCast, or trtflow's FP16 conversion) "
                             "and send it with graph_precision: fp16.")
    log.info("TensorRT %s: %s", caps.version, compat.describe_plan(plan))
    return plan


def _parse(trt: Any, builder: Any, logger: Any, caps: compat.Caps, plan: compat.BuildPlan,
           onnx_path: Path, parser_flags: Sequence[str] = ()) -> Tuple[Any, Any]:
    """(network, parser): the parser must live as long as the network it filled."""
    network = builder.create_network(compat.network_flags_value(trt, plan.network_flags))
    parser = trt.OnnxParser(network, logger)
    for name in parser_flags:
        parser.set_flag(getattr(trt.OnnxParserFlag, name))
    # parse_from_file (not parse(bytes)) so weights in external data files resolve beside the model.
    if not parser.parse_from_file(str(onnx_path)):
        names, ops = onnx_node_table(str(onnx_path))
        errors = compat.parser_error_details(parser, caps, names, ops)
        first = errors[0] if errors else {"desc": "no parser error recorded", "node_index": -1}
        if first.get("node_index", -1) >= 0 or first.get("node_name"):
            where = f"node {first.get('node_name') or '?'!r} ({first.get('node_op') or '?'}, #{first.get('node_index', -1)})"
        else:
            where = "the model level (no node)"
        matched = fix_for_parser_details(errors, list(logger.errors), caps.version)
        raise ModelError(f"TensorRT {caps.version}'s {PARSER_REJECTED} the model at {where}: {first.get('desc')} "
                         f"(limit: {matched.limit})", fix=matched.fix,
                         details=([_describe_parser_error(e) for e in errors] or list(logger.errors))
                         + [{"fix": matched.to_dict()}])
    return network, parser


def _network_profiles(network: Any, request: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]], bool]:
    """(inputs, resolved profiles, whether any input is dynamic)."""
    inputs = _tensor_inputs(network)
    shape_tensors = [i["name"] for i in inputs if i["is_shape_tensor"]]
    if shape_tensors:
        raise ModelError(f"inputs {', '.join(shape_tensors)} are shape tensors, which trtflow cannot feed yet.",
                         fix="Export the model with those values as constants or ordinary tensors.")
    profiles = resolve_profiles(inputs, request.get("profiles") or [],
                                int(request.get("default_opt_batch") or 8), int(request.get("default_max_batch") or 32))
    return inputs, profiles, any(d < 0 for i in inputs for d in i["shape"])


def _configure(trt: Any, builder: Any, logger: Any, caps: compat.Caps, plan: compat.BuildPlan,
               request: Dict[str, Any], profiles: List[Dict[str, Any]], dynamic: bool) -> Tuple[Any, List[str], List[Any]]:
    """(builder config, builder flags set, TensorRT optimisation profiles added)."""
    config = builder.create_builder_config()
    compat.set_workspace(trt, config, caps, request.get("workspace_mib"))
    compat.set_optimization_level(config, caps, request.get("optimization_level"))
    compat.set_hardware_compatibility(trt, config, caps, request.get("hardware_compatibility"))
    flags = list(plan.builder_flags) + compat.version_compatible_flags(caps, bool(request.get("version_compatible")))
    for name in flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if hasattr(trt, "ProfilingVerbosity"):
        # DETAILED makes the inspector report each layer's tensors and formats (hence its precision).
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    trt_profiles = []
    if dynamic:
        for index, profile in enumerate(profiles):
            p = builder.create_optimization_profile()
            for name, rng in profile.items():
                p.set_shape(name, trt.Dims(rng["min"]), trt.Dims(rng["opt"]), trt.Dims(rng["max"]))
            if config.add_optimization_profile(p) < 0:
                raise _build_failure(logger, f"adding optimisation profile {index} ({profile})")
            trt_profiles.append(p)
    return config, flags, trt_profiles


def _attach_calibrator(trt: Any, config: Any, request: Dict[str, Any], inputs: List[Dict[str, Any]],
                       profiles: List[Dict[str, Any]], trt_profiles: List[Any]) -> Any:
    from tasks.gpu.calibrator import make_calibrator

    input_dtypes = {i["name"]: _np_dtype(trt, i["dtype"]) for i in inputs}
    calibrator = make_calibrator(trt, request.get("calibration") or {}, profiles[0], input_dtypes)
    config.int8_calibrator = calibrator
    if trt_profiles:
        config.set_calibration_profile(trt_profiles[0])
    return calibrator


def _inspect_layers(trt: Any, engine: Any, caps: compat.Caps, profiles: List[Dict[str, Any]],
                    out_dir: Path) -> Dict[str, Any]:
    """layers.json beside the plan and the response's ``layers``: counts by precision, unknown layers."""
    opt = {n: r["opt"] for n, r in (profiles[0] if profiles else {}).items()}
    info = compat.engine_information_json(trt, engine, caps, opt)
    if not info:
        return {"path": None, "precisions": {}, "count": 0, "unknown": []}
    try:
        # TensorRT 8.6 writes raw control characters (ONNX layer metadata separators) inside
        # strings; parse leniently and store strict JSON so that any reader can load it.
        info = json.dumps(json.loads(info, strict=False), indent=1)
    except ValueError:
        pass
    layers_path = out_dir / "layers.json"
    layers_path.write_text(info)
    precisions = layer_precisions(info)
    return {"path": str(layers_path), "precisions": precisions, "count": sum(precisions.values()),
            "unknown": unknown_layers(info)}


def _deserialize(trt: Any, logger: Any, request: Dict[str, Any], view: Any) -> Tuple[Any, Any]:
    runtime = trt.Runtime(logger)
    if request.get("version_compatible") and hasattr(runtime, "engine_host_code_allowed"):
        runtime.engine_host_code_allowed = True  # version-compatible plans embed the lean runtime
    engine = runtime.deserialize_cuda_engine(view)
    if engine is None:
        raise _build_failure(logger, "deserializing the engine just built")
    return runtime, engine


def build_engine(request: Dict[str, Any], trt: Any = None, logger: Any = None) -> BuildResult:
    """Build one engine as ``request`` says (see tasks/gpu/__main__.py) and deserialize it.

    Raises:
        ModelError: parser errors (one detail per error, with the ONNX node), impossible precision
            plans, bad profiles or calibration batches, a build TensorRT refuses.
        InfraError: no TensorRT/CUDA, CUDA out of memory or other CUDA errors, missing files.
    """
    trt = trt or import_tensorrt()
    logger = logger or make_logger(trt, bool(request.get("verbose")))
    caps = compat.caps_from_module(trt)
    plan = _plan(caps, request)
    onnx_path = Path(str(request["onnx_path"]))
    if not onnx_path.is_file():
        raise InfraError(f"the ONNX model {onnx_path} is not on the GPU worker.",
                         fix="The flow must download the model package before the engine step; retry.")
    out_dir = Path(str(request["out_dir"]))
    out_dir.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    compat.register_plugins(trt, logger)  # before parsing: plugin ops and InstanceNormalization import
    report_phase(f"parse {onnx_path.name}")
    builder = create_builder(trt, logger)
    network, parser = _parse(trt, builder, logger, caps, plan, onnx_path, compat.parser_flags(
        trt, request.get("hardware_compatibility"), bool(request.get("version_compatible"))))
    parse_seconds = time.monotonic() - started
    inputs, profiles, dynamic = _network_profiles(network, request)
    config, flags, trt_profiles = _configure(trt, builder, logger, caps, plan, request, profiles, dynamic)
    cache_loaded = _load_timing_cache(config, request.get("timing_cache_in"))
    calibrator = _attach_calibrator(trt, config, request, inputs, profiles, trt_profiles) if plan.use_calibrator else None

    log.info("building %s engine of %s (profiles %s)", plan.precision, onnx_path.name, profiles)
    report_phase(f"build {plan.precision}" + (" (calibrating)" if calibrator is not None else ""))
    monitor = compat.attach_progress_monitor(trt, config, report_phase)  # TensorRT >= 10: the builder's phases
    t0 = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    build_seconds = time.monotonic() - t0
    if calibrator is not None and calibrator.error is not None:
        raise calibrator.error
    if serialized is None:
        raise _build_failure(logger, f"building the {plan.precision} engine", caps, plan.precision)
    log.info("built in %.1f s", build_seconds)

    plan_path = out_dir / "model.plan"
    view = memoryview(serialized)
    nbytes, sha = _write_atomic(plan_path, view), hashlib.sha256(view).hexdigest()
    cache_saved = 0
    if request.get("timing_cache_out"):
        cache_saved = _write_atomic(Path(str(request["timing_cache_out"])), config.get_timing_cache().serialize())
        log.info("timing cache: loaded %d bytes, saved %d bytes", cache_loaded, cache_saved)
    runtime, engine = _deserialize(trt, logger, request, view)
    del serialized, view, trt_profiles, parser, network, config, builder, monitor  # free builder memory before eval/bench

    response: Dict[str, Any] = {
        "engine": {"path": str(plan_path), "bytes": nbytes, "sha256": sha, "build_seconds": round(build_seconds, 3),
                   "parse_seconds": round(parse_seconds, 3), "strongly_typed": plan.strongly_typed,
                   "builder_flags": flags, "network_flags": list(plan.network_flags), "profiles": profiles,
                   "typing": plan.typing, "deprecations": list(plan.deprecations),
                   "plan": plan.to_dict(), "io": engine_io(trt, engine)},
        "timing_cache": {"loaded_bytes": cache_loaded, "saved_bytes": cache_saved},
        "layers": _inspect_layers(trt, engine, caps, profiles, out_dir),
        "calibration": calibrator.summary() if calibrator is not None else None,
    }
    note = int8_layer_note(plan.precision, request.get("int8_mode"), response["layers"]["precisions"])
    if note:
        log.warning("%s", note)
        response["layers"]["note"] = note
    return BuildResult(response=response, engine=engine, runtime=runtime, plan=plan, profiles=profiles)


def engine_from_onnx(request: Dict[str, Any]) -> Dict[str, Any]:
    """Build the engine ``request`` describes; the build part of the ``engine`` response."""
    return build_engine(request).response


def _describe_parser_error(err: Dict[str, Any]) -> str:
    where = f"node #{err.get('node_index', -1)}"
    if err.get("node_name"):
        where += f" {err['node_name']!r}"
    if err.get("node_op"):
        where += f" ({err['node_op']})"
    code = f" [{err['code']}]" if err.get("code") else ""
    return f"{where}{code}: {err.get('desc', '')}"


def _np_dtype(trt: Any, dtype: Any) -> Any:
    from tasks.gpu.runtime import numpy_dtype

    return numpy_dtype(trt, dtype)


def _load_timing_cache(config: Any, path: Optional[str]) -> int:
    """Attach a timing cache to ``config``: the file's if it exists and matches, else a fresh one."""
    data = b""
    if path and Path(path).is_file():
        data = Path(path).read_bytes()
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, False):
        return len(data)
    # A cache of another TensorRT version or GPU is refused: build with a fresh one (and save that).
    log.warning("timing cache %s does not fit this TensorRT/GPU; starting a fresh one", path)
    fresh = config.create_timing_cache(b"")
    config.set_timing_cache(fresh, False)
    return 0


def engine_io(trt: Any, engine: Any) -> List[Dict[str, Any]]:
    """Name, mode, dtype and shape (-1 dynamic) of each I/O tensor, by the named-tensor API."""
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = engine.get_tensor_mode(name)
        out.append({"name": name,
                    "mode": "input" if mode == trt.TensorIOMode.INPUT else "output",
                    "dtype": getattr(engine.get_tensor_dtype(name), "name", str(engine.get_tensor_dtype(name))).lower(),
                    "shape": [int(d) for d in engine.get_tensor_shape(name)]})
    return out


def merge_timing_caches(request: Dict[str, Any], trt: Any = None, logger: Any = None) -> Dict[str, Any]:
    """The ``merge-cache`` verb: combine timing caches into ``out`` (entries of any of them kept).

    Raises:
        InfraError: none of the caches exists, or this TensorRT cannot combine caches.
    """
    trt = trt or import_tensorrt()
    logger = logger or make_logger(trt, bool(request.get("verbose")))
    caps = compat.caps_from_module(trt)
    if not caps.timing_cache_combine:
        raise InfraError(f"TensorRT {caps.version} cannot combine timing caches.", fix="Upgrade the worker's TensorRT.")
    paths = [str(p) for p in request.get("caches") or []]
    present = [p for p in paths if Path(p).is_file() and Path(p).stat().st_size > 0]
    if not present:
        raise InfraError(f"none of the timing caches to merge exists: {paths}.",
                         fix="Retry the build; the caches are written by the engine step.")
    from tasks.gpu.runtime import cuda_init

    cuda_init()  # Myelin's cache entries deserialize only with a CUDA context current (as in a build)
    builder = create_builder(trt, logger)
    config = builder.create_builder_config()
    # Start from the first cache rather than an empty one: combining into an empty cache failed on 8.6.
    merged = config.create_timing_cache(Path(present[0]).read_bytes())
    combined, skipped = ([present[0]] if merged is not None else []), []
    if merged is None:
        merged = config.create_timing_cache(b"")
    for p in present[1:] if combined else present:
        cache = config.create_timing_cache(Path(p).read_bytes())
        # ignore_mismatch: caches written on another GPU of the same model still share entries.
        if cache is not None and merged.combine(cache, True):
            combined.append(p)
        else:
            skipped.append(p)
            log.warning("timing cache %s could not be combined (another TensorRT version?)", p)
    if not combined:
        raise InfraError(f"no timing cache could be combined: {present}.",
                         fix="The caches come from another TensorRT version; delete the bucket's cache to start over.",
                         details=list(logger.errors))
    nbytes = _write_atomic(Path(str(request["out"])), merged.serialize())
    return {"out": str(request["out"]), "bytes": nbytes, "combined": combined, "skipped": skipped,
            "missing": [p for p in paths if p not in present]}
