"""GPU worker records in the bucket and the validation target they give convert-model."""
from __future__ import annotations

from flows.workers import known_targets, record_worker_probe, target_for_validation
from tasks.gpu_client import GpuEnv
from tasks.package import worker_key
from tasks.storage import LocalStorage


def _env(trt: str, sm: str = "9.0") -> GpuEnv:
    return GpuEnv(tensorrt=trt, gpu="NVIDIA H100", compute_capability=sm, driver="550", cuda_runtime="12.4",
                  python="3.10", interpreter="/opt/trt/bin/trt-python", caps={"fp16_flag": True})


def test_newest_worker_record_is_the_target(tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path)
    monkeypatch.setenv("TRTFLOW_TARGET_TRT", "11.0")  # a record beats the setting
    assert record_worker_probe(storage, "gpu0-a", _env("8.6.1")) == worker_key("gpu0-a") == "_trtflow/workers/gpu0-a.json"
    data = storage.read_json(worker_key("gpu0-a"))
    data["recorded_at"] = "2026-01-01T00:00:00+00:00"  # older than the next record
    storage.write_json(worker_key("gpu0-a"), data)
    record_worker_probe(storage, "gpu1-b", _env("10.8.0"))
    assert [r.worker for r in known_targets(storage)] == ["gpu1-b", "gpu0-a"]
    target = target_for_validation(storage)
    assert target.tensorrt == "10.8.0" and target.key == "sm_90-trt10.8.0" and "gpu1-b" in target.source
    assert target.caps == {"fp16_flag": True}
    assert known_targets(storage, pool="other") == []


def test_without_records_the_setting_then_the_default_names_the_target(tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path)
    monkeypatch.setenv("TRTFLOW_TARGET_TRT", "10.3")
    target = target_for_validation(storage)
    assert (target.tensorrt, target.key, target.caps) == ("10.3", None, {})
    assert "TRTFLOW_TARGET_TRT=10.3" in target.source
    monkeypatch.delenv("TRTFLOW_TARGET_TRT")
    target = target_for_validation(storage)
    assert target.tensorrt == "8.6" and "default" in target.source
