"""Every TensorRT-version decision of trtflow, in one place.

TensorRT's Python API moved a lot between 8.6, 10.x and 11.x (facts from NVIDIA's docs and the
8.6 bindings):

- 8.6: weakly typed networks only; ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` is required for
  ONNX; FP16/INT8 come from ``BuilderFlag.FP16/INT8``; Q/DQ graphs need the INT8 flag (plus FP16 so
  the layers left unquantised may run in FP16); implicit INT8 calibration via ``int8_calibrator``.
- 10.x: both worlds. ``STRONGLY_TYPED`` exists; ``EXPLICIT_BATCH`` is deprecated and ignored (we do
  not set it); calibrators are deprecated but work; ``device_memory_size_v2`` (10.1+); parser
  errors name their node (``node_name()``/``node_operator()``).
- 11.x: strongly typed only. ``BuilderFlag.FP16/INT8``, ``int8_calibrator`` and
  ``platform_has_fast_fp16/int8`` are removed; ``STRONGLY_TYPED`` is deprecated and ignored; FP16
  comes from an FP16 ONNX graph, INT8 from Q/DQ nodes; ``device_memory_size`` is removed.

Decisions are made from ``trt.__version__`` and ``hasattr`` on the module, by pure functions that
run on CPU without tensorrt (``caps_from_module`` takes the module, or a test double of it). The
small helpers at the end wrap the version-dependent calls on real TensorRT objects.

``caps_for_version`` gives the same object from a version string alone, for the CPU side (validation
against the target's parser, what to prepare: an FP16 graph, Q/DQ with which backend). No other
module parses a TensorRT version.

Python 3.9-compatible; imports only the standard library and tasks.errors.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Dict, List, Optional, Tuple

from tasks.errors import ModelError

PRECISIONS = ("fp32", "fp16", "int8")
INT8_MODES = ("qdq", "calibrator")
GRAPH_PRECISIONS = ("fp32", "fp16")


def parse_version(text: str) -> Tuple[int, int, int]:
    """``"10.7.0.post1"`` -> ``(10, 7, 0)``; missing parts are 0."""
    parts = [int(p) for p in re.findall(r"\d+", str(text))[:3]]
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


@dataclass(frozen=True)
class Caps:
    """What one TensorRT installation offers. Serialised as the probe's ``caps``.

    ``explicit_batch_flag`` means "networks must be created with EXPLICIT_BATCH" (8.x), not merely
    that the enum member exists (10.x keeps it, deprecated and ignored).
    """

    version: str = "0.0.0"
    major: int = 0
    minor: int = 0
    patch: int = 0
    fp16_flag: bool = False
    int8_flag: bool = False
    int8_calibrator: bool = False
    strongly_typed: bool = False         # strongly typed networks can be built
    strongly_typed_only: bool = False    # ... and nothing else (11.x)
    strongly_typed_flag: bool = False    # NetworkDefinitionCreationFlag.STRONGLY_TYPED exists
    explicit_batch_flag: bool = False
    engine_inspector: bool = False
    hardware_compatibility: bool = False
    version_compatible: bool = False
    optimization_level: bool = False
    memory_pool_limit: bool = False
    timing_cache_combine: bool = False
    parser_node_names: bool = False      # ParserError.node_name()/node_operator()
    device_memory_size_v2: bool = False
    int64_tensors: bool = False          # DataType.INT64 (10+); 8.6 narrows int64 inputs to int32
    execute_async_v3: bool = False
    # What this version's ONNX parser reads (from PARSER_SUPPORT; see its sources).
    parser_min_opset: int = 0            # below: the parser warns "not guaranteed to work"
    parser_max_opset: int = 0            # above: operators change meaning: an error
    parser_max_ir: int = 0               # IR of the ONNX release the parser was built against
    parser_onnx_release: str = ""
    parser_local_functions: bool = False  # model-local functions imported (LocalFunctionImporter, 10.0+)
    parser_table: str = ""               # the PARSER_SUPPORT row used, e.g. "8.6", "10"
    parser_note: str = ""                # set when the version is not in the table and a neighbour was used

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Optional[Dict[str, Any]]) -> "Caps":
        """Rebuild from a probe's ``caps`` (unknown keys ignored), e.g. in the flow to plan builds."""
        data = dict(data or {})
        if data.get("version") and not data.get("parser_max_opset"):  # a probe from before the parser fields
            data.update(_parser_fields(str(data.get("version", "0.0.0"))))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _has(obj: Any, *path: str) -> bool:
    for name in path:
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


