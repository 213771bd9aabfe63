"""convert-model under prefect_test_harness, the GPU subprocess replaced by the onnxruntime test double."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx.version_converter
import pytest

from flows.convert import convert_model
from flows.params import ConvertRequest
from tasks.errors import InfraError, ModelError
from tasks.package import latest_key, status_key
from tasks.storage import LocalStorage, S3Storage, sha256_file
from tests import models
from tests.doubles import make_trt_python_double


@pytest.fixture
def gpu_double(tmp_path_factory, monkeypatch):
    """TRT_PYTHON points at the test double (onnxruntime in place of TensorRT)."""
    script = make_trt_python_double(tmp_path_factory.mktemp("double"))
    monkeypatch.setenv("TRT_PYTHON", str(script))
    for var in ("TRTFLOW_DOUBLE_FAIL", "TRTFLOW_DOUBLE_NOISE_INT8", "TRTFLOW_DOUBLE_NOISE_FP16"):
        monkeypatch.delenv(var, raising=False)
    return script


@pytest.fixture
def bucket(tmp_path, gpu_double):
    """A local bucket with one model and the double recorded as its GPU worker (so cache hits are known)."""
    root = tmp_path / "bucket"
    models.save(models.small_cnn(), root / "models" / "cnn.onnx")
    import tempfile
    from flows.workers import record_worker_probe
    from tasks.gpu_client import probe_gpu

    record_worker_probe(LocalStorage(root), "gpu0-test", probe_gpu(Path(tempfile.mkdtemp(dir=tmp_path))))
    return root


@pytest.fixture
def write_log(monkeypatch):
    """A spy on LocalStorage writes: the order in which keys were written."""
    order = []
    real_write, real_upload = LocalStorage.write_bytes, LocalStorage.upload

    def write_bytes(self, key, data, content_type=None):
        order.append(key)
        return real_write(self, key, data, content_type)

    def upload(self, src, key, content_type=None):
        order.append(key)
        return real_upload(self, src, key, content_type)

    monkeypatch.setattr(LocalStorage, "write_bytes", write_bytes)
    monkeypatch.setattr(LocalStorage, "upload", upload)
    return order


def _convert(uri, **kw):
    return convert_model(ConvertRequest(model_uri=str(uri), **kw))


def test_publishes_engine_manifest_and_latest_last(prefect_harness, gpu_double, bucket, write_log):
    summary = _convert(bucket / "models" / "cnn.onnx", precisions=["fp16", "fp32"])
    assert summary["status"] == "published"
    assert summary["latest"]["precision"] == "fp16"
    assert list(summary["engines"]) == ["fp16"]  # fallback: fp16 passed, fp32 not needed
    store = LocalStorage(bucket)
    sha = sha256_file(bucket / "models" / "cnn.onnx")
    latest = store.read_json(latest_key("cnn"))
    manifest = store.read_json(latest["manifest"])
    assert manifest["schema"] == "trtflow.manifest/v1"
    assert manifest["model"]["sha256"] == sha
    assert manifest["precision"] == "fp16"
    assert manifest["target"]["tensorrt"] == "0.0.0-double"
    assert manifest["engine"]["sha256"] == sha256_file(bucket / latest["engine"])
    assert manifest["accuracy"]["gate"]["passed"] is True
    assert manifest["accuracy"]["metrics"]["logits"]["cosine"] > 0.9999
    assert manifest["benchmark"]["tensorrt"]["latency_ms"]["p50"] > 0
    assert manifest["flow_run_id"]
    assert {"model.plan", "build.log", "reproduce.sh", "request.json"} <= set(manifest["files"])
    # addressed by the whole package's identity, the engine's folder by its own sha256
    assert manifest["package"]["files"] == {"cnn.onnx": sha}
    assert latest["package_sha256"] == manifest["package"]["sha256"]
    engine_sha = manifest["engine"]["sha256"]
    assert latest["engine"].startswith(f"engines/cnn/{latest['package_sha256'][:12]}/sm_00-trt0.0.0-double/")
    assert latest["engine"].endswith(f"/fp16/{engine_sha[:16]}/model.plan")
    # ordering: engine before its manifest, conversion record after the engines, latest.json last
    engine_writes = [k for k in write_log if k.startswith("engines/")]
    assert engine_writes[-1] == latest_key("cnn")
    assert write_log.index(latest["engine"]) < write_log.index(latest["manifest"]) < write_log.index(latest["conversion"])
    status = store.read_json(status_key("cnn", sha))
    assert status["status"] == "published" and status["latest"] == latest["engine"]


def test_second_run_is_a_cache_hit_unless_forced(prefect_harness, gpu_double, bucket):
    first = _convert(bucket / "models" / "cnn.onnx", precisions=["fp32"])
    assert first["status"] == "published"
    again = _convert(bucket / "models" / "cnn.onnx", precisions=["fp32"])
    assert again["status"] == "cached"
    store = LocalStorage(bucket)
    status = store.read_json(status_key("cnn", sha256_file(bucket / "models" / "cnn.onnx")))
    assert status["status"] == "cached" and status["conversion"] == store.read_json(latest_key("cnn"))["conversion"]
    assert again["latest"]["engine"] == first["latest"]["engine"]
    forced = _convert(bucket / "models" / "cnn.onnx", precisions=["fp32"], force=True)
    assert forced["status"] == "published"
    # a changed spec is a different engine key: no cache hit
    changed = _convert(bucket / "models" / "cnn.onnx", precisions=["fp16"])
    assert changed["status"] == "published"


def test_strategy_all_publishes_every_passing_precision(prefect_harness, gpu_double, bucket):
    summary = _convert(bucket / "models" / "cnn.onnx", precisions=["fp16", "fp32"], strategy="all")
    assert set(summary["engines"]) == {"fp16", "fp32"}
    assert summary["latest"]["precision"] == "fp16"


def test_failed_gate_falls_back_and_is_recorded(prefect_harness, gpu_double, bucket, monkeypatch):
    monkeypatch.setenv("TRTFLOW_DOUBLE_NOISE_FP16", "2.0")  # the double's fp16 outputs are far off
    summary = _convert(bucket / "models" / "cnn.onnx", precisions=["fp16", "fp32"])
    assert summary["results"] == {"fp16": "failed-gate", "fp32": "passed"}
    assert summary["latest"]["precision"] == "fp32"
    store = LocalStorage(bucket)
    conversion = store.read_json(store.read_json(latest_key("cnn"))["conversion"])
    fp16 = conversion["precisions"]["fp16"]
    assert fp16["gate"]["passed"] is False and fp16["gate"]["failures"]
    assert fp16["gate"]["metrics"]["logits"]["cosine"] < 0.999


def test_corrupt_model_writes_status_and_other_models_still_convert(prefect_harness, gpu_double, bucket):
    (bucket / "models" / "broken.onnx").write_bytes(b"\x08\x07this is not a protobuf")
    with pytest.raises(ModelError):
        _convert(bucket / "models" / "broken.onnx", precisions=["fp32"])
    store = LocalStorage(bucket)
    status = store.read_json(status_key("broken", sha256_file(bucket / "models" / "broken.onnx")))
    assert status["status"] == "failed" and status["stage"] == "validate"
    assert status["error"]["kind"] == "model" and status["error"]["fix"]
    assert store.head(latest_key("broken")) is None
    assert _convert(bucket / "models" / "cnn.onnx", precisions=["fp32"])["status"] == "published"


def test_gpu_crash_is_recorded_with_the_signal(prefect_harness, gpu_double, bucket, monkeypatch):
    monkeypatch.setenv("TRTFLOW_DOUBLE_FAIL", "crash")
    with pytest.raises(InfraError) as info:
        _convert(bucket / "models" / "cnn.onnx", precisions=["fp32"])
    assert "SIGSEGV" in str(info.value)
    store = LocalStorage(bucket)
    status = store.read_json(status_key("cnn", sha256_file(bucket / "models" / "cnn.onnx")))
    assert status["status"] == "failed" and "SIGSEGV" in json.dumps(status["error"])


def test_without_tensorrt_stops_at_gpu_stage_naming_the_setting(prefect_harness, bucket, monkeypatch):
    monkeypatch.setenv("TRT_PYTHON", sys.executable)  # the real tasks/gpu, in an interpreter without tensorrt
    with pytest.raises(InfraError) as info:
        _convert(bucket / "models" / "cnn.onnx", precisions=["fp32"])
    assert "TensorRT cannot be imported" in str(info.value) and "TRT_PYTHON" in str(info.value)
    store = LocalStorage(bucket)
    status = store.read_json(status_key("cnn", sha256_file(bucket / "models" / "cnn.onnx")))
    assert status["status"] == "failed" and status["stage"] == "engines"  # the probe runs in build-engine
    assert "TRT_PYTHON" in status["error"]["message"] + (status["error"]["fix"] or "")


def test_converts_from_s3_and_publishes_there(prefect_harness, gpu_double, moto_s3, tmp_path):
    storage: S3Storage = moto_s3
    path = models.save(models.two_input_model(), tmp_path / "m.onnx")
    storage.upload(path, "models/two/model.onnx")
    summary = _convert(storage.url("models/two/"), precisions=["fp32"])
    assert summary["status"] == "published"
    latest = storage.read_json(latest_key("two"))
    assert storage.head(latest["engine"]) is not None
    manifest = storage.read_json(latest["manifest"])
    assert {i["name"] for i in manifest["model"]["inputs"]} == {"features", "ids"}


def _trained_package(bucket: Path, name: str, yaml_text: str, calibration: bool = True) -> Path:
    from tests import trained

    model, eval_x, _, calib_x = trained.train_small_cnn()
    root = bucket / "models" / name
    models.save(model, root / "model.onnx")
    (root / "trtflow.yaml").write_text(yaml_text)
    if calibration:
        (root / "calibration").mkdir(parents=True)
        np.save(root / "calibration" / "images.npy", calib_x)
    (root / "eval").mkdir(parents=True)
    np.save(root / "eval" / "images.npy", eval_x[:64])
    return root


@pytest.mark.parametrize("mode", ["qdq", "calibrator"])
def test_int8_from_calibration_data_is_published_and_cached_qdq_reused(prefect_harness, gpu_double, bucket, mode):
    _trained_package(bucket, "bars", f"precisions: [int8, fp32]\ncalibration: {{mode: {mode}}}\n")
    summary = _convert(bucket / "models" / "bars")
    assert summary["results"] == {"int8": "passed"} and summary["latest"]["precision"] == "int8"
    store = LocalStorage(bucket)
    manifest = store.read_json(store.read_json(latest_key("bars"))["manifest"])
    assert manifest["calibration"]["mode"] == mode and manifest["calibration"]["synthetic"] is False
    assert manifest["eval"]["synthetic"] is False
    if mode == "qdq":
        assert store.head(manifest["calibration"]["qdq_key"]) is not None
        again = _convert(bucket / "models" / "bars", force=True)
        conversion = store.read_json(store.read_json(latest_key("bars"))["conversion"])
        assert again["status"] == "published" and conversion["precisions"]["int8"]["prepared"]["qdq_reused"] is True


def test_int8_without_calibration_data_is_refused_and_the_chain_falls_back(prefect_harness, gpu_double, bucket):
    _trained_package(bucket, "nocal", "precisions: [int8, fp16]\n", calibration=False)
    summary = _convert(bucket / "models" / "nocal")
    assert summary["results"] == {"int8": "failed", "fp16": "passed"}
    store = LocalStorage(bucket)
    conversion = store.read_json(store.read_json(latest_key("nocal"))["conversion"])
    error = conversion["precisions"]["int8"]["error"]
    assert error["kind"] == "model" and "calibration" in error["message"] and "synthetic: true" in error["fix"]


def _opset18_bucket(root: Path, worker_trt: str) -> Path:
    """A bucket holding an opset-18 model and the record of one GPU worker with TensorRT ``worker_trt``."""
    from flows.workers import record_worker_probe
    from tasks.gpu_client import GpuEnv

    model = onnx.version_converter.convert_version(models.small_cnn(), 18)
    models.save(model, root / "models" / "op18.onnx")
    record_worker_probe(LocalStorage(root), "gpu0-h100", GpuEnv(
        tensorrt=worker_trt, gpu="NVIDIA H100 (record written by the test)", compute_capability="9.0", driver="x",
        cuda_runtime="x", python="3.10", interpreter="/opt/trt/bin/trt-python"))
    return root


def test_opset18_passes_validation_for_a_recorded_10x_worker(prefect_harness, gpu_double, tmp_path, monkeypatch):
    root = _opset18_bucket(tmp_path / "bucket", "10.8.0")
    monkeypatch.setenv("TRTFLOW_DOUBLE_TRT_VERSION", "10.8.0")  # the GPU double plays that worker
    summary = _convert(root / "models" / "op18.onnx", precisions=["fp32"])
    assert summary["status"] == "published"
    store = LocalStorage(root)
    conversion = store.read_json(store.read_json(latest_key("op18"))["conversion"])
    assert conversion["validated_for"]["tensorrt"] == "10.8.0"
    assert "GPU worker gpu0-h100" in conversion["validated_for"]["source"]
    manifest = store.read_json(conversion["latest"]["manifest"])
    assert manifest["model"]["opsets"]["ai.onnx"] == 18 and manifest["target"]["tensorrt"] == "10.8.0"


def test_opset18_is_refused_for_a_recorded_86_worker(prefect_harness, gpu_double, tmp_path, monkeypatch):
    root = _opset18_bucket(tmp_path / "bucket", "8.6.1")
    monkeypatch.setenv("TRTFLOW_DOUBLE_TRT_VERSION", "8.6.1")
    with pytest.raises(ModelError, match="opset 18"):
        _convert(root / "models" / "op18.onnx", precisions=["fp32"])
    status = LocalStorage(root).read_json(status_key("op18", sha256_file(root / "models" / "op18.onnx")))
    assert status["status"] == "failed" and status["stage"] == "validate"
    assert "TensorRT 8.6.1" in status["error"]["message"] and "gpu0-h100" in status["error"]["message"]
    assert "opset_version=17" in status["error"]["fix"]


def test_without_a_worker_record_the_setting_names_the_target(prefect_harness, gpu_double, tmp_path, monkeypatch):
    root = tmp_path / "bucket"
    models.save(onnx.version_converter.convert_version(models.small_cnn(), 18), root / "models" / "op18.onnx")
    monkeypatch.setenv("TRTFLOW_TARGET_TRT", "10.8")
    monkeypatch.setenv("TRTFLOW_DOUBLE_TRT_VERSION", "10.8.0")
    assert _convert(root / "models" / "op18.onnx", precisions=["fp32"])["status"] == "published"
    monkeypatch.setenv("TRTFLOW_TARGET_TRT", "8.6")
    with pytest.raises(ModelError, match=r"TRTFLOW_TARGET_TRT=8\.6"):
        _convert(root / "models" / "op18.onnx", precisions=["fp32"], force=True)


def test_build_engine_rechecks_on_its_own_tensorrt(prefect_harness, gpu_double, tmp_path, monkeypatch):
    """The record says 10.8 but the worker that builds runs 8.6: build-engine refuses, naming its parser."""
    root = _opset18_bucket(tmp_path / "bucket", "10.8.0")
    monkeypatch.setenv("TRTFLOW_DOUBLE_TRT_VERSION", "8.6.1")
    with pytest.raises(ModelError, match="newer ONNX parser"):
        _convert(root / "models" / "op18.onnx", precisions=["fp32"])
    store = LocalStorage(root)
    status = store.read_json(status_key("op18", sha256_file(root / "models" / "op18.onnx")))
    assert status["status"] == "failed" and "TensorRT 8.6.1" in status["error"]["message"]
    assert not list(store.list("_trtflow/work/")), "the work prefix is removed on failure too"
