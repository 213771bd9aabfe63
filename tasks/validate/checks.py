"""The checks TensorRT needs beyond onnx.checker, each writing errors/warnings into the report.

Every limit of the target's parser comes from its ``Caps`` (tasks/gpu/compat.py).
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper

from tasks.gpu.compat import Caps, parser_unsupported_ops
from tasks.shapes import tensor_info
from tasks.validate.reading import _REEXPORT_FIX, _all_tensors, _graphs
from tasks.validate.report import ValidationReport

def _check_versions(model: onnx.ModelProto, caps: Caps, report: ValidationReport) -> None:
    """IR or opset newer than the parser: an error only where tasks/adapt.py cannot rewrite it (what
    convert-model does after validation), else a warning saying what adaptation will do."""
    from tasks import adapt
    from tasks.errors import ModelError

    trt = report.trt_version
    if model.ir_version > caps.parser_max_ir:
        blockers = [what for ir, what in adapt.ir_features(model) if ir > caps.parser_max_ir]
        if blockers:
            report.error(
                "ir_version_unsupported",
                f"ONNX IR version {model.ir_version} is newer than TensorRT {trt}'s parser reads "
                f"(IR <= {caps.parser_max_ir}, ONNX {caps.parser_onnx_release}), and the model uses {blockers[0]}, "
                f"which needs the newer IR.",
                f"Export with an ONNX release <= {caps.parser_onnx_release} without {blockers[0].split(' (')[0]}, "
                f"or target a newer TensorRT.")
        else:
            report.warn("ir_version_lowered",
                        f"ONNX IR version {model.ir_version} is newer than TensorRT {trt}'s parser reads "
                        f"(IR <= {caps.parser_max_ir}); the model uses no newer IR feature, so the conversion "
                        f"lowers the number to {caps.parser_max_ir} (recorded in the manifest's model.adaptations).",
                        f"Nothing to do; to skip the rewrite, export with an ONNX release <= "
                        f"{caps.parser_onnx_release}.")
    default = report.opsets.get("ai.onnx")
    if default is None:
        report.error("opset_missing", "the model imports no ai.onnx opset; TensorRT parses only standard ONNX operators.",
                     _REEXPORT_FIX)
    elif default > caps.parser_max_opset:
        try:
            adapt.convert_opset(model, caps)  # returns a converted copy; the model here stays as it is
        except ModelError as err:
            report.error("opset_unsupported", err.message, err.fix)
        else:
            report.warn("opset_converted",
                        f"ai.onnx opset {default} is newer than TensorRT {trt} supports (opset {caps.parser_min_opset} "
                        f"to {caps.parser_max_opset}); onnx.version_converter converts it to {caps.parser_max_opset} "
                        f"before the build (recorded in the manifest's model.adaptations).",
                        f"Nothing to do; to skip the rewrite, re-export with opset_version={caps.parser_max_opset}.")
    elif default < caps.parser_min_opset:
        report.warn("opset_old", f"ai.onnx opset {default} is older than TensorRT {trt} officially supports "
                    f"(>= {caps.parser_min_opset}); the parser does not guarantee it works.",
                    f"Re-export with opset {caps.parser_max_opset}, or onnx.version_converter.convert_version(model, "
                    f"{caps.parser_max_opset}).")


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
        if offset < 0 or (length is not None and length < 0):
            # A negative offset would make a reader seek from the file's end, a negative length read
            # everything: refuse both here, before any reader (onnxruntime, TensorRT) sees them.
            problems.setdefault(("external_data_bad_entry", loc), []).append(t.name)
            details[("external_data_bad_entry", loc)] = (f"its offset ({offset}) or length ({length}) is negative; "
                                                         "both must be >= 0")
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


def _check_dtypes(report: ValidationReport, model: onnx.ModelProto, caps: Caps) -> None:
    inits = {t.name for t in model.graph.initializer}
    for role, values in (("input", [v for v in model.graph.input if v.name not in inits]),
                         ("output", list(model.graph.output))):
        for vi in values:
            info, problem = tensor_info(vi)
            if problem:
                report.error("unsupported_io_type", f"{role} {vi.name!r} {problem}; TensorRT engines take tensors only.",
                             "Move sequence/map/optional handling out of the model (pre- or post-processing).")
            elif info.dtype in ("string", "complex64", "complex128", "undefined"):
                report.error("unsupported_io_dtype", f"{role} {vi.name!r} has dtype {info.dtype}, which TensorRT cannot "
                             f"take.", "Do tokenisation/string handling outside the model, and feed numeric tensors.")
            elif info.dtype == "float64":
                report.warn("float64_io", f"{role} {vi.name!r} is float64; TensorRT has no float64 and casts to "
                            f"float32 where it can.", "Export the model in float32.")
            elif info.dtype == "int64" and not caps.int64_tensors:
                report.warn("int64_io", f"{role} {vi.name!r} is int64; TensorRT {report.trt_version} narrows it to "
                            f"int32 (values must fit in int32).")
            if role == "input" and info.shape is None and not problem:
                report.error("input_rank_unknown", f"input {vi.name!r} declares no shape; TensorRT needs every input's "
                             f"rank.", "Export with a fixed rank (mark only some axes dynamic).")


def _operators(model: onnx.ModelProto, caps: Caps, report: ValidationReport) -> None:
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
    unsupported_ops = parser_unsupported_ops(caps)
    unsupported = sorted(k for k in counts if k in unsupported_ops)
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
    if used_local and not caps.parser_local_functions:
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