# ---- what each TensorRT's ONNX parser accepts ---------------------------------------------------
@dataclass(frozen=True)
class ParserSupport:
    """The ONNX a TensorRT release's parser reads."""

    version: str
    min_opset: int
    max_opset: int
    max_ir: int
    onnx_release: str
    local_functions: bool
    unsupported_ops: frozenset
    source: str


# Operators marked "N" in onnx-tensorrt's docs/operators.md. Only that column: an op listed "Y"
# can still fail on its restrictions (e.g. Resize modes, Einsum ellipsis); the parser says which.
_UNSUPPORTED_8_6 = frozenset("""
    Bernoulli BitShift BlackmanWindow Compress ConcatFromSequence ConvInteger DFT Det
    DynamicQuantizeLinear HammingWindow HannWindow Hardmax MatMulInteger MaxRoiPool MaxUnpool
    MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement
    OptionalHasElement QLinearConv QLinearMatMul STFT SequenceAt SequenceConstruct SequenceEmpty
    SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence
    StringNormalizer TfIdfVectorizer Unique""".split())
_UNSUPPORTED_10 = frozenset("""
    AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow
    CenterCropPad Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear
    HammingWindow HannWindow ImageDecoder MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix
    Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv
    QLinearMatMul RegexFullMatch STFT SequenceAt SequenceConstruct SequenceEmpty SequenceErase
    SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat
    StringNormalizer StringSplit TfIdfVectorizer Unique""".split())

# Sources (looked up, not guessed):
# - 8.6: github.com/onnx/onnx-tensorrt branch release/8.6-GA, docs/operators.md: "TensorRT 8.6
#   supports operators up to Opset 17"; ModelImporter.cpp warns below ai.onnx opset 7; README of
#   8.6-EA: "TensorRT 8.6.0 supports ONNX release 1.12.0" (ONNX 1.12 = IR 8, and the H100 test
#   models are written at IR 8 for that reason). No LocalFunctionImporter before 10.0.
# - 9.x: release/9.3 docs/operators.md "up to Opset 19", README "ONNX release 1.14.0" (IR 9).
# - 10.x: release/10.0-GA and 10.1-GA docs/operators.md "inclusive range of opset 9 to opset 20",
#   README "ONNX release 1.16.0" (IR 10). Later 10.x minors read newer opsets (10.15: 9 to 24);
#   the conservative 10.0 range is used for every 10.x until a minor is added here.
# - 11.x: docs.nvidia.com/deeplearning/tensorrt/latest/reference/onnx-opset-guide.html:
#   maximum opset 25, minimum 9, ONNX package 1.20.0 (IR 13). Its "N" list is not published in
#   the mirror we read; the 10.x list is used.
PARSER_SUPPORT: Dict[str, ParserSupport] = {
    "8.6": ParserSupport("8.6", 7, 17, 8, "1.12", False, _UNSUPPORTED_8_6, "onnx-tensorrt release/8.6-GA"),
    "9": ParserSupport("9", 7, 19, 9, "1.14", False, _UNSUPPORTED_8_6, "onnx-tensorrt release/9.3"),
    "10": ParserSupport("10", 9, 20, 10, "1.16", True, _UNSUPPORTED_10, "onnx-tensorrt release/10.0-GA"),
    "11": ParserSupport("11", 9, 25, 13, "1.20", True, _UNSUPPORTED_10, "TensorRT 11.x ONNX opset guide"),
}


# The newest IR every parser in the table reads (8.6's): graphs trtflow writes for any target (Q/DQ,
# FP16) keep it where their opset allows, so one graph serves every TensorRT.
PORTABLE_MAX_IR = min(row.max_ir for row in PARSER_SUPPORT.values())


def parser_support(version: str) -> Tuple[ParserSupport, str]:
    """The PARSER_SUPPORT row for ``version`` ("8.6.1.6", "10.3", "11"), most specific first.

    Returns (row, note): note is set when the version is not in the table and the nearest older
    row (or the oldest, below the table) was used instead.
    """
    parts = [int(p) for p in re.findall(r"\d+", str(version))[:3]]
    for n in range(len(parts), 0, -1):
        key = ".".join(str(p) for p in parts[:n])
        if key in PARSER_SUPPORT:
            return PARSER_SUPPORT[key], ""
    known = sorted(PARSER_SUPPORT.values(), key=lambda s: parse_version(s.version))
    below = [s for s in known if parse_version(s.version) <= tuple(parts + [0, 0, 0])[:3]] if parts else []
    nearest = below[-1] if below else known[0]
    return nearest, (f"TensorRT {version!r} is not in trtflow's parser table; judged by the rules of "
                     f"TensorRT {nearest.version}.")


