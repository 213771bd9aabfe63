"""Validation: is this ONNX file something the target TensorRT can build, given its spec?

``validate_model`` is pure: it reads the model (never its weights into memory), runs
``onnx.checker`` (full check, with shape inference) and the checks TensorRT needs beyond it, and
returns a ``ValidationReport``. Problems with the model or spec never raise: they are ``errors``
(which block a conversion) or ``warnings`` (which do not), each with a fix. The flow turns a
failing report into a ``ModelError`` (``report.raise_for_errors()``).

The report also carries the *resolved* optimisation profiles: the spec's profiles with a default
batch range filled in for inputs whose only dynamic dim is the batch (dim 0). Build, calibration
and eval inputs all use these.

One concern per module: reading.py (the proto), checks.py (IR/opset/external data/dtypes/operators
against the target's ``Caps``), profiles.py, report.py (the data), render.py (text for people).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import onnx

from tasks.gpu.compat import Caps, caps_for_version
from tasks.shapes import ResolvedProfile, ShapeRange, TensorInfo, model_io
from tasks.spec import ModelSpec
from tasks.validate.checks import (_check_dtypes, _check_external_data, _check_versions, _operators, _parameters,
                                   _run_checker)
from tasks.validate.profiles import profile_yaml, resolve_profiles
from tasks.validate.reading import _read_proto, load_model_proto
from tasks.validate.render import report_lines, report_markdown
from tasks.validate.report import Issue, ValidationReport

DEFAULT_TRT_VERSION = "8.6"  # the target when the caller names none (the H100 workers' TensorRT)

__all__ = ["DEFAULT_TRT_VERSION", "Issue", "ResolvedProfile", "ShapeRange", "TensorInfo", "ValidationReport",
           "load_model_proto", "model_io", "profile_yaml", "report_lines", "report_markdown", "resolve_profiles",
           "target_caps", "validate_model"]


def target_caps(caps: Union[Caps, str, None] = None, trt_version: Optional[str] = None,
                target: Optional[str] = None) -> Caps:
    """The target's Caps from whatever the caller has: Caps, a version string, or nothing (8.6)."""
    if isinstance(caps, Caps):
        return caps
    if isinstance(caps, dict):
        return Caps.from_dict(caps)
    version = caps or trt_version or target or DEFAULT_TRT_VERSION
    return caps_for_version(str(version))


def validate_model(model_path: Path, spec: Optional[ModelSpec] = None, package_root: Optional[Path] = None,
                   caps: Union[Caps, str, None] = None, *, model: Optional[onnx.ModelProto] = None,
                   trt_version: Optional[str] = None, target: Optional[str] = None) -> ValidationReport:
    """Validate ``model_path`` for the target TensorRT ``caps`` under ``spec``; never raises for model problems.

    Args:
        model_path: the .onnx file (its external data is read in place, never loaded).
        spec: the package's spec (None = defaults).
        package_root: folder the external data must stay inside (None = the model's folder).
        caps: the target's capabilities (a probe's ``Caps``, or ``caps_for_version("10.3")``);
            None = TensorRT 8.6. The report's ``trt_version`` says which version it judged against.
        model: the already-loaded proto (without external data), so the file is parsed once.
        trt_version, target: SHIM, to remove once callers pass ``caps``: the target's version string.
    """
    spec = spec if spec is not None else ModelSpec()
    caps = target_caps(caps, trt_version, target)
    path = Path(model_path)
    report = ValidationReport(model_path=str(path), trt_version=caps.version, parser_rules=caps.parser_table)
    if not path.is_file():
        report.error("file_missing", f"{path} does not exist or is not a file.", "Check the model path and the upload.")
        return report
    report.model_bytes = path.stat().st_size
    model = model if model is not None else _read_proto(path, report)
    if model is None:
        return report
    _record_header(model, report)
    if caps.parser_note:
        report.warn("unknown_trt_version", caps.parser_note)
    _check_versions(model, caps, report)
    root = Path(package_root) if package_root is not None else path.parent
    if _check_external_data(model, path, root, report):
        _run_checker(path, report)
    else:
        report.warn("checker_skipped", "onnx.checker did not run because the external data is unusable; fix that "
                    "first and validate again.")
    io = model_io(model)
    report.inputs, report.outputs = io.inputs, io.outputs
    _check_dtypes(report, model, caps)
    report.profiles = resolve_profiles(report.inputs, spec, report)
    _operators(model, caps, report)
    report.parameters = _parameters(model)
    return report


def _record_header(model: Any, report: ValidationReport) -> None:
    report.ir_version = int(model.ir_version)
    report.opsets = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
    report.producer = " ".join(p for p in (model.producer_name, model.producer_version) if p)
