"""The fix that matches a failure: one table of TensorRT messages, each with its limit and remedy.

A parser or builder failure used to end with one generic line ("loosen the tolerances ... or fix
the error named") whatever happened. Here each known TensorRT message (exact text from
onnx-tensorrt and TensorRT 8.6/10 logs, as users reported them) maps to the limit that was hit,
the change that works, and, where known, the TensorRT version that lifts the limit. "Loosen the
tolerances" is the answer for a failed accuracy gate only.

Python 3.9-compatible and stdlib-only: tasks/gpu imports it under the TensorRT interpreter.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, Optional, Pattern, Sequence, Tuple, Union

PARSER = "parser"
BUILDER = "builder"
ACCURACY = "accuracy"
# Every parser refusal's message holds this (tasks/gpu/build.py): the flow retries those sanitised.
PARSER_REJECTED = "ONNX parser rejected"


@dataclass(frozen=True)
class MatchedFix:
    """The remedy for one failure: ``code`` is stable for programs, ``fix`` is for people."""

    code: str
    fix: str
    limit: str
    lifted_in: Optional[str] = None  # the TensorRT version that removes the limit, where known

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Rule:
    code: str
    stages: Tuple[str, ...]
    pattern: Pattern
    limit: str
    fix: str  # str.format template: {node} {op} {trt} {precision} {what} {lift}
    lifted_in: Optional[str] = None


def _rule(code: str, stages: Tuple[str, ...], pattern: str, limit: str, fix: str,
          lifted_in: Optional[str] = None) -> _Rule:
    return _Rule(code, stages, re.compile(pattern, re.IGNORECASE), limit, fix, lifted_in)


_BOTH = (PARSER, BUILDER)

# First match wins: specific messages before general ones. Message sources: onnx-tensorrt's Slice
# importer ("This version of TensorRT does not support dynamic axes.", NVIDIA/TensorRT#3555, #3765;
# tensor axes accepted since onnx-tensorrt 10.3-GA); TopK ("only supports input K as an
# initializer", #2721); the fallback plugin importer ("No importer registered for op: X. Attempting
# to import as plugin." then "Plugin not found, are the plugin name, version, and namespace
# correct?", onnx-tensorrt#800); shapeContext getBounds ("Input dimensions with this name are
# inconsistent", Error Code 4); onnx2trt_utils ("weights outside the range of INT32 was clamped");
# the builder's "Could not find any implementation for node X" (Error Code 10, #3640, #4555).
RULES: Tuple[_Rule, ...] = (
    _rule("dynamic_axes_slice", _BOTH, r"does not support dynamic axes",
          "TensorRT {trt}'s ONNX parser needs a Slice's axes (and steps) as constants",
          "Node {node} (Slice) takes its axes from a computed tensor. Sanitise the model before the build "
          "(constant folding: trtflow's adapt step with sanitise 'always', or `polygraphy surgeon sanitize "
          "--fold-constants`); if the axes really depend on the input, export with constant slice indices.{lift}",
          "10.3"),
    _rule("input_must_be_constant", _BOTH, r"only supports input (?P<what>\w+) as an initializer",
          "TensorRT {trt}'s importer for {op} needs input {what} as a constant",
          "Node {node} ({op}) computes input {what}. Sanitise the model (constant folding) so it becomes an "
          "initializer; if it depends on the input data, export it as a fixed value (e.g. a constant k for TopK)."),
    _rule("plugin_op_not_found", _BOTH,
          r"Plugin not found|getPluginCreator could not find plugin|No importer registered for op: ?(?P<what>[\w.]+)",
          "TensorRT {trt} has no importer for {what} and no plugin of that name is registered",
          "Node {node} ({what}) is not an operator TensorRT {trt} imports (see onnx-tensorrt's docs/operators.md "
          "for this version). Replace it in the export (decompose it into supported ops), or load a plugin "
          "library that implements it; for TensorRT's own plugins (e.g. InstanceNormalization_TRT) the worker "
          "must call trt.init_libnvinfer_plugins(logger, '') before parsing."),
    _rule("shared_dim_inconsistent", _BOTH,
          r"Input dimensions with this name are inconsistent|dimensions that share the same name must be equal",
          "TensorRT takes input dims with the same dim_param as equal, and the profile gives them different sizes",
          "Rename the dims apart before the build (trtflow's adapt step does it from the profiles: "
          "split_shared_dims), or give every dim that shares a name the same min/opt/max in trtflow.yaml."),
    _rule("ir_version_too_new", _BOTH,
          r"newer ir_?version|Unsupported model IR version|IR version \d+ (?:is )?(?:not supported|newer)",
          "TensorRT {trt}'s parser reads ONNX IR up to the release it was built against",
          "Lower the IR number when the model uses no newer IR feature (trtflow's adapt step: lower_ir; by hand: "
          "m.ir_version = 8 for TensorRT 8.6), or export with an older onnx package.{lift}", "10.0 (IR 10)"),
    _rule("opset_too_new", _BOTH, r"opset(?: version)?\s*\d+.*(?:not supported|unsupported|newer|exceeds)",
          "TensorRT {trt} supports ai.onnx opsets up to a maximum (8.6: 17, 10.0: 20)",
          "Convert the model to the supported opset with onnx.version_converter (trtflow's adapt step: "
          "convert_opset) or re-export with opset_version=17.{lift}", "10.0 (opset 20)"),
    _rule("int32_clamped", _BOTH, r"outside the range of INT32 was clamped",
          "TensorRT {trt} stores INT64 weights as INT32",
          "Values beyond int32 were clamped: harmless for Slice ends such as INT64_MAX; for real int64 data "
          "(large ids, hashes), keep them within int32 in the export.{lift}", "10.0 (INT64 tensors)"),
    _rule("gpu_out_of_memory", (BUILDER,),
          r"out of memory|Requested amount of GPU memory|cudaErrorMemoryAllocation|OutOfMemory",
          "the build needed more GPU memory than was free",
          "Lower build.workspace_mib in trtflow.yaml or the profiles' max shapes, or build on a GPU with more "
          "free memory (another process may hold it)."),
    _rule("workspace_too_small", (BUILDER,),
          r"insufficient workspace|do not have sufficient workspace memory|increasing workspace size",
          "build.workspace_mib limits the tactics TensorRT may try",
          "Raise build.workspace_mib in trtflow.yaml (e.g. to 8192) so the faster tactics fit."),
    _rule("no_implementation", (BUILDER,), r"Could not find any implementation for node (?P<what>.+?)\.?\)?$",
          "TensorRT {trt} has no {precision} kernel for a fused layer",
          "Keep the layer {what} in float: add its ONNX node names to calibration.exclude_nodes (int8), or add "
          "fp32 to precisions; for INT8 Q/DQ graphs, TensorRT 10 fixed several of these fusions.{lift}", "10.0"),
    _rule("build_timeout", (BUILDER,), r"timed out|timeout|deadline exceeded|killed after \d+",
          "the build ran past build.timeout_s",
          "Raise build.timeout_s in trtflow.yaml, or lower build.optimization_level (fewer tactics timed) or "
          "the profiles' ranges; a warm timing cache (build.timing_cache: true) makes rebuilds faster."),
)

_GENERIC = {
    PARSER: MatchedFix("parser_rejected", "TensorRT {trt}'s ONNX parser rejected node {node} ({op}). Check the op "
                                          "against onnx-tensorrt's docs/operators.md for this version (its "
                                          "restrictions column); sanitise the model (constant folding) and retry, "
                                          "or replace the op in the export.",
                       "an operator or attribute this parser does not import"),
    BUILDER: MatchedFix("build_failed", "TensorRT {trt} failed to build the engine; the first error in build.log "
                                        "names the layer. Try fp32 for that precision, or keep the named layer in "
                                        "float (calibration.exclude_nodes for int8).",
                        "a layer or shape the builder could not implement"),
}


class _Blank(dict):
    """str.format_map that leaves an unknown key as '?' (a fix text never raises)."""

    def __missing__(self, key: str) -> str:
        return "?"


def _fill(template: str, context: Dict[str, str]) -> str:
    return template.format_map(_Blank(context)).replace("node '?' (?)", "(unnamed node)")


def match_fix(stage: str, text: Union[str, Iterable[str]], node: str = "", op: str = "",
              trt_version: str = "", precision: str = "") -> MatchedFix:
    """The fix for a failure at ``stage`` (parser or builder) whose TensorRT message is ``text``."""
    if stage not in (PARSER, BUILDER):
        raise ValueError(f"stage must be {PARSER!r} or {BUILDER!r} (accuracy gates: fix_for_accuracy_failure)")
    lines = [text] if isinstance(text, str) else list(text)
    context = {"node": repr(node) if node else "'?'", "op": op or "?", "trt": trt_version or "this",
               "precision": precision or "the requested precision", "what": op or "?", "lift": ""}
    for rule in RULES:
        if stage not in rule.stages:
            continue
        for line in lines:
            found = rule.pattern.search(line)
            if found is None:
                continue
            groups = {k: v for k, v in found.groupdict().items() if v}
            ctx = dict(context, **groups)
            if rule.lifted_in:
                ctx["lift"] = f" TensorRT {rule.lifted_in} lifts this limit."
            return MatchedFix(rule.code, _fill(rule.fix, ctx), _fill(rule.limit, ctx), rule.lifted_in)
    generic = _GENERIC[stage]
    return MatchedFix(generic.code, _fill(generic.fix, context), generic.limit)


def fix_for_parser_error(desc: str, node_name: str = "", node_op: str = "", trt_version: str = "") -> MatchedFix:
    """One ONNX parser error (tasks.gpu.compat.parser_error_details gives desc/node_name/node_op)."""
    return match_fix(PARSER, desc, node=node_name, op=node_op, trt_version=trt_version)


def fix_for_build_failure(log_lines: Union[str, Sequence[str]], trt_version: str = "",
                          precision: str = "") -> MatchedFix:
    """A failed engine build, judged by the TensorRT errors it logged (newest last)."""
    return match_fix(BUILDER, log_lines, trt_version=trt_version, precision=precision)


def fix_for_accuracy_failure(precision: str, failed: Sequence[str] = ()) -> MatchedFix:
    """A built engine whose outputs missed the gate: the one place where loosening tolerances is advice."""
    what = ", ".join(failed) if failed else "the gate"
    fp32 = "" if precision == "fp32" else " or add fp32 to precisions,"
    calib = (" calibrate on more representative images (calibration/ in the package) or keep sensitive layers "
             "in float (calibration.exclude_nodes / exclude_op_types),") if precision == "int8" else ""
    return MatchedFix("accuracy_gate_failed",
                      f"The {precision} engine missed {what} against ONNX Runtime.{calib}{fp32} or, if the "
                      f"measured numbers are acceptable for your use, loosen tolerances.{precision} in trtflow.yaml.",
                      f"tolerances.{precision}")


def fix_for_parser_details(errors: Sequence[Dict[str, Any]], log_lines: Sequence[str] = (),
                           trt_version: str = "") -> MatchedFix:
    """The fix for a rejected parse from tasks.gpu.compat.parser_error_details (dicts with desc,
    node_name, node_op) and the logger's error lines: the first error a specific rule matches
    (TensorRT often logs the telling line, e.g. the Slice assertion, beside a vaguer parser error),
    else the generic parser fix for the first error's node."""
    first: Optional[MatchedFix] = None
    for err in errors:
        desc = str(err.get("desc") or "")
        fix = fix_for_parser_error(desc, str(err.get("node_name") or ""), str(err.get("node_op") or ""), trt_version)
        if fix.code != _GENERIC[PARSER].code:
            return fix
        first = first or fix
    head = errors[0] if errors else {}
    # all lines at once: rules are tried in table order, so the Slice assertion beats an INT64 warning
    fix = match_fix(PARSER, list(log_lines), node=str(head.get("node_name") or ""),
                    op=str(head.get("node_op") or ""), trt_version=trt_version)
    if fix.code != _GENERIC[PARSER].code:
        return fix
    return first or fix
