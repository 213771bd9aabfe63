"""The work prefix: a build's inputs and outputs through the bucket (tasks/engine.py), no GPU involved."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks import engine
from tasks.errors import ModelError
from tasks.gpu_client import GpuEnv
from tasks.package import work_prefix
from tasks.storage import LocalStorage
from tests import models


def test_inputs_with_external_data_and_calibration_round_trip(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    onnx_path = models.save(models.small_cnn(), tmp_path / "src" / "model.onnx", external_data="model.onnx.data")
    batch = tmp_path / "src" / "batch0.npz"
    np.savez(batch, images=np.zeros((8, 3, 32, 32), np.float32))
    prefix = work_prefix("run-1", "int8")
    job = engine.BuildJob(precision="int8", spec={}, profiles=[], int8_mode="calibrator")
    engine.stage_build_inputs(storage, prefix, job, onnx_path, None,
                              {"batches": [str(batch)], "cache_in": None, "cache_key": "_trtflow/c.cache"})
    got = engine.fetch_build_inputs(storage, prefix, tmp_path / "gpu")
    assert got.job.onnx_files == ["model.onnx", "model.onnx.data"]
    assert (got.onnx_path.parent / "model.onnx.data").read_bytes() == (onnx_path.parent / "model.onnx.data").read_bytes()
    assert Path(got.calibration["batches"][0]).exists() and got.calibration["cache_key"] == "_trtflow/c.cache"
    assert got.eval_inputs is None
    assert engine.remove_work(storage, prefix) == 4  # job, model, data, batch
    assert not list(storage.list("_trtflow/work/"))


def test_outputs_or_error_come_back(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    prefix = work_prefix("run-2", "fp16")
    out = tmp_path / "gpu"
    out.mkdir()
    (out / "model.plan").write_bytes(b"plan")
    (out / "eval_outputs.npz").write_bytes(b"npz")
    outcome = engine.EngineOutcome("fp16", out / "m.onnx", out, {"engine": {"bytes": 4}, "eval": {"outputs": str(
        out / "eval_outputs.npz")}}, {}, out / "build.log", 1.5, {"model.plan": out / "model.plan"})
    env = GpuEnv("10.8.0", "H100", "9.0", "550", "12.4", "3.10", "/x")
    engine.store_build_outputs(storage, prefix, outcome, env)
    back, back_env = engine.fetch_build_outputs(storage, prefix, "fp16", tmp_path / "cpu")
    assert back.files["model.plan"].read_bytes() == b"plan" and back.eval_outputs.read_bytes() == b"npz"
    assert back_env.target == "sm_90-trt10.8.0" and back.seconds == 1.5
    engine.store_build_error(storage, prefix, ModelError("parser says no", fix="re-export"))
    with pytest.raises(ModelError, match="parser says no"):
        engine.fetch_build_outputs(storage, prefix, "fp16", tmp_path / "cpu2")
