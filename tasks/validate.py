"""Validation: is this ONNX file something the target TensorRT can build, given its spec?

``validate_model`` is pure: it reads the model (never its weights into memory), runs
``onnx.checker`` (full check, with shape inference) and the checks TensorRT needs beyond it, and
returns a ``ValidationReport``. Problems with the model or spec never raise: they are ``errors``
(which block a conversion) or ``warnings`` (which do not), each with a fix. The flow turns a
failing report into a ``ModelError`` (``report.raise_for_errors()``).

The report also carries the *resolved* optimisation profiles: the spec's profiles with a default
batch range filled in for inputs whose only dynamic dim is the batch (dim 0). Build, calibration
and eval inputs all use these.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.errors import ModelError
from tasks.spec import SPEC_FILENAME, ModelSpec

DEFAULT_TRT_VERSION = "8.6"

Dim = Union[int, str, None]  # static size, symbolic name (dim_param), or unknown


# ---- what each TensorRT's ONNX parser accepts ---------------------------------------------------
@dataclass(frozen=True)
class TrtOnnxSupport:
    """The ONNX a TensorRT release's parser reads."""

    version: str
    min_opset: int  # below: the parser warns "not guaranteed to work" (we warn too)
    max_opset: int  # above: operators change meaning (e.g. ReduceMean axes as input in 18): error
    max_ir: int  # the IR of the ONNX release the parser was built against
    onnx_release: str
    local_functions: bool  # whether model-local functions (ModelProto.functions) are imported
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
TENSORRT_ONNX_SUPPORT: Dict[str, TrtOnnxSupport] = {
    "8.6": TrtOnnxSupport("8.6", 7, 17, 8, "1.12", False, _UNSUPPORTED_8_6, "onnx-tensorrt release/8.6-GA"),
    "9": TrtOnnxSupport("9", 7, 19, 9, "1.14", False, _UNSUPPORTED_8_6, "onnx-tensorrt release/9.3"),
    "10": TrtOnnxSupport("10", 9, 20, 10, "1.16", True, _UNSUPPORTED_10, "onnx-tensorrt release/10.0-GA"),
    "11": TrtOnnxSupport("11", 9, 25, 13, "1.20", True, _UNSUPPORTED_10, "TensorRT 11.x ONNX opset guide"),
}


def _version_tuple(version: str) -> Tuple[int, ...]:
    out = []
    for part in str(version).split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def tensorrt_support(trt_version: str = DEFAULT_TRT_VERSION) -> Tuple[TrtOnnxSupport, Optional[str]]:
    """The table entry for ``trt_version`` ("8.6.1.6", "10.3", "11"), most specific first.

    Returns (entry, note): note is set when the version is not in the table and the nearest
    entry was used instead.
    """
    parts = _version_tuple(trt_version)
    for n in range(len(parts), 0, -1):
        key = ".".join(str(p) for p in parts[:n])
        if key in TENSORRT_ONNX_SUPPORT:
            return TENSORRT_ONNX_SUPPORT[key], None
    known = sorted(TENSORRT_ONNX_SUPPORT.values(), key=lambda s: _version_tuple(s.version))
    below = [s for s in known if _version_tuple(s.version) <= parts] if parts else []
    nearest = below[-1] if below else known[0]
    return nearest, (f"TensorRT {trt_version!r} is not in trtflow's parser table; judged by the rules of "
                     f"TensorRT {nearest.version}.")