def _parser_fields(version: str) -> Dict[str, Any]:
    row, note = parser_support(version)
    return dict(parser_min_opset=row.min_opset, parser_max_opset=row.max_opset, parser_max_ir=row.max_ir,
                parser_onnx_release=row.onnx_release, parser_local_functions=row.local_functions,
                parser_table=row.version, parser_note=note)


def parser_unsupported_ops(caps: Caps) -> frozenset:
    """Operators the caps' parser has no importer for (onnx-tensorrt operators.md "N")."""
    return parser_support(caps.parser_table or caps.version)[0].unsupported_ops


def caps_for_version(version: str) -> Caps:
    """What TensorRT ``version`` offers, without TensorRT: for the CPU side, which knows only the
    target's version (a worker's probe, a spec, a bucket key). The same facts as ``caps_from_module``
    reads from a real module (see the module docstring), by release."""
    major, minor, patch = parse_version(version)
    v = (major, minor)
    return Caps(
        version=str(version), major=major, minor=minor, patch=patch,
        fp16_flag=major < 11, int8_flag=major < 11, int8_calibrator=major < 11,
        strongly_typed=major >= 10, strongly_typed_only=major >= 11, strongly_typed_flag=major >= 10,
        explicit_batch_flag=major < 10,
        engine_inspector=v >= (8, 2), hardware_compatibility=v >= (8, 6), version_compatible=v >= (8, 6),
        optimization_level=v >= (8, 6), memory_pool_limit=v >= (8, 4), timing_cache_combine=v >= (8, 0),
        parser_node_names=major >= 10, device_memory_size_v2=v >= (10, 1), int64_tensors=major >= 10,
        execute_async_v3=v >= (8, 5),
        **_parser_fields(version),
    )


# ---- CPU-side policy: what to prepare for a target ----------------------------------------------
def fp16_from_graph(caps: Caps) -> bool:
    """FP16 engines need an FP16 ONNX graph (no FP16 builder flag: TensorRT 11)."""
    return not caps.fp16_flag or caps.strongly_typed_only


def calibrator_available(caps: Caps) -> bool:
    """Implicit INT8 calibration (``calibration.mode: calibrator``) exists on this TensorRT (<= 10)."""
    return caps.int8_calibrator and caps.int8_flag and not caps.strongly_typed_only


def modelopt_qdq_readable(caps: Optional[Caps]) -> bool:
    """Whether the parser reads ModelOpt's Q/DQ graphs: ModelOpt writes opset >= 19 / IR 10
    (measured with 0.47), which parsers before TensorRT 10 do not read. Unknown target: True."""
    return caps is None or caps.parser_max_opset >= 19


def qdq_backend(caps: Optional[Caps], wanted: str, modelopt_installed: bool) -> str:
    """``onnxruntime`` or ``modelopt`` for ``calibration.backend`` ``wanted`` (auto | onnxruntime |
    modelopt): auto takes ModelOpt where it is installed and the target's parser reads its graphs.
    ``modelopt`` without ModelOpt installed is the caller's error to raise (it names the fix)."""
    if wanted == "onnxruntime":
        return "onnxruntime"
    if wanted == "auto" and not modelopt_qdq_readable(caps):
        return "onnxruntime"
    if modelopt_installed or wanted == "modelopt":
        return "modelopt"
    return "onnxruntime"


def inspector_json_available(caps: Caps) -> bool:
    """The engine inspector can write layer information as JSON (layers.json)."""
    return caps.engine_inspector


