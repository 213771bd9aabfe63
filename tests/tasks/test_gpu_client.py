"""tasks/gpu_client.run_gpu with a real subprocess standing in for the TensorRT interpreter (a TEST
DOUBLE child): the heartbeat names the elapsed time and the child's newest phase, and a child past
its limit is killed with the build-timeout fix."""
from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from tasks.errors import ModelError
from tasks.gpu.compat import PHASE_PREFIX
from tasks.gpu_client import last_phase, run_gpu

CHILD = '''
import json, os, sys, time
# argv: -m tasks.gpu VERB REQUEST RESPONSE
request, response = sys.argv[4], sys.argv[5]
release = json.load(open(request))["release"]
print("{prefix} parse model.onnx", file=sys.stderr, flush=True)
print("{prefix} build int8 (calibrating)", file=sys.stderr, flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(release) and time.monotonic() < deadline:  # the parent's heartbeat releases it
    time.sleep(0.01)
json.dump({{"ok": True, "released": os.path.exists(release)}}, open(response, "w"))
'''


@pytest.fixture
def fake_trt_python(tmp_path, monkeypatch):
    child = tmp_path / "child.py"
    child.write_text(CHILD.format(prefix=PHASE_PREFIX))
    wrapper = tmp_path / "trt-python"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {child} \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("TRT_PYTHON", str(wrapper))
    return tmp_path


def test_heartbeat_names_elapsed_time_and_the_childs_phase(fake_trt_python):
    release = fake_trt_python / "release"
    beats = []

    def on_progress(line: str) -> None:
        beats.append(line)
        if PHASE_PREFIX not in line and "build int8" in line:
            release.touch()  # the child finishes once a heartbeat has named its build phase

    call = run_gpu("engine", {"release": str(release)}, fake_trt_python / "work", timeout_s=120,
                   on_progress=on_progress, heartbeat_s=0.05)
    assert call.response["released"] is True
    assert beats and beats[-1].startswith("GPU engine: ") and " s elapsed, phase: build int8 (calibrating)" in beats[-1]


def test_a_child_past_its_limit_is_killed_with_the_timeout_fix(fake_trt_python):
    with pytest.raises(ModelError) as err:
        run_gpu("engine", {"release": str(fake_trt_python / "never")}, fake_trt_python / "work", timeout_s=0.5,
                on_progress=lambda line: None, heartbeat_s=0.05)
    assert "ran past its 0 s limit" in err.value.message or "limit in phase" in err.value.message
    assert "build.timeout_s" in err.value.fix and "tolerances" not in err.value.fix


def test_last_phase_reads_the_newest_line(tmp_path):
    log = tmp_path / "build.log"
    assert last_phase(log) == "starting"
    log.write_text(f"x\n{PHASE_PREFIX} parse a.onnx\nTensorRT chatter\n{PHASE_PREFIX} build fp16\n")
    assert last_phase(log) == "build fp16"
