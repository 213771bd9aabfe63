"""Accuracy metrics of engine outputs against reference outputs, and the gate per precision.

Pure numpy, Python 3.9-compatible and Prefect-free: the same numbers are computed wherever the
outputs are (flow side or GPU side).

Definitions, per output (both arrays compared in float64, elementwise):
- ``max_abs``  = max |a - r|;  ``mean_abs`` = mean |a - r|
- ``max_rel``  = max |a - r| / max(|r|, floor), floor = max(1e-3 * max|r|, 1e-12): elements whose
  reference is near zero (ReLU outputs, small logits) would otherwise turn any absolute noise
  into an unbounded relative error, so they are judged relative to a thousandth of the peak.
- ``cosine``   = <a, r> / (|a| |r|) over the flattened tensors (1.0 when both are all zeros).
- ``top1``     = share of rows whose argmax agrees, for logit-like outputs (2-D [N, C] floats, C > 1).
- ``top5``     = share of rows whose reference top-1 class is among the actual top-5 (C > 5).
A shape mismatch, a missing output, or NaN/inf in either array fails the output.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

REL_FLOOR_FRACTION = 1e-3
REL_FLOOR_MIN = 1e-12


def _clean(x: Optional[float]) -> Optional[float]:
    """JSON has no NaN/inf: they become None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class OutputMetrics:
    """Comparison of one output. ``error`` is set when the output could not be compared or is non-finite."""

    name: str
    shape: List[int]
    reference_shape: List[int]
    dtype: str
    max_abs: Optional[float] = None
    mean_abs: Optional[float] = None
    max_rel: Optional[float] = None
    cosine: Optional[float] = None
    top1: Optional[float] = None
    top5: Optional[float] = None
    elements: int = 0
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        for k in ("max_abs", "mean_abs", "max_rel", "cosine", "top1", "top5"):
            d[k] = _clean(d[k])
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "OutputMetrics":
        return cls(**dict(data))


def _is_logits(ref: np.ndarray) -> bool:
    return ref.ndim == 2 and ref.shape[1] > 1 and np.issubdtype(ref.dtype, np.floating)


def compare_output(name: str, reference: np.ndarray, actual: np.ndarray) -> OutputMetrics:
    """Metrics of one output (see the module docstring for definitions)."""
    ref = np.asarray(reference)
    act = np.asarray(actual)
    m = OutputMetrics(name=name, shape=list(act.shape), reference_shape=list(ref.shape), dtype=str(ref.dtype))
    if ref.shape != act.shape:
        m.error = f"shape mismatch: reference {list(ref.shape)}, actual {list(act.shape)}"
        return m
    m.elements = int(ref.size)
    if ref.size == 0:
        m.max_abs = m.mean_abs = m.max_rel = 0.0
        m.cosine = 1.0
        return m
    r = ref.astype(np.float64)
    a = act.astype(np.float64)
    bad = []
    for label, arr in (("actual", a), ("reference", r)):
        nan = int(np.isnan(arr).sum())
        inf = int(np.isinf(arr).sum())
        if nan or inf:
            bad.append(f"{label} has {nan} NaN and {inf} inf of {arr.size} values")
    finite = np.isfinite(a) & np.isfinite(r)
    diff = np.abs(a - r)
    if finite.any():
        d = diff[finite]
        m.max_abs = float(d.max())
        m.mean_abs = float(d.mean())
        absr = np.abs(r[finite])
        floor = max(REL_FLOOR_FRACTION * float(absr.max()), REL_FLOOR_MIN)
        m.max_rel = float((d / np.maximum(absr, floor)).max())
    if not bad:
        na = float(np.linalg.norm(a))
        nr = float(np.linalg.norm(r))
        if na == 0.0 and nr == 0.0:
            m.cosine = 1.0
        elif na == 0.0 or nr == 0.0:
            m.cosine = 0.0
        else:
            # clipped: rounding can put identical tensors a hair above 1
            m.cosine = float(np.clip(np.dot(a.ravel(), r.ravel()) / (na * nr), -1.0, 1.0))
        if _is_logits(ref):
            ref_top = r.argmax(axis=1)
            m.top1 = float((a.argmax(axis=1) == ref_top).mean())
            if ref.shape[1] > 5:
                top5 = np.argpartition(-a, 4, axis=1)[:, :5]  # the 5 largest, unordered
                m.top5 = float((top5 == ref_top[:, None]).any(axis=1).mean())
    else:
        m.error = "non-finite values: " + "; ".join(bad)
    return m