def caps_from_module(trt: Any) -> Caps:
    """Read a TensorRT module's capabilities from its version and attributes (no GPU needed)."""
    version = str(getattr(trt, "__version__", "0.0.0"))
    major, minor, patch = parse_version(version)
    fp16_flag = _has(trt, "BuilderFlag", "FP16")
    int8_flag = _has(trt, "BuilderFlag", "INT8")
    st_flag = _has(trt, "NetworkDefinitionCreationFlag", "STRONGLY_TYPED")
    strongly_typed_only = major >= 11 or not (fp16_flag or int8_flag)
    return Caps(
        version=version, major=major, minor=minor, patch=patch,
        fp16_flag=fp16_flag,
        int8_flag=int8_flag,
        int8_calibrator=int8_flag and _has(trt, "IBuilderConfig", "int8_calibrator")
        and _has(trt, "IInt8EntropyCalibrator2"),
        strongly_typed=st_flag or major >= 11,
        strongly_typed_only=strongly_typed_only,
        strongly_typed_flag=st_flag,
        explicit_batch_flag=major < 10 and _has(trt, "NetworkDefinitionCreationFlag", "EXPLICIT_BATCH"),
        engine_inspector=_has(trt, "ICudaEngine", "create_engine_inspector") and _has(trt, "LayerInformationFormat", "JSON"),
        hardware_compatibility=_has(trt, "HardwareCompatibilityLevel", "AMPERE_PLUS")
        and _has(trt, "IBuilderConfig", "hardware_compatibility_level"),
        version_compatible=_has(trt, "BuilderFlag", "VERSION_COMPATIBLE"),
        optimization_level=_has(trt, "IBuilderConfig", "builder_optimization_level"),
        memory_pool_limit=_has(trt, "IBuilderConfig", "set_memory_pool_limit") and _has(trt, "MemoryPoolType", "WORKSPACE"),
        timing_cache_combine=_has(trt, "ITimingCache", "combine"),
        parser_node_names=_has(trt, "ParserError", "node_name"),
        device_memory_size_v2=_has(trt, "ICudaEngine", "device_memory_size_v2"),
        int64_tensors=_has(trt, "DataType", "INT64"),
        execute_async_v3=_has(trt, "IExecutionContext", "execute_async_v3"),
        **_parser_fields(version),
    )


@dataclass(frozen=True)
class BuildPlan:
    """How to build one engine on one TensorRT: names of flags, resolved by build.py with getattr."""

    precision: str
    int8_mode: Optional[str]
    graph_precision: str
    network_flags: List[str] = field(default_factory=list)   # NetworkDefinitionCreationFlag members
    builder_flags: List[str] = field(default_factory=list)   # BuilderFlag members
    strongly_typed: bool = False
    use_calibrator: bool = False
    needs_fp16_graph: bool = False  # FP16 must come from an FP16 ONNX graph, which this build lacks
    notes: List[str] = field(default_factory=list)           # worth a log line
    deprecations: List[str] = field(default_factory=list)    # paths this TensorRT deprecates (log + manifest)

    @property
    def typing(self) -> str:
        """"strong" or "weak": what the manifest records as the build's typing."""
        return "strong" if self.strongly_typed else "weak"

    def to_dict(self) -> Dict[str, Any]:
        return dict(asdict(self), typing=self.typing)


def _strongly_typed_network_flags(caps: Caps) -> List[str]:
    # 10.x needs the flag; 11.x is always strongly typed and only keeps the flag as a deprecated no-op.
    if caps.strongly_typed_only or not caps.strongly_typed_flag:
        return []
    return ["STRONGLY_TYPED"]


TYPINGS = ("weak", "strong")


