"""tasks/accuracy.py: eval inputs (package data or seeded synthetic), ONNX Runtime references, npz
comparison and the ORT CPU latency baseline."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tasks.accuracy import (EvalSet, check_accuracy, compare_npz, eval_inputs, load_calls, ort_latency,
                            reference_outputs, save_calls)
from tasks.errors import ModelError
from tasks.package import LocalPackage
from tasks.spec import ModelSpec, parse_spec
from tasks.storage import sha256_file
from tasks.validate import validate_model
from tests import models


def _package(tmp_path: Path, model, name: str = "m") -> LocalPackage:
    root = tmp_path / "work" / name
    path = models.save(model, root / "model.onnx")
    return LocalPackage(name, root, path, sha256_file(path), "etag", path.stat().st_size, f"file://{path}")


def _profiles(pkg: LocalPackage, spec: ModelSpec):
    report = validate_model(pkg.model_path, spec, pkg.root)
    assert report.ok, report.summary_lines()
    return report.profiles


# ---- synthetic inputs -----------------------------------------------------------------------------
def test_synthetic_inputs_at_the_opt_shape(tmp_path):
    pkg = _package(tmp_path, models.small_cnn())
    spec = parse_spec({"eval": {"synthetic_samples": 20}, "build": {"default_opt_batch": 8}})
    es = eval_inputs(pkg, spec, pkg.model_path, _profiles(pkg, spec))
    assert es.synthetic and es.seed == 0 and "synthetic" in es.source
    assert es.calls == 3 and es.samples == 24  # ceil(20 / 8) full calls at the opt batch
    calls = load_calls(es.path)
    assert [c["images"].shape for c in calls] == [(8, 3, 32, 32)] * 3
    assert calls[0]["images"].dtype == np.float32
    assert abs(float(calls[0]["images"].mean())) < 0.2 and 0.8 < float(calls[0]["images"].std()) < 1.2
    with np.load(es.path) as npz:
        assert sorted(npz.files) == ["0:images", "1:images", "2:images"]


def test_synthetic_inputs_are_seeded(tmp_path):
    pkg = _package(tmp_path, models.small_cnn())
    a = eval_inputs(pkg, ModelSpec(), out_path=tmp_path / "a.npz").call(0)["images"]
    b = eval_inputs(pkg, ModelSpec(), out_path=tmp_path / "b.npz").call(0)["images"]
    c = eval_inputs(pkg, parse_spec({"eval": {"seed": 7}}), out_path=tmp_path / "c.npz").call(0)["images"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_synthetic_integer_ids_stay_valid_for_the_embedding(tmp_path):
    pkg = _package(tmp_path, models.two_input_model(vocab=5))
    es = eval_inputs(pkg, ModelSpec())
    call = es.call(0)
    assert call["ids"].dtype == np.int64 and call["features"].dtype == np.float32
    assert call["ids"].min() >= 0 and call["ids"].max() < 5  # Gather on a 5-row table
    assert call["ids"].shape == (8, 4) and call["features"].shape == (8, 16)
    big = eval_inputs(_package(tmp_path, models.two_input_model(vocab=50), "big"), ModelSpec()).call(0)["ids"]
    assert big.max() < 10  # small ids by default


def test_profiles_default_from_the_spec_and_uncovered_dims_raise(tmp_path):
    pkg = _package(tmp_path, models.small_cnn())
    assert eval_inputs(pkg, ModelSpec()).shapes == {"images": [8, 3, 32, 32]}
    hw = _package(tmp_path, models.dynamic_hw_cnn(), "hw")
    with pytest.raises(ModelError, match="dynamic_dim_without_profile"):
        eval_inputs(hw, ModelSpec())
    spec = parse_spec({"profiles": [{"images": {"min": [1, 3, 16, 16], "opt": [2, 3, 48, 40], "max": [4, 3, 64, 64]}}]})
    assert eval_inputs(hw, spec).shapes == {"images": [2, 3, 48, 40]}


# ---- eval data from the package -------------------------------------------------------------------
def test_eval_folder_npy_rows_are_batched_to_the_opt_batch(tmp_path):
    pkg = _package(tmp_path, models.small_cnn())
    data = np.random.default_rng(3).normal(size=(20, 3, 32, 32))  # float64: cast to the model's float32
    (pkg.root / "eval").mkdir()
    np.save(pkg.root / "eval" / "images.npy", data)
    es = eval_inputs(pkg, ModelSpec())
    assert not es.synthetic and es.seed is None and "images.npy" in es.source
    calls = load_calls(es.path)
    assert [c["images"].shape[0] for c in calls] == [8, 8, 4] and es.samples == 20
    assert calls[0]["images"].dtype == np.float32
    assert np.allclose(np.concatenate([c["images"] for c in calls]), data.astype(np.float32))


def test_eval_folder_npz_files_keyed_by_input_are_joined(tmp_path):
    pkg = _package(tmp_path, models.two_input_model())
    rng = np.random.default_rng(0)
    (pkg.root / "eval").mkdir()
    for i in range(2):
        np.savez(pkg.root / "eval" / f"part{i}.npz", features=rng.normal(size=(5, 16)).astype(np.float32),
                 ids=rng.integers(0, 50, (5, 4)), unrelated=np.zeros(3))
    es = eval_inputs(pkg, parse_spec({"eval": {"max_samples": 9}}))
    assert es.samples == 9 and [c["ids"].shape[0] for c in load_calls(es.path)] == [8, 1]
    assert es.dtypes == {"features": "float32", "ids": "int64"}


def test_eval_folder_one_tensor_per_sample(tmp_path):
    pkg = _package(tmp_path, models.small_cnn(dynamic_batch=False))
    (pkg.root / "eval").mkdir()
    np.save(pkg.root / "eval" / "images.npy", np.zeros((3, 1, 3, 32, 32), np.float32))
    es = eval_inputs(pkg, ModelSpec())
    assert es.calls == 3 and es.shapes == {"images": [1, 3, 32, 32]}


@pytest.mark.parametrize("files,match", [
    ({"features.npy": np.zeros((4, 16), np.float32)}, "no data for input.*'ids'"),
    ({"features.npy": np.zeros((4, 16), np.float32), "ids.npy": np.zeros((4, 4), np.float32)}, "float32 data"),
    ({"features.npy": np.zeros((4, 16), np.float32), "ids.npy": np.zeros((3, 4), np.int64)}, "different numbers"),
    ({"features.npy": np.zeros((4, 17), np.float32), "ids.npy": np.zeros((4, 4), np.int64)}, r"\[17\].*outside"),
    ({"features.npy": np.zeros((16,), np.float32), "ids.npy": np.zeros((4, 4), np.int64)}, "ranks"),
])
def test_eval_data_that_does_not_fit_is_a_model_error(tmp_path, files, match):
    pkg = _package(tmp_path, models.two_input_model())
    (pkg.root / "eval").mkdir()
    for name, arr in files.items():
        np.save(pkg.root / "eval" / name, arr)
    with pytest.raises(ModelError, match=match) as info:
        eval_inputs(pkg, ModelSpec())
    assert info.value.fix


def test_eval_folder_outside_the_package_is_refused(tmp_path):
    pkg = _package(tmp_path, models.small_cnn())
    with pytest.raises(ModelError, match="outside the model package"):
        eval_inputs(pkg, parse_spec({"eval": {"data": "../../elsewhere"}}))


# ---- reference outputs and comparison -------------------------------------------------------------
def test_reference_outputs_match_onnxruntime(tmp_path):
    pkg = _package(tmp_path, models.two_input_model())
    es = eval_inputs(pkg, parse_spec({"eval": {"synthetic_samples": 16}}))
    ref_path = reference_outputs(pkg.model_path, es)
    assert ref_path.name == "m.eval.reference.npz"
    refs = load_calls(ref_path)
    sess = ort.InferenceSession(str(pkg.model_path), providers=["CPUExecutionProvider"])
    for call, ref in zip(es.load(), refs):
        (expected,) = sess.run(["out"], call)
        assert np.array_equal(ref["out"], expected)
    assert len(refs) == es.calls == 2


def test_reference_outputs_read_external_data(tmp_path):
    root = tmp_path / "ext"
    path = models.save(models.small_cnn(), root / "model.onnx", external_data="model.onnx.data")
    pkg = LocalPackage("ext", root, path, sha256_file(path), "e", 1, "file://x")
    ref = load_calls(reference_outputs(path, eval_inputs(pkg, ModelSpec())))
    assert ref[0]["logits"].shape == (8, 10)


def test_compare_npz_concatenates_calls_and_gates(tmp_path):
    pkg = _package(tmp_path, models.small_cnn())
    es = eval_inputs(pkg, parse_spec({"eval": {"synthetic_samples": 24}}))
    ref = reference_outputs(pkg.model_path, es)
    same = compare_npz(ref, ref)
    assert same["logits"].reference_shape == [24, 10] and same["logits"].max_abs == 0.0

    rng = np.random.default_rng(0)
    noisy = [{k: v + rng.normal(0, 1e-3, v.shape).astype(v.dtype) for k, v in c.items()} for c in load_calls(ref)]
    noisy_path = save_calls(tmp_path / "noisy.npz", noisy)
    m = compare_npz(ref, noisy_path)["logits"]
    assert 0 < m.max_abs < 0.01 and m.cosine > 0.9999
    assert check_accuracy(ref, noisy_path, ModelSpec().tolerance("fp16"))
    assert not check_accuracy(ref, noisy_path, {"max_abs": 1e-6})

    short_path = save_calls(tmp_path / "short.npz", load_calls(ref)[:2])
    assert "calls [0, 1] of [0, 1, 2]" in compare_npz(ref, short_path)["logits"].error
    renamed = save_calls(tmp_path / "renamed.npz", [{"scores": c["logits"]} for c in load_calls(ref)])
    assert "missing" in compare_npz(ref, renamed)["logits"].error


def test_npz_keys_must_follow_the_protocol(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros(2))
    with pytest.raises(ModelError, match="'<call>:<tensor name>'"):
        load_calls(tmp_path / "bad.npz")
    np.savez(tmp_path / "gap.npz", **{"0:x": np.zeros(1), "2:x": np.zeros(1)})
    with pytest.raises(ModelError, match="not numbered"):
        load_calls(tmp_path / "gap.npz")


def test_onnxruntime_failure_is_a_model_error(tmp_path):
    pkg = _package(tmp_path, models.small_cnn())
    bad = save_calls(tmp_path / "bad-inputs.npz", [{"images": np.zeros((2, 3, 8), np.float32)}])
    es = EvalSet(path=bad, synthetic=True, calls=1, samples=2, shapes={}, dtypes={}, source="test")
    with pytest.raises(ModelError, match="ONNX Runtime failed on eval call 0"):
        reference_outputs(pkg.model_path, es)


# ---- latency baseline -------------------------------------------------------------------------------
def test_ort_latency_from_a_profile_an_eval_set_or_arrays(tmp_path):
    pkg = _package(tmp_path, models.two_input_model())
    profiles = _profiles(pkg, ModelSpec())
    by_profile = ort_latency(pkg.model_path, profiles[0], iterations=5, warmup=1)
    assert by_profile["batch"] == 8 and by_profile["iterations"] == 5
    assert by_profile["shapes"] == {"features": [8, 16], "ids": [8, 4]}
    assert 0 < by_profile["min_ms"] <= by_profile["p50_ms"] <= by_profile["p90_ms"]
    assert by_profile["throughput"] == pytest.approx(8 / (by_profile["p50_ms"] / 1000))
    es = eval_inputs(pkg, ModelSpec())
    assert ort_latency(pkg.model_path, es, iterations=2)["shapes"] == {"features": [8, 16], "ids": [8, 4]}
    arrays = {"features": np.zeros((3, 16), np.float32), "ids": np.zeros((3, 4), np.int64)}
    assert ort_latency(pkg.model_path, arrays, iterations=2)["batch"] == 3


# ---- Prefect wrappers -------------------------------------------------------------------------------