# ---- the report ---------------------------------------------------------------------------------
@dataclass
class Issue:
    """One finding: a stable ``code`` for programs, a ``message`` and a ``fix`` for people."""

    code: str
    message: str
    fix: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TensorInfo:
    """A graph input or output. ``shape`` is None when the model declares no rank."""

    name: str
    dtype: str
    shape: Optional[List[Dim]]
    dynamic_dims: List[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def shape_text(self) -> str:
        if self.shape is None:
            return "?"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


ShapeRangeDict = Dict[str, List[int]]  # {"min": [...], "opt": [...], "max": [...]}
ResolvedProfile = Dict[str, ShapeRangeDict]  # input name -> range, every input (static: min = opt = max)


@dataclass
class ValidationReport:
    """What validation found. Truthy when it has no errors."""

    model_path: str
    trt_version: str
    errors: List[Issue] = field(default_factory=list)
    warnings: List[Issue] = field(default_factory=list)
    ir_version: Optional[int] = None
    opsets: Dict[str, int] = field(default_factory=dict)
    producer: str = ""
    inputs: List[TensorInfo] = field(default_factory=list)
    outputs: List[TensorInfo] = field(default_factory=list)
    operators: Dict[str, int] = field(default_factory=dict)
    model_bytes: int = 0
    external_data_bytes: int = 0
    external_files: List[str] = field(default_factory=list)
    parameters: int = 0
    profiles: List[ResolvedProfile] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def __bool__(self) -> bool:
        return self.ok

    def error(self, code: str, message: str, fix: Optional[str] = None) -> None:
        self.errors.append(Issue(code, message, fix))

    def warn(self, code: str, message: str, fix: Optional[str] = None) -> None:
        self.warnings.append(Issue(code, message, fix))

    def codes(self) -> List[str]:
        return [e.code for e in self.errors]

    def warning_codes(self) -> List[str]:
        return [w.code for w in self.warnings]

    def input(self, name: str) -> Optional[TensorInfo]:
        return next((t for t in self.inputs if t.name == name), None)

    def opt_shapes(self, profile: int = 0) -> Dict[str, List[int]]:
        """Every input's shape at the profile's opt point."""
        prof = self.profiles[profile] if self.profiles else {}
        return {name: list(r["opt"]) for name, r in prof.items()}

    def inputs_list(self) -> List[dict]:
        """The inputs as plain dicts (name, dtype, shape, dynamic_dims)."""
        return [t.to_dict() for t in self.inputs]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "ValidationReport":
        data = {k: v for k, v in data.items() if k != "ok"}
        data["errors"] = [Issue(**e) for e in data.get("errors", [])]
        data["warnings"] = [Issue(**w) for w in data.get("warnings", [])]
        data["inputs"] = [TensorInfo(**t) for t in data.get("inputs", [])]
        data["outputs"] = [TensorInfo(**t) for t in data.get("outputs", [])]
        return cls(**data)

    def to_model_error(self) -> ModelError:
        """One ModelError naming every error (details keep them one by one)."""
        name = Path(self.model_path).name
        count = len(self.errors)
        head = f"{name} failed validation for TensorRT {self.trt_version} ({count} error{'s' if count != 1 else ''}): "
        message = head + " ".join(f"[{e.code}] {e.message}" for e in self.errors)
        fixes = [e.fix for e in self.errors if e.fix]
        return ModelError(message, fix=" | ".join(dict.fromkeys(fixes)) or None,
                          details=[e.to_dict() for e in self.errors])

    def raise_for_errors(self) -> "ValidationReport":
        if self.errors:
            raise self.to_model_error()
        return self

    # ---- human output ----
    def summary_lines(self) -> List[str]:
        """A plain-text report (CLI, logs)."""
        lines = [f"{Path(self.model_path).name}: {'OK' if self.ok else 'FAILED'} for TensorRT {self.trt_version} "
                 f"({len(self.errors)} error(s), {len(self.warnings)} warning(s))"]
        if self.ir_version is not None:
            opsets = ", ".join(f"{k} {v}" for k, v in sorted(self.opsets.items()))
            lines.append(f"  IR {self.ir_version}, opsets: {opsets or 'none'}, producer: {self.producer or '-'}")
            lines.append(f"  size: {_human_bytes(self.model_bytes)} model + {_human_bytes(self.external_data_bytes)} "
                         f"external data ({len(self.external_files)} file(s)), {self.parameters:,} parameters")
        for t in self.inputs:
            dyn = f" dynamic dims {t.dynamic_dims}" if t.dynamic_dims else ""
            lines.append(f"  input  {t.name}: {t.dtype} {t.shape_text()}{dyn}")
        for t in self.outputs:
            lines.append(f"  output {t.name}: {t.dtype} {t.shape_text()}")
        for i, prof in enumerate(self.profiles):
            for name, rng in prof.items():
                if rng["min"] != rng["max"]:  # static inputs' ranges say nothing new
                    lines.append(f"  profile {i} {name}: min {rng['min']} opt {rng['opt']} max {rng['max']}")
        if self.operators:
            top = sorted(self.operators.items(), key=lambda kv: (-kv[1], kv[0]))
            lines.append("  operators: " + ", ".join(f"{op} x{n}" for op, n in top))
        for e in self.errors:
            lines.append(f"  ERROR [{e.code}] {e.message}")
            if e.fix:
                lines.extend("        fix: " + ln if i == 0 else "             " + ln
                             for i, ln in enumerate(e.fix.splitlines()))
        for w in self.warnings:
            lines.append(f"  warning [{w.code}] {w.message}")
        return lines

    def summary_markdown(self) -> str:
        """A Markdown report (Prefect artifact)."""
        name = Path(self.model_path).name
        out = [f"### Validation of `{name}`: {'✅ OK' if self.ok else '❌ FAILED'} (TensorRT {self.trt_version})", ""]
        if self.ir_version is not None:
            opsets = ", ".join(f"{k} {v}" for k, v in sorted(self.opsets.items()))
            out += [f"IR {self.ir_version} · opsets {opsets or 'none'} · producer `{self.producer or '-'}` · "
                    f"{_human_bytes(self.model_bytes)} model + {_human_bytes(self.external_data_bytes)} external data · "
                    f"{self.parameters:,} parameters", ""]
        if self.inputs or self.outputs:
            out += ["| | name | dtype | shape | dynamic dims |", "|---|---|---|---|---|"]
            out += [f"| input | `{t.name}` | {t.dtype} | {t.shape_text()} | {t.dynamic_dims or ''} |" for t in self.inputs]
            out += [f"| output | `{t.name}` | {t.dtype} | {t.shape_text()} | {t.dynamic_dims or ''} |" for t in self.outputs]
            out.append("")
        if any(r["min"] != r["max"] for prof in self.profiles for r in prof.values()):
            out += ["| profile | input | min | opt | max |", "|---|---|---|---|---|"]
            for i, prof in enumerate(self.profiles):
                out += [f"| {i} | `{n}` | {r['min']} | {r['opt']} | {r['max']} |" for n, r in prof.items()
                        if r["min"] != r["max"]]
            out.append("")
        if self.errors:
            out += ["**Errors**", ""]
            for e in self.errors:
                out.append(f"- `{e.code}`: {e.message}")
                if e.fix:
                    fix = e.fix.replace("\n", "\n  ")
                    out.append(f"  - fix: {fix}" if "\n" not in e.fix else f"  - fix:\n\n  ```\n  {fix}\n  ```")
            out.append("")
        if self.warnings:
            out += ["**Warnings**", ""] + [f"- `{w.code}`: {w.message}" for w in self.warnings] + [""]
        if self.operators:
            top = sorted(self.operators.items(), key=lambda kv: (-kv[1], kv[0]))
            out += ["**Operators**: " + ", ".join(f"{op} ×{n}" for op, n in top), ""]
        return "\n".join(out)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ---- model reading ------------------------------------------------------------------------------
_REEXPORT_FIX = ("Re-export the model to ONNX (e.g. torch.onnx.export(..., opset_version=17)) and re-upload it; "
                 "if an upload was interrupted, upload the file again.")


def _sniff(head: bytes) -> str:
    """A hint at what a non-ONNX file is, from its first bytes."""
    if head.startswith(b"PK\x03\x04"):
        return " It is a zip archive (a PyTorch .pt/.pth checkpoint or a zipped model?): export it to ONNX first."
    if head.lstrip()[:1] in (b"<", b"{"):
        return " It starts like HTML/XML/JSON text (an error page or a metadata file saved under the model's name?)."
    if head.startswith(b"\x93NUMPY"):
        return " It is a NumPy .npy array."
    if head[:1] == b"\x08":  # field 1 (ir_version), varint: how every ONNX file starts
        return " It starts like an ONNX file, so it is probably truncated (an interrupted upload or download)."
    return ""


def load_model_proto(path: Path) -> onnx.ModelProto:
    """The model without its external weights (those stay on disk)."""
    return onnx.load(str(path), load_external_data=False)


def _read_proto(path: Path, report: ValidationReport) -> Optional[onnx.ModelProto]:
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as err:
        report.error("file_unreadable", f"{path.name} cannot be read: {err.strerror or err}.",
                     "Check the file's permissions and that the download finished.")
        return None
    try:
        model = load_model_proto(path)
    except (DecodeError, ValueError, RuntimeError) as err:
        # Protobuf raises DecodeError for corrupt wire data; onnx.load may wrap it. The reason
        # goes into the report, which the flow turns into a ModelError: nothing is swallowed.
        report.error("not_onnx", f"{path.name} is not a valid ONNX model ({type(err).__name__}: "
                     f"{str(err)[:200]}).{_sniff(head)}", _REEXPORT_FIX)
        return None
    if not model.HasField("graph") or not model.graph.output or model.ir_version <= 0 or not model.opset_import:
        # Arbitrary bytes can decode as an (almost) empty ModelProto; a real one has all of these.
        what = [w for w, missing in (("graph", not model.HasField("graph")),
                                     ("graph outputs", not model.graph.output),
                                     ("IR version", model.ir_version <= 0),
                                     ("opset imports", not model.opset_import)) if missing]
        report.error("not_onnx", f"{path.name} is not a valid ONNX model: it has no {', no '.join(what)}."
                     f"{_sniff(head)}", _REEXPORT_FIX)
        return None
    return model


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto that can hold external data: initializers and attribute tensors, anywhere."""
    graphs = list(_graphs(model.graph))
    for f in model.functions:
        for node in f.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.extend(_graphs(attr.g))
    for g in graphs:
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors


def _dtype_name(elem_type: int) -> str:
    if elem_type == TensorProto.STRING:
        return "string"
    if elem_type == TensorProto.UNDEFINED:
        return "undefined"
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return helper.tensor_dtype_to_string(elem_type).replace("TensorProto.", "").lower()


def _tensor_info(vi: onnx.ValueInfoProto) -> Tuple[TensorInfo, Optional[str]]:
    """(info, problem): problem is set when the value is not a tensor TensorRT can take."""
    kind = vi.type.WhichOneof("value")
    if kind != "tensor_type":
        return TensorInfo(vi.name, kind or "undefined", None, []), f"is a {kind or 'typeless'} value, not a tensor"
    tt = vi.type.tensor_type
    dtype = _dtype_name(tt.elem_type)
    if not tt.HasField("shape"):
        return TensorInfo(vi.name, dtype, None, []), None
    shape: List[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value") and d.dim_value >= 0:
            shape.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            shape.append(d.dim_param)
        else:
            shape.append(None)
    dynamic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
    return TensorInfo(vi.name, dtype, shape, dynamic), None


def model_io(model: onnx.ModelProto) -> Tuple[List[TensorInfo], List[TensorInfo]]:
    """Graph inputs (initializers listed as inputs by old exporters left out) and outputs."""
    inits = {t.name for t in model.graph.initializer} | {t.values.name for t in model.graph.sparse_initializer}
    inputs = [_tensor_info(vi)[0] for vi in model.graph.input if vi.name not in inits]
    outputs = [_tensor_info(vi)[0] for vi in model.graph.output]
    return inputs, outputs


# ---- checks -------------------------------------------------------------------------------------
def _check_versions(model: onnx.ModelProto, support: TrtOnnxSupport, report: ValidationReport) -> None:
    trt = report.trt_version
    if model.ir_version > support.max_ir:
        report.error(
            "ir_version_unsupported",
            f"ONNX IR version {model.ir_version} is newer than TensorRT {trt}'s parser reads "
            f"(IR <= {support.max_ir}, ONNX {support.onnx_release}).",
            f"Export with an ONNX release <= {support.onnx_release}, or, when the model uses no newer IR feature, "
            f"lower the number: m = onnx.load(p); m.ir_version = {support.max_ir}; onnx.save(m, p).")
    default = report.opsets.get("ai.onnx")
    if default is None:
        report.error("opset_missing", "the model imports no ai.onnx opset; TensorRT parses only standard ONNX operators.",
                     _REEXPORT_FIX)
    elif default > support.max_opset:
        report.error(
            "opset_unsupported",
            f"ai.onnx opset {default} is newer than TensorRT {trt} supports (opset {support.min_opset} to "
            f"{support.max_opset}).",
            f"Re-export with opset_version={support.max_opset} (torch.onnx.export(..., opset_version="
            f"{support.max_opset})) or convert it: onnx.version_converter.convert_version(model, {support.max_opset}); "
            f"or target a newer TensorRT.")
    elif default < support.min_opset:
        report.warn("opset_old", f"ai.onnx opset {default} is older than TensorRT {trt} officially supports "
                    f"(>= {support.min_opset}); the parser does not guarantee it works.",
                    f"Re-export with opset {support.max_opset}, or onnx.version_converter.convert_version(model, "
                    f"{support.max_opset}).")


def _is_absolute(location: str) -> bool:
    return (location.startswith(("/", "\\")) or PurePosixPath(location).is_absolute()
            or bool(PureWindowsPath(location).drive))


def _names(names: List[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _expected_bytes(t: onnx.TensorProto) -> Optional[int]:
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    if t.data_type in (TensorProto.STRING,):
        return None
    if t.data_type in getattr(helper, "_PACKED_4BIT_TYPES", ()):  # int4/uint4/float4: two per byte
        return (math.prod(t.dims) + 1) // 2
    return math.prod(t.dims) * itemsize


def _check_external_data(model: onnx.ModelProto, model_path: Path, package_root: Path,
                         report: ValidationReport) -> bool:
    """Every external-data entry names a file inside the package that holds its bytes. Returns ok."""
    root = package_root.resolve()
    base = model_path.parent
    problems: Dict[Tuple[str, str], List[str]] = {}  # (code, location) -> tensor names
    details: Dict[Tuple[str, str], str] = {}
    sizes: Dict[str, int] = {}
    for t in _all_tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in t.external_data}
        loc = entries.get("location", "")
        try:
            offset = int(entries.get("offset") or 0)
            length = int(entries["length"]) if entries.get("length") else None
        except ValueError:
            problems.setdefault(("external_data_bad_entry", loc), []).append(t.name)
            details[("external_data_bad_entry", loc)] = "its offset or length is not an integer"
            continue
        if not loc:
            problems.setdefault(("external_data_bad_entry", ""), []).append(t.name)
            details[("external_data_bad_entry", "")] = "it has no location"
            continue
        if _is_absolute(loc):
            problems.setdefault(("external_data_absolute", loc), []).append(t.name)
            continue
        if ".." in PurePosixPath(loc.replace("\\", "/")).parts:
            problems.setdefault(("external_data_outside_package", loc), []).append(t.name)
            continue
        full = (base / loc).resolve()
        if full != root and root not in full.parents:  # a symbolic link that leads out
            problems.setdefault(("external_data_outside_package", loc), []).append(t.name)
            continue
        if not full.is_file():
            problems.setdefault(("external_data_missing", loc), []).append(t.name)
            continue
        size = sizes.setdefault(loc, full.stat().st_size)
        need = offset + (length if length is not None else (_expected_bytes(t) or 0))
        if need > size:
            key = ("external_data_truncated", loc)
            problems.setdefault(key, []).append(t.name)
            details.setdefault(key, f"needs bytes up to {need}, the file has {size}")
    report.external_files = sorted(sizes)
    report.external_data_bytes = sum(sizes.values())
    pkg_fix = ("Save the weights beside the model with a relative location inside the package, e.g. "
               "onnx.save_model(model, 'model.onnx', save_as_external_data=True, location='model.onnx.data'), "
               "and upload both files together.")
    for (code, loc), tensors in sorted(problems.items()):
        what = f"tensor{'s' if len(tensors) > 1 else ''} {_names(tensors)}"
        if code == "external_data_absolute":
            report.error(code, f"{what} point at external data by the absolute path {loc!r}; "
                         f"a model package must carry its weights inside its folder.", pkg_fix)
        elif code == "external_data_outside_package":
            report.error(code, f"{what} read external data from {loc!r}, which lies outside the model package "
                         f"folder ({root.name}/).", pkg_fix)
        elif code == "external_data_missing":
            report.error(code, f"{what} read external data from {loc!r}, which is not in the package.",
                         f"Upload {loc!r} beside the model (same folder, same name), or re-save the model with "
                         f"its weights inside: onnx.save_model(model, p, save_as_external_data=False).")
        elif code == "external_data_truncated":
            report.error(code, f"external data file {loc!r} is too short for {what}: {details[(code, loc)]}.",
                         f"Upload {loc!r} again (the copy is incomplete), or re-export the model.")
        else:
            report.error(code, f"{what}: external data entry for {loc or 'an unnamed file'!r} is malformed "
                         f"({details[(code, loc)]}).", _REEXPORT_FIX)
    return not problems


def _run_checker(model_path: Path, report: ValidationReport) -> None:
    try:
        # On the path, not a loaded proto: external data is checked in place and models over
        # protobuf's 2 GiB limit still work.
        onnx.checker.check_model(str(model_path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        text = " ".join(str(err).split())
        if len(text) > 600:
            text = text[:600] + " …"
        report.error("checker_failed", f"onnx.checker (full check with shape inference) rejects the model: {text}",
                     "Re-export the model with a current exporter and verify it with "
                     "python -c \"import onnx; onnx.checker.check_model('model.onnx', full_check=True)\".")


def _check_dtypes(report: ValidationReport, model: onnx.ModelProto, support: TrtOnnxSupport) -> None:
    inits = {t.name for t in model.graph.initializer}
    for role, values in (("input", [v for v in model.graph.input if v.name not in inits]),
                         ("output", list(model.graph.output))):
        for vi in values:
            info, problem = _tensor_info(vi)
            if problem:
                report.error("unsupported_io_type", f"{role} {vi.name!r} {problem}; TensorRT engines take tensors only.",
                             "Move sequence/map/optional handling out of the model (pre- or post-processing).")
            elif info.dtype in ("string", "complex64", "complex128", "undefined"):
                report.error("unsupported_io_dtype", f"{role} {vi.name!r} has dtype {info.dtype}, which TensorRT cannot "
                             f"take.", "Do tokenisation/string handling outside the model, and feed numeric tensors.")
            elif info.dtype == "float64":
                report.warn("float64_io", f"{role} {vi.name!r} is float64; TensorRT has no float64 and casts to "
                            f"float32 where it can.", "Export the model in float32.")
            elif info.dtype == "int64" and _version_tuple(support.version) < (10,):
                report.warn("int64_io", f"{role} {vi.name!r} is int64; TensorRT {report.trt_version} narrows it to "
                            f"int32 (values must fit in int32).")
            if role == "input" and info.shape is None and not problem:
                report.error("input_rank_unknown", f"input {vi.name!r} declares no shape; TensorRT needs every input's "
                             f"rank.", "Export with a fixed rank (mark only some axes dynamic).")


def _operators(model: onnx.ModelProto, support: TrtOnnxSupport, report: ValidationReport) -> None:
    counts: Counter = Counter()
    local = {(f.domain, f.name) for f in model.functions}
    used_local: List[str] = []
    custom: List[str] = []
    for g in _graphs(model.graph):
        for node in g.node:
            domain = node.domain or ""
            key = node.op_type if domain in ("", "ai.onnx") else f"{domain}:{node.op_type}"
            counts[key] += 1
            if (domain, node.op_type) in local:
                used_local.append(key)
            elif domain not in ("", "ai.onnx"):
                custom.append(key)
    report.operators = dict(sorted(counts.items()))
    unsupported = sorted(k for k in counts if k in support.unsupported_ops)
    if unsupported:
        report.warn("unsupported_operator",
                    f"TensorRT {report.trt_version}'s ONNX parser has no importer for {', '.join(unsupported)} "
                    f"(onnx-tensorrt operators.md lists them 'N'; that list does not cover per-op restrictions): the "
                    f"build fails unless a plugin of that name is registered.",
                    "Replace the operators at export time, or move that part out of the model.")
    if custom:
        names = sorted(set(custom))
        report.warn("custom_operator", f"operators from non-standard domains ({', '.join(names)}) need TensorRT "
                    f"plugins of the same name.", "Export with standard ONNX operators only (e.g. disable "
                    "ONNX Runtime-specific fusions), or provide the plugins on the GPU worker.")
    if used_local and not support.local_functions:
        report.error("local_functions_unsupported",
                     f"the model calls model-local functions ({', '.join(sorted(set(used_local)))}), which TensorRT "
                     f"{report.trt_version}'s parser cannot import (LocalFunctionImporter arrived in 10.0).",
                     "Inline them: model = onnx.inliner.inline_local_functions(model); onnx.save(model, p).")


def _parameters(model: onnx.ModelProto) -> int:
    total = 0
    for g in _graphs(model.graph):
        total += sum(math.prod(t.dims) for t in g.initializer)
        total += sum(math.prod(sp.dims) for sp in g.sparse_initializer)
    return total


# ---- profiles -----------------------------------------------------------------------------------
def _range(rng) -> ShapeRangeDict:
    if isinstance(rng, dict):
        return {k: [int(x) for x in rng[k]] for k in ("min", "opt", "max")}
    return {"min": list(rng.min), "opt": list(rng.opt), "max": list(rng.max)}


def _example_range(t: TensorInfo, spec: ModelSpec) -> ShapeRangeDict:
    """A plausible min/opt/max for the fix text (the user adjusts it)."""
    b = spec.build
    out: ShapeRangeDict = {"min": [], "opt": [], "max": []}
    image_like = t.shape is not None and len(t.shape) == 4
    for i, d in enumerate(t.shape or []):
        if isinstance(d, int):
            trio = (d, d, d)
        elif i == 0:
            trio = (1, min(b.default_opt_batch, b.default_max_batch), b.default_max_batch)
        elif image_like and i >= 2:
            trio = (64, 224, 512)
        else:
            trio = (1, 128, 512)
        for k, v in zip(("min", "opt", "max"), trio):
            out[k].append(v)
    return out


def profile_yaml(ranges: Dict[str, ShapeRangeDict]) -> str:
    """The ``profiles:`` block of trtflow.yaml holding one profile."""
    lines = ["profiles:"]
    for i, (name, r) in enumerate(ranges.items()):
        lead = "  - " if i == 0 else "    "
        key = name if name.replace("_", "").replace("-", "").isalnum() else f'"{name}"'
        lines.append(f"{lead}{key}: {{min: {r['min']}, opt: {r['opt']}, max: {r['max']}}}")
    return "\n".join(lines)


def resolve_profiles(inputs: List[TensorInfo], spec: ModelSpec, report: ValidationReport) -> List[ResolvedProfile]:
    """The spec's profiles checked against the inputs, with default batch ranges filled in.

    Returns one dict per profile (one when the spec has none): input name -> {"min", "opt", "max"}
    for every input, static ones too (min = opt = max = its shape), as
    tasks/gpu/build.py resolve them. Problems go to ``report`` (errors and warnings); inputs that
    cannot be resolved are left out.
    """
    dynamic = [t for t in inputs if t.dynamic_dims]
    by_name = {t.name: t for t in inputs}
    spec_profiles = [dict(p) for p in spec.profiles] or [{}]
    example = profile_yaml({t.name: _example_range(t, spec) for t in dynamic})
    b = spec.build
    resolved: List[ResolvedProfile] = []
    defaulted: Dict[str, ShapeRangeDict] = {}
    followed: List[Tuple[int, str, ShapeRangeDict]] = []
    for k, prof in enumerate(spec_profiles):
        where = f"profile {k} of {SPEC_FILENAME}"
        out: ResolvedProfile = {}
        for name, rng in prof.items():
            r = _range(rng)
            t = by_name.get(name)
            if t is None:
                report.error("profile_unknown_input", f"{where} names input {name!r}, which the model does not have "
                             f"(inputs: {', '.join(repr(n) for n in by_name) or 'none'}).",
                             f"Rename {name!r} in {SPEC_FILENAME} to one of the model's inputs.")
                continue
            if t.shape is None:
                continue  # reported as input_rank_unknown
            if len(r["min"]) != len(t.shape):
                report.error("profile_rank_mismatch", f"{where} gives input {name!r} rank {len(r['min'])} "
                             f"({r['opt']}), but the model's input {t.shape_text()} has rank {len(t.shape)}.",
                             f"Give {len(t.shape)} sizes per min/opt/max for {name!r}.")
                continue
            clashes = [i for i, d in enumerate(t.shape) if isinstance(d, int)
                       and any(r[key][i] != d for key in ("min", "opt", "max"))]
            if clashes:
                report.error("profile_static_dim_mismatch",
                             f"{where} sets input {name!r} dim(s) {clashes} to sizes other than the model's fixed "
                             f"{[t.shape[i] for i in clashes]} (model shape {t.shape_text()}; profile min {r['min']}, "
                             f"opt {r['opt']}, max {r['max']}).",
                             "Use the fixed sizes for those dims, or re-export the model with them dynamic.")
                continue
            out[name] = r
        batch_from = next((out[n] for n in out if 0 in by_name[n].dynamic_dims), None)
        for t in dynamic:
            if t.name in out or t.shape is None:
                continue
            if t.name in prof:
                continue  # named but rejected above
            if t.dynamic_dims == [0]:
                # Only the batch is dynamic: take it from the other inputs of this profile (their
                # batch must agree) or from the build defaults.
                if batch_from is not None:
                    trio = [batch_from[key][0] for key in ("min", "opt", "max")]
                else:
                    trio = [1, min(b.default_opt_batch, b.default_max_batch), b.default_max_batch]
                r = {key: [v] + [int(d) for d in t.shape[1:]] for key, v in zip(("min", "opt", "max"), trio)}
                out[t.name] = r
                if batch_from is None:
                    defaulted.setdefault(t.name, r)
                else:
                    followed.append((k, t.name, r))
            else:
                dims = ", ".join(f"{i} ({t.shape[i] if t.shape[i] is not None else '?'})"
                                 for i in t.dynamic_dims if i != 0)
                besides = " besides the batch" if 0 in t.dynamic_dims else ""
                if spec.profiles:
                    gap = f"profile {k} of {SPEC_FILENAME} does not name it"
                else:
                    gap = f"no optimisation profile covers it ({SPEC_FILENAME} has none)"
                report.error("dynamic_dim_without_profile",
                             f"input {t.name!r} {t.shape_text()} has dynamic dim(s) {dims}{besides}, and {gap}; "
                             f"TensorRT needs min/opt/max sizes for every dynamic dim other than the batch.",
                             f"Add an optimisation profile to {SPEC_FILENAME} beside the model (use the smallest, "
                             f"typical and largest sizes you will run):\n{example}")
        for t in inputs:
            if not t.dynamic_dims and t.shape is not None and t.name not in out and t.name not in prof:
                static = [int(d) for d in t.shape]  # type: ignore[arg-type]
                out[t.name] = {"min": list(static), "opt": list(static), "max": list(static)}
        _check_shared_dims(out, by_name, k, report)
        resolved.append({t.name: out[t.name] for t in inputs if t.name in out})  # in input order
    if defaulted:
        names = list(defaulted)
        first = defaulted[names[0]]
        report.warn("default_batch_profile",
                    f"input{'s' if len(names) > 1 else ''} {_names(names)} {'have' if len(names) > 1 else 'has'} a "
                    f"dynamic batch (dim 0) and no profile: using batch min/opt/max "
                    f"{first['min'][0]}/{first['opt'][0]}/{first['max'][0]} (build.default_opt_batch="
                    f"{b.default_opt_batch}, build.default_max_batch={b.default_max_batch}).",
                    f"To choose the sizes, add to {SPEC_FILENAME}:\n" + profile_yaml(defaulted))
    for k, name, r in followed:
        report.warn("default_batch_profile",
                    f"profile {k} does not name input {name!r}; its dynamic batch follows the profile's other "
                    f"inputs: min/opt/max {r['min'][0]}/{r['opt'][0]}/{r['max'][0]}.",
                    f"Name {name!r} in profile {k} of {SPEC_FILENAME} to choose otherwise.")
    return resolved


def _check_shared_dims(prof: ResolvedProfile, by_name: Dict[str, TensorInfo], k: int, report: ValidationReport) -> None:
    """A dim_param used by several inputs (e.g. the batch 'N') should get one range per profile."""
    seen: Dict[str, Tuple[str, Tuple[int, int, int]]] = {}
    for name, r in prof.items():
        for i, d in enumerate(by_name[name].shape or []):
            if not isinstance(d, str):
                continue
            trio = (r["min"][i], r["opt"][i], r["max"][i])
            if d in seen and seen[d][1] != trio:
                other, o = seen[d]
                report.warn("profile_inconsistent_dims",
                            f"profile {k}: dim {d!r} is {o[0]}/{o[1]}/{o[2]} for {other!r} but "
                            f"{trio[0]}/{trio[1]}/{trio[2]} for {name!r}; the model says they are the same size.",
                            "Give every input the same min/opt/max for a shared dim.")
            seen.setdefault(d, (name, trio))


# ---- entry points -------------------------------------------------------------------------------
def validate_model(model_path: Path, spec: Optional[ModelSpec] = None, package_root: Optional[Path] = None,
                   trt_version: str = DEFAULT_TRT_VERSION) -> ValidationReport:
    """Validate ``model_path`` for ``trt_version`` under ``spec``; never raises for model problems.

    Args:
        model_path: the .onnx file (its external data is read in place, never loaded).
        spec: the package's spec (None = defaults).
        package_root: folder the external data must stay inside (None = the model's folder).
        trt_version: target TensorRT, e.g. "8.6", "10.3", "8.6.1.6".
    """
    spec = spec if spec is not None else ModelSpec()
    path = Path(model_path)
    report = ValidationReport(model_path=str(path), trt_version=str(trt_version))
    if not path.is_file():
        report.error("file_missing", f"{path} does not exist or is not a file.", "Check the model path and the upload.")
        return report
    report.model_bytes = path.stat().st_size
    model = _read_proto(path, report)
    if model is None:
        return report
    report.ir_version = int(model.ir_version)
    report.opsets = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
    report.producer = " ".join(p for p in (model.producer_name, model.producer_version) if p)
    support, note = tensorrt_support(trt_version)
    if note:
        report.warn("unknown_trt_version", note)
    _check_versions(model, support, report)
    root = Path(package_root) if package_root is not None else path.parent
    if _check_external_data(model, path, root, report):
        _run_checker(path, report)
    else:
        report.warn("checker_skipped", "onnx.checker did not run because the external data is unusable; fix that "
                    "first and validate again.")
    report.inputs, report.outputs = model_io(model)
    _check_dtypes(report, model, support)
    report.profiles = resolve_profiles(report.inputs, spec, report)
    _operators(model, support, report)
    report.parameters = _parameters(model)
    return report


@task(name="validate-model", cache_policy=NO_CACHE)  # re-read the file every run: same path, new bytes
def validate_task(model_path: Path, spec: Optional[ModelSpec] = None, package_root: Optional[Path] = None,
                  trt_version: str = DEFAULT_TRT_VERSION) -> ValidationReport:
    """Prefect task: ``validate_model`` with the report logged line by line."""
    logger = get_run_logger()
    report = validate_model(model_path, spec, package_root, trt_version)
    for line in report.summary_lines():
        logger.info(line)
    return report