def plan_build(caps: Caps, precision: str, int8_mode: Optional[str] = None,
               graph_precision: Optional[str] = "fp32", typing: Optional[str] = None) -> BuildPlan:
    """Decide network creation flags, builder flags and typing for one engine build.

    Args:
        caps: the TensorRT installation (``caps_from_module`` or ``Caps.from_dict(probe["caps"])``).
        precision: "fp32" | "fp16" | "int8".
        int8_mode: for int8: "qdq" (explicit Q/DQ graph, default) or "calibrator" (implicit).
        graph_precision: float type of the ONNX graph given: "fp32", or "fp16" for an FP16 graph
            (for int8: a Q/DQ graph whose unquantised part is FP16).
        typing: "weak" | "strong" to force one (``strategy: best`` on 10.x builds both); None: the
            graph decides (an FP16 graph builds strongly typed where TensorRT can).

    Returns:
        The plan. ``needs_fp16_graph`` says the caller must supply an FP16 ONNX graph (TensorRT 11
        has no FP16 builder flag); build.py refuses such a plan with a ModelError.
        ``deprecations`` names what this build uses that the TensorRT deprecates.

    Raises:
        ModelError: an unknown value or an impossible combination (the implicit calibrator or a
            weakly typed build on TensorRT 11, a strongly typed build on 8.6, an FP32 engine from
            an FP16 graph).
    """
    graph_precision = graph_precision or "fp32"
    int8_mode = _check_plan_args(caps, precision, int8_mode, graph_precision, typing)
    base_flags = ["EXPLICIT_BATCH"] if caps.explicit_batch_flag else []
    args = dict(precision=precision, int8_mode=int8_mode, graph_precision=graph_precision)
    notes: List[str] = []

    def weak(builder_flags: List[str], **extra: Any) -> BuildPlan:
        plan = BuildPlan(network_flags=list(base_flags), builder_flags=builder_flags, strongly_typed=False,
                         notes=notes, **args, **extra)
        return replace(plan, deprecations=deprecations(caps, plan))

    def strong(**extra: Any) -> BuildPlan:
        plan = BuildPlan(network_flags=base_flags + _strongly_typed_network_flags(caps), builder_flags=[],
                         strongly_typed=True, notes=notes, **args, **extra)
        return replace(plan, deprecations=deprecations(caps, plan))

    if precision == "fp32":
        # An FP32 graph means the same thing typed or untyped; 11.x only knows typed networks.
        return strong() if (caps.strongly_typed_only or typing == "strong") else weak([])
    if precision == "fp16":
        if typing != "weak" and graph_precision == "fp16" and caps.strongly_typed:
            return strong()  # the graph says which layers are FP16; TensorRT must not retype them
        if typing != "strong" and caps.fp16_flag and not caps.strongly_typed_only:
            return weak(["FP16"])
        notes.append(f"TensorRT {caps.version} has no FP16 builder flag here: FP16 engines come from an FP16 ONNX graph.")
        return strong(needs_fp16_graph=True)
    if int8_mode == "calibrator":
        # FP16 as well, so layers TensorRT cannot run in INT8 fall back to FP16 rather than FP32.
        return weak(["INT8"] + (["FP16"] if caps.fp16_flag else []), use_calibrator=True)
    # qdq: the Q/DQ nodes carry the scales. A Q/DQ graph over FP16 builds strongly typed (TensorRT
    # keeps exactly the graph's types); over FP32 weakly typed with INT8+FP16 where TensorRT still
    # can, so the unquantised layers may run in FP16 (strongly typed they would run in FP32).
    weak_possible = caps.int8_flag and not caps.strongly_typed_only
    if typing == "weak" or (typing is None and weak_possible and (graph_precision == "fp32" or not caps.strongly_typed)):
        return weak(["INT8"] + (["FP16"] if caps.fp16_flag else []))
    if graph_precision == "fp32":
        notes.append("the Q/DQ graph's unquantised layers are FP32 and a strongly typed build keeps them FP32 "
                     "(slower than INT8+FP16): give the Q/DQ graph over FP16 (calibration.high_precision: fp16).")
    return strong()


def _check_plan_args(caps: Caps, precision: str, int8_mode: Optional[str], graph_precision: str,
                     typing: Optional[str]) -> Optional[str]:
    """The INT8 mode to use (None unless int8); ModelError for values and combinations that cannot build."""
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}.", fix=f"Use one of {', '.join(PRECISIONS)}.")
    if graph_precision not in GRAPH_PRECISIONS:
        raise ModelError(f"unknown graph precision {graph_precision!r}.", fix=f"Use one of {', '.join(GRAPH_PRECISIONS)}.")
    if typing is not None and typing not in TYPINGS:
        raise ModelError(f"unknown build typing {typing!r}.", fix="Use weak, strong, or leave it unset.")
    if precision != "int8":
        int8_mode = None
    elif int8_mode is None:
        int8_mode = "qdq"
    if int8_mode is not None and int8_mode not in INT8_MODES:
        raise ModelError(f"unknown INT8 mode {int8_mode!r}.", fix="Set calibration.mode to qdq or calibrator.")
    if precision == "fp32" and graph_precision == "fp16":
        raise ModelError("an FP32 engine cannot be built from an FP16 ONNX graph.",
                         fix="Build fp32 from the original FP32 model; the FP16 graph is only for fp16 engines.")
    if int8_mode == "calibrator" and not calibrator_available(caps):
        why = ("implicit INT8 calibration was removed in TensorRT 11" if caps.major >= 11 or caps.strongly_typed_only
               else "this TensorRT has no implicit INT8 calibrator")
        raise ModelError(f"{why} (this worker has TensorRT {caps.version}).",
                         fix="use calibration.mode: qdq (explicit quantisation with Q/DQ nodes)")
    if typing == "weak" and caps.strongly_typed_only:
        raise ModelError(f"TensorRT {caps.version} builds strongly typed networks only; a weakly typed "
                         f"{precision} build (builder flags) is not possible.",
                         fix="Build from a graph that carries its types: an FP16 graph for fp16, Q/DQ over FP16 for int8.")
    if typing == "strong" and not caps.strongly_typed:
        raise ModelError(f"TensorRT {caps.version} cannot build strongly typed networks (10.0+ can).",
                         fix="Leave the typing to trtflow (weakly typed with builder flags on this TensorRT).")
    return int8_mode


