"""tasks/metrics.py: the numbers behind every accuracy gate."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from tasks.metrics import GateResult, OutputMetrics, compare_output, compare_outputs, gate
from tasks.spec import ModelSpec, Tolerance

ROOT = Path(__file__).resolve().parents[2]


def _logits(n=64, c=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 3, (n, c)).astype(np.float32)


def test_identical_outputs():
    ref = _logits()
    m = compare_output("logits", ref, ref.copy())
    assert m.ok and m.max_abs == 0.0 and m.max_rel == 0.0 and m.mean_abs == 0.0
    assert m.cosine == pytest.approx(1.0) and m.cosine <= 1.0
    assert m.top1 == 1.0 and m.top5 == 1.0 and m.elements == 640


def test_known_errors():
    ref = np.array([[1.0, -2.0, 4.0]], dtype=np.float32)
    act = np.array([[1.5, -2.0, 4.0]], dtype=np.float32)
    m = compare_output("y", ref, act)
    assert m.max_abs == pytest.approx(0.5)
    assert m.max_rel == pytest.approx(0.5)  # 0.5 / |1.0|
    expected_cos = float(ref.ravel() @ act.ravel() / (np.linalg.norm(ref) * np.linalg.norm(act)))
    assert m.cosine == pytest.approx(expected_cos)
    assert m.top1 == 1.0 and m.top5 is None  # 3 classes: no top-5


def test_relative_error_floor_ignores_near_zero_references():
    ref = np.array([100.0, 1e-9, 50.0])
    act = np.array([100.0, 1e-3, 50.0])
    m = compare_output("y", ref, act)
    # |1e-3 - 1e-9| / max(1e-9, 1e-3 * 100) ~= 0.01, not 1e6
    assert m.max_rel == pytest.approx(0.01, rel=1e-3)


def test_top1_and_top5_agreement():
    ref = np.zeros((4, 8), dtype=np.float32)
    ref[np.arange(4), [0, 1, 2, 3]] = 10.0  # reference classes 0,1,2,3
    act = ref.copy()
    act[0, 7] = 20.0  # row 0: top-1 moves, but class 0 is still 2nd -> in top-5
    act[1, :] = np.arange(8)[::-1]  # row 1: class 1 is 2nd (value 6): in top-5
    act[2, :] = np.arange(8)  # row 2: class 2 has the 3rd smallest value: not in top-5
    m = compare_output("logits", ref, act)
    assert m.top1 == pytest.approx(1 / 4)  # only row 3 keeps its argmax
    assert m.top5 == pytest.approx(3 / 4)


def test_non_logit_outputs_have_no_top_k():
    assert compare_output("emb", np.ones((2, 3, 4)), np.ones((2, 3, 4))).top1 is None
    assert compare_output("ids", np.arange(6).reshape(2, 3), np.arange(6).reshape(2, 3)).top1 is None  # ints
    assert compare_output("score", np.ones((5, 1)), np.ones((5, 1))).top1 is None  # one column


def test_shape_mismatch_missing_output_and_nonfinite_fail():
    ref = _logits(8)
    metrics = compare_outputs({"a": ref, "b": ref, "c": ref}, {"a": ref.reshape(8, 1, 10), "c": np.where(ref > 2, np.nan, ref)})
    assert "shape mismatch" in metrics["a"].error and "[8, 10]" in metrics["a"].error
    assert "missing" in metrics["b"].error and "'b'" in metrics["b"].error
    assert "NaN" in metrics["c"].error and metrics["c"].cosine is None
    inf = compare_output("d", ref, np.full_like(ref, np.inf))
    assert not inf.ok and "inf" in inf.error
    result = gate(metrics, Tolerance(min_cosine=0.0))
    assert not result and len(result.failures) == 3


def test_zero_tensors_and_empty_tensors():
    assert compare_output("z", np.zeros(4), np.zeros(4)).cosine == 1.0
    assert compare_output("z", np.zeros(4), np.ones(4)).cosine == 0.0
    empty = compare_output("e", np.zeros((0, 3)), np.zeros((0, 3)))
    assert empty.ok and empty.elements == 0


def test_gate_passes_and_fails_on_each_threshold():
    ref = _logits(32)
    noisy = ref + np.random.default_rng(1).normal(0, 0.05, ref.shape).astype(np.float32)
    metrics = compare_outputs({"logits": ref}, {"logits": noisy})
    m = metrics["logits"]
    assert gate(metrics, Tolerance(min_cosine=0.99, max_abs=1.0, min_top1=0.8))
    assert not gate(metrics, {"max_abs": m.max_abs / 2})
    assert not gate(metrics, {"max_rel": m.max_rel / 2})
    assert not gate(metrics, {"min_cosine": 0.999999999})
    flipped = compare_outputs({"logits": ref}, {"logits": -ref})
    result = gate(flipped, ModelSpec().tolerance("int8"))
    assert not result.passed
    assert any("cosine" in f for f in result.failures) and any("top1" in f for f in result.failures)
    assert result.thresholds == {"min_cosine": 0.99, "min_top1": 0.99}


def test_gate_accepts_any_tolerance_shape_and_rejects_unknown_keys():
    metrics = compare_outputs({"y": np.ones((2, 2))}, {"y": np.ones((2, 2))})

    class Tol:  # any object with the attributes (the GPU side has no pydantic)
        min_cosine = 0.9
        max_abs = None

    assert gate(metrics, Tol()).thresholds == {"min_cosine": 0.9}
    assert gate(metrics, None).passed
    with pytest.raises(ValueError, match="min_cos"):
        gate(metrics, {"min_cos": 0.9})


def test_min_top1_is_noted_when_no_output_is_logits():
    metrics = compare_outputs({"emb": np.ones((2, 3, 4))}, {"emb": np.ones((2, 3, 4))})
    result = gate(metrics, {"min_top1": 0.99})
    assert result.passed and "min_top1 not applied" in result.notes[0]


def test_no_outputs_fail_the_gate():
    assert not gate({}, {"min_cosine": 0.9})


def test_results_serialise_to_json_and_back():
    ref = _logits(4)
    metrics = compare_outputs({"logits": ref, "bad": ref}, {"logits": ref, "bad": ref * np.nan})
    result = gate(metrics, ModelSpec().tolerance("fp16"))
    text = json.dumps(result.to_dict(), allow_nan=False)  # NaN would be invalid JSON
    back = GateResult.from_dict(json.loads(text))
    assert back.passed is False and back.failures == result.failures
    assert isinstance(back.metrics["logits"], OutputMetrics) and back.metrics["logits"].cosine == pytest.approx(1.0)
    assert result.summary().startswith("failed:")


def test_metrics_module_stays_python39_and_numpy_only():
    src = (ROOT / "tasks" / "metrics.py").read_text()
    tree = ast.parse(src, feature_version=(3, 9))  # no match statements, no 3.10+ syntax
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "math", "collections", "dataclasses", "typing", "numpy"}, imported
    assert "from __future__ import annotations" in src


def test_models_registry_stays_python39():
    ast.parse((ROOT / "tests" / "models.py").read_text(), feature_version=(3, 9))
