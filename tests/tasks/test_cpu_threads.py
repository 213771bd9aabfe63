"""TRTFLOW_CPU_THREADS: the thread count every ONNX Runtime session of a CPU stage gets."""
from pathlib import Path

import numpy as np
import pytest

from tasks.accuracy import _session, ort_latency
from tasks.cpu_threads import ENV, calibration_sessions, cpu_threads, session_options
from tests.models import save, small_cnn


def test_unset_or_zero_keeps_onnxruntime_defaults():
    assert cpu_threads({}) == 0
    assert cpu_threads({ENV: " 0 "}) == 0
    assert session_options(0).intra_op_num_threads == 0


@pytest.mark.parametrize("raw, words", [("four", "not a whole number"), ("-2", "negative")])
def test_bad_values_name_the_setting_and_the_fix(raw, words):
    with pytest.raises(ValueError) as err:
        cpu_threads({ENV: raw})
    assert ENV in str(err.value) and words in str(err.value) and "unset it" in str(err.value)


def test_reference_and_latency_sessions_take_the_setting(tmp_path: Path, monkeypatch):
    path = save(small_cnn(), tmp_path / "m.onnx")
    monkeypatch.setenv(ENV, "1")
    opts = _session(path).get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    record = ort_latency(path, {"images": np.zeros((1, 3, 32, 32), np.float32)}, iterations=2, warmup=0)
    assert record["threads"] == 1


def test_calibrator_session_takes_the_setting_only_inside_the_block(tmp_path: Path, monkeypatch):
    from onnxruntime.quantization import calibrate

    path = save(small_cnn(), tmp_path / "m.onnx")
    monkeypatch.setenv(ENV, "1")
    original = calibrate.CalibraterBase.create_inference_session
    with calibration_sessions() as threads:
        calibrator = calibrate.create_calibrator(path, augmented_model_path=str(tmp_path / "aug.onnx"))
        opts = calibrator.infer_session.get_session_options()
    assert threads == 1 and opts.intra_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert calibrate.CalibraterBase.create_inference_session is original
    monkeypatch.delenv(ENV)
    with calibration_sessions() as threads:  # unset: onnxruntime's own method stays in place
        assert threads == 0 and calibrate.CalibraterBase.create_inference_session is original