def deprecations(caps: Caps, plan: BuildPlan) -> List[str]:
    """What ``plan`` uses that the worker's TensorRT deprecates (facts from NVIDIA's release notes:
    calibrators deprecated in 10.1, weak typing (BuilderFlag.FP16/INT8) in 10.12, EXPLICIT_BATCH in
    10.0; all of them removed or ignored in 11)."""
    v = (caps.major, caps.minor)
    out: List[str] = []
    weak_flags = [f for f in plan.builder_flags if f in ("FP16", "INT8")]
    if weak_flags and v >= (10, 12):
        out.append(f"TensorRT {caps.version} deprecates weak typing (BuilderFlag {'/'.join(weak_flags)}, deprecated "
                   f"since 10.12, removed in 11): build strongly typed from an FP16 graph / Q/DQ over FP16.")
    if plan.use_calibrator and v >= (10, 1):
        out.append(f"TensorRT {caps.version} deprecates implicit INT8 calibration (since 10.1, removed in 11): "
                   f"use calibration.mode: qdq.")
    if "EXPLICIT_BATCH" in plan.network_flags and caps.major >= 10:
        out.append(f"TensorRT {caps.version} deprecates NetworkDefinitionCreationFlag.EXPLICIT_BATCH (ignored since 10.0).")
    return out


def fp16_graph_wanted(caps: Caps, source: str = "auto") -> bool:
    """Whether an FP16 engine is built from an FP16 ONNX graph (strongly typed where TensorRT can).

    ``source`` (spec ``fp16.source``): auto (graph only where there is no FP16 flag: TensorRT 11),
    graph (always: as 11 would, e.g. to compare throughput on 8.6/10), flag (never; refused on 11).
    """
    if source == "graph":
        return True
    if source == "flag" and fp16_from_graph(caps):
        raise ModelError(f"fp16.source is 'flag', but TensorRT {caps.version} has no FP16 builder flag.",
                         fix="Set fp16.source: auto (or graph): TensorRT 11 builds FP16 from an FP16 ONNX graph.")
    return source != "flag" and fp16_from_graph(caps)


def int8_qdq_graph_precision(caps: Optional[Caps], wanted: str = "auto") -> str:
    """Float type of the Q/DQ graph's unquantised part (spec ``calibration.high_precision``).

    auto: fp16 where the build is strongly typed (TensorRT 10+: NVIDIA's default, ModelOpt's
    ``high_precision_dtype="fp16"``), fp32 for 8.6, whose weakly typed build picks FP16 itself
    (INT8+FP16 flags) and whose parser (opset <= 17) cannot read FP16 Q/DQ scales (opset 19).
    Unknown target: fp32, which every parser reads.

    Raises:
        ModelError: fp16 asked for a target whose parser cannot read FP16 scales.
    """
    readable = caps is not None and caps.strongly_typed and caps.parser_max_opset >= 19
    if wanted == "fp16" and caps is not None and not readable:
        raise ModelError(f"calibration.high_precision is fp16, but TensorRT {caps.version} cannot build a Q/DQ graph "
                         f"over FP16 (its parser reads opset <= {caps.parser_max_opset}; FP16 scales need 19).",
                         fix="Set calibration.high_precision: auto (8.6 runs the unquantised layers in FP16 through "
                             "its INT8+FP16 flags).")
    if wanted in ("fp16", "fp32"):
        return wanted
    return "fp16" if readable else "fp32"