def compare_outputs(reference: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]) -> Dict[str, OutputMetrics]:
    """Metrics per reference output; an output missing from ``actual`` gets an error entry."""
    out: Dict[str, OutputMetrics] = {}
    for name, ref in reference.items():
        if name not in actual:
            ref = np.asarray(ref)
            out[name] = OutputMetrics(name=name, shape=[], reference_shape=list(ref.shape), dtype=str(ref.dtype),
                                      error=f"output {name!r} is missing from the engine's outputs "
                                            f"(it has: {', '.join(sorted(actual)) or 'none'})")
        else:
            out[name] = compare_output(name, ref, actual[name])
    return out


# Each gate key: (metric, "min" | "max").
GATE_KEYS = {"min_cosine": ("cosine", "min"), "max_abs": ("max_abs", "max"), "max_rel": ("max_rel", "max"),
             "min_top1": ("top1", "min")}


def _thresholds(tolerance: Any) -> Dict[str, float]:
    """A Tolerance (pydantic), any object with the gate attributes, or a mapping -> the set thresholds."""
    if tolerance is None:
        return {}
    if isinstance(tolerance, Mapping):
        src = dict(tolerance)
    elif hasattr(tolerance, "model_dump"):
        src = tolerance.model_dump()
    else:
        src = {k: getattr(tolerance, k, None) for k in GATE_KEYS}
    unknown = set(src) - set(GATE_KEYS)
    if unknown:
        raise ValueError(f"unknown tolerance keys {sorted(unknown)}; known: {sorted(GATE_KEYS)}")
    return {k: float(v) for k, v in src.items() if v is not None}


@dataclass
class GateResult:
    """Whether every output meets the tolerance. Truthy when it passes."""

    passed: bool
    thresholds: Dict[str, float]
    metrics: Dict[str, OutputMetrics] = field(default_factory=dict)
    failures: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        if self.passed:
            return "passed: " + ", ".join(f"{k} {v:g}" for k, v in sorted(self.thresholds.items()))
        return "failed: " + "; ".join(self.failures)

    def to_dict(self) -> Dict[str, Any]:
        return {"passed": self.passed, "thresholds": dict(self.thresholds),
                "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
                "failures": list(self.failures), "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GateResult":
        return cls(passed=bool(data["passed"]), thresholds=dict(data.get("thresholds", {})),
                   metrics={k: OutputMetrics.from_dict(v) for k, v in data.get("metrics", {}).items()},
                   failures=list(data.get("failures", [])), notes=list(data.get("notes", [])))


def gate(metrics: Mapping[str, OutputMetrics], tolerance: Any) -> GateResult:
    """Check every output's metrics against ``tolerance`` (min_cosine, max_abs, max_rel, min_top1).

    ``min_top1`` applies to logit-like outputs only; when no output is logit-like it is noted and
    not applied. An output with an error always fails.
    """
    thresholds = _thresholds(tolerance)
    result = GateResult(passed=True, thresholds=thresholds, metrics=dict(metrics))
    if not metrics:
        result.failures.append("no outputs were compared")
    for name, m in metrics.items():
        if m.error:
            result.failures.append(f"{name}: {m.error}")
            continue
        for key, limit in thresholds.items():
            metric, kind = GATE_KEYS[key]
            value = getattr(m, metric)
            if value is None:
                continue  # top1 of a non-logit output
            if (kind == "min" and value < limit) or (kind == "max" and value > limit):
                sign = "<" if kind == "min" else ">"
                result.failures.append(f"{name}: {metric} {value:.6g} {sign} {limit:g}")
    if "min_top1" in thresholds and metrics and all(m.top1 is None for m in metrics.values() if not m.error):
        result.notes.append("min_top1 not applied: no output is logit-like (2-D [N, C] floats)")
    result.passed = not result.failures
    return result