def int8_build_variants(caps: Caps) -> List[Dict[str, str]]:
    """The INT8 (Q/DQ) builds this TensorRT can make, preferred first, for ``strategy: best`` to
    compare: each ``{"typing", "graph_precision"}``. 8.6: weakly typed INT8+FP16 over an FP32 Q/DQ
    graph; 11: strongly typed Q/DQ over FP16; 10.x: both (strongly typed first: weak is deprecated)."""
    variants: List[Dict[str, str]] = []
    if caps.strongly_typed and caps.parser_max_opset >= 19:
        variants.append({"typing": "strong", "graph_precision": "fp16"})
    if caps.int8_flag and not caps.strongly_typed_only:
        variants.append({"typing": "weak", "graph_precision": "fp32"})
    return variants


def describe_plan(plan: BuildPlan) -> str:
    """One log line."""
    typing_ = "strongly typed" if plan.strongly_typed else "weakly typed"
    mode = f" ({plan.int8_mode})" if plan.int8_mode else ""
    return (f"{plan.precision}{mode} from a {plan.graph_precision} graph: {typing_}, network flags "
            f"{plan.network_flags or '[]'}, builder flags {plan.builder_flags or '[]'}"
            + (", implicit calibrator" if plan.use_calibrator else ""))


# ---- version-dependent calls on real TensorRT objects -------------------------------------------

def network_flags_value(trt: Any, names: List[str]) -> int:
    """OR of ``1 << NetworkDefinitionCreationFlag.<name>`` for each name."""
    value = 0
    for name in names:
        value |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    return value


def set_workspace(trt: Any, config: Any, caps: Caps, mib: Optional[int]) -> None:
    """Limit the builder's workspace (None: TensorRT's default, the whole device)."""
    if mib is None:
        return
    nbytes = int(mib) << 20
    if caps.memory_pool_limit:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, nbytes)
    else:  # before 8.4; kept so an old worker says what it does instead of failing
        config.max_workspace_size = nbytes


def set_optimization_level(config: Any, caps: Caps, level: Optional[int]) -> bool:
    """Set the builder optimisation level where the version has one. Returns whether it was set."""
    if level is None or not caps.optimization_level:
        return False
    config.builder_optimization_level = int(level)
    return True


def set_hardware_compatibility(trt: Any, config: Any, caps: Caps, level: Optional[str]) -> None:
    """"none" | "ampere_plus" (an engine that runs on any Ampere or newer GPU)."""
    if not level or level == "none":
        return
    if level != "ampere_plus":
        raise ModelError(f"unknown build.hardware_compatibility {level!r}.", fix="Use none or ampere_plus.")
    if not caps.hardware_compatibility:
        raise ModelError(f"TensorRT {caps.version} cannot build hardware-compatible engines.",
                         fix="Set build.hardware_compatibility: none, or use a worker with TensorRT >= 8.6.")
    config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS


def version_compatible_flags(caps: Caps, wanted: bool) -> List[str]:
    """Builder flags for a version-compatible engine (one later TensorRT runtimes can load)."""
    if not wanted:
        return []
    if not caps.version_compatible:
        raise ModelError(f"TensorRT {caps.version} cannot build version-compatible engines.",
                         fix="Set build.version_compatible: false, or use a worker with TensorRT >= 8.6.")
    return ["VERSION_COMPATIBLE"]


def parser_error_details(parser: Any, caps: Caps, node_names: Optional[List[str]] = None,
                         node_ops: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """One dict per ONNX parser error: description, code, node index/name/operator where known.

    8.6 only gives the node index (``error.node()``); 10+ also ``node_name()``/``node_operator()``.
    ``node_names``/``node_ops`` (from the ONNX graph, by index) fill the gap on 8.6.
    """
    out: List[Dict[str, Any]] = []
    for i in range(int(parser.num_errors)):
        err = parser.get_error(i)
        item: Dict[str, Any] = {"desc": str(err.desc())}
        try:
            name = getattr(err.code(), "name", None)
            # pybind11 in 8.6 exposes an enum's name as a method, later versions as a property.
            item["code"] = str(name() if callable(name) else (name or err.code()))
        except Exception:  # noqa: BLE001 - a detail, never worth failing the report over
            pass
        index = -1
        try:
            index = int(err.node())
        except Exception:  # noqa: BLE001
            pass
        item["node_index"] = index
        name = op = ""
        if caps.parser_node_names and hasattr(err, "node_name"):
            try:
                name, op = str(err.node_name() or ""), str(err.node_operator() or "")
            except Exception:  # noqa: BLE001
                name = op = ""
        if not name and node_names is not None and 0 <= index < len(node_names):
            name = node_names[index]
        if not op and node_ops is not None and 0 <= index < len(node_ops):
            op = node_ops[index]
        item["node_name"] = name
        item["node_op"] = op
        for attr in ("file", "func", "line"):
            try:
                item[attr] = getattr(err, attr)()
            except Exception:  # noqa: BLE001
                pass
        out.append(item)
    return out


def device_memory_bytes(engine: Any) -> int:
    """Device memory an execution context of ``engine`` needs (v2 on 10.1+, removed v1 on 11)."""
    for attr in ("device_memory_size_v2", "device_memory_size"):
        if hasattr(engine, attr):
            try:
                return int(getattr(engine, attr))
            except Exception:  # noqa: BLE001 - try the other spelling
                continue
    return 0


def engine_information_json(trt: Any, engine: Any, caps: Caps,
                            shapes: Optional[Dict[str, List[int]]] = None) -> Optional[str]:
    """The engine inspector's layer information as JSON text, or None where there is no inspector.

    With dynamic shapes the inspector reports tensor formats/precisions only for an execution
    context whose input shapes are set ("N/A due to dynamic shapes" otherwise; measured on 8.6),
    so ``shapes`` (input name -> shape, e.g. profile 0's opt) gives it one.
    """
    if not caps.engine_inspector:
        return None
    inspector = engine.create_engine_inspector()
    if inspector is None:
        return None
    context = None
    if shapes:
        try:
            context = engine.create_execution_context()
            for name, shape in shapes.items():
                context.set_input_shape(name, list(shape))
            inspector.execution_context = context
        except Exception as err:  # noqa: BLE001 - the report then lacks precisions, the engine is fine
            import logging

            logging.getLogger("trtflow.gpu").warning("engine inspector without shapes: %s", err)
    text = str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    del inspector, context
    return text


# ---- plugins and build progress -------------------------------------------------------------------

# The line the GPU child logs when it enters a phase; the parent (tasks/gpu_client.py) reads the
# newest one for its heartbeat.
PHASE_PREFIX = "trtflow-phase:"


def register_plugins(trt: Any, logger: Any) -> bool:
    """Register TensorRT's own plugins (InstanceNormalization_TRT, EfficientNMS_TRT, ...) before a
    parse or deserialize: the ONNX parser falls back to them for ops it has no importer for, and
    engines built with them (also hardware- or version-compatible ones) only load where they are
    registered. Every TensorRT since 7 has the call; a module without it gets False."""
    init = getattr(trt, "init_libnvinfer_plugins", None)
    if init is None:
        return False
    return bool(init(logger, ""))


def parser_flags(trt: Any, hardware_compatibility: Optional[str], version_compatible: bool) -> List[str]:
    """OnnxParserFlag names to set. TensorRT 8.6 imports InstanceNormalization through its
    InstanceNormalization_TRT plugin unless NATIVE_INSTANCENORM is set, and a hardware- or
    version-compatible engine cannot carry that plugin: those builds need the native layer.
    TensorRT 10 sets the flag by default; a version without the enum has nothing to set."""
    flags = getattr(trt, "OnnxParserFlag", None)
    compatible = bool(version_compatible) or (hardware_compatibility or "none") != "none"
    if flags is None or not hasattr(flags, "NATIVE_INSTANCENORM") or not compatible:
        return []
    return ["NATIVE_INSTANCENORM"]


def progress_monitor_available(trt: Any) -> bool:
    """TensorRT 10 added IProgressMonitor (IBuilderConfig.progress_monitor); 8.6 builds in silence."""
    return hasattr(trt, "IProgressMonitor")


def attach_progress_monitor(trt: Any, config: Any, report: Any, every_s: float = 5.0) -> Any:
    """Report the builder's phases (``report(text)``) through IProgressMonitor where the version has
    one; returns the monitor (keep it alive for the build) or None. Nested phases (one per layer's
    tactics) come thousands of times, so they are reported at most every ``every_s`` seconds."""
    if not progress_monitor_available(trt):
        return None
    import time as _time

    base = trt.IProgressMonitor

    class _Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)  # pybind11 trampolines need the explicit base init
            self._last = 0.0

        def phase_start(self, phase_name: str, parent_phase: Optional[str], num_steps: int) -> None:
            now = _time.monotonic()
            if parent_phase is None or now - self._last >= every_s:
                self._last = now
                where = f"{parent_phase} / " if parent_phase else ""
                report(f"build: {where}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            pass

    monitor = _Monitor()
    config.progress_monitor = monitor
    return monitor
