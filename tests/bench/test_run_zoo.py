"""bench/zoo/run_zoo.py on CPU: real `trtflow convert` subprocesses (each its own temporary Prefect
server) against the GPU TEST DOUBLE, run two at a time, resumed, and tabled."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests import models
from tests.doubles import make_trt_python_double

ROOT = Path(__file__).resolve().parents[2]
SPEC = ("precisions: [fp16]\nstrategy: all\nbuild: {optimization_level: 2, workspace_mib: 4096, timeout_s: 900}\n"
        "profiles:\n  - images: {min: [1, 3, 32, 32], opt: [2, 3, 32, 32], max: [4, 3, 32, 32]}\n")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "zoo" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def zoo(tmp_path, monkeypatch):
    monkeypatch.setenv("TRT_PYTHON", str(make_trt_python_double(tmp_path / "double")))
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.chdir(ROOT)  # `python -m flows.cli` imports this checkout
    bucket = tmp_path / "zoo"
    for name, seed in (("tiny_a", 0), ("tiny_b", 1)):
        pkg = bucket / "models" / name
        models.save(models.small_cnn(seed=seed), pkg / "model.onnx")
        (pkg / "trtflow.yaml").write_text(SPEC)
    (bucket / "models" / "half_exported").mkdir()  # no trtflow.yaml yet: not a package to convert
    return bucket


def _records(bucket: Path):
    return [json.loads(line) for line in (bucket / "_zoo" / "results.jsonl").read_text().splitlines()]


def test_two_jobs_convert_each_package_with_its_own_server_and_a_rerun_continues(zoo, monkeypatch):
    run_zoo = _load("run_zoo")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # a shared server the jobs must not use
    assert run_zoo.main(["convert", "--bucket", str(zoo), "--only", "tiny_a", "--budget", "300"]) == 0
    assert run_zoo.main(["convert", "--bucket", str(zoo), "--jobs", "2", "--budget", "300"]) == 0
    records = _records(zoo)
    assert [r["model"] for r in records] == ["tiny_a", "tiny_b"]  # the rerun converted only what was missing
    for r in records:
        assert r["rc"] == 0 and not r["timed_out"], r
        assert [(p["precision"], p["result"]) for p in r["precisions"]] == [("fp16", "passed")]
        assert r["build"] == {"optimization_level": 2, "workspace_mib": 4096, "timeout_s": 900}
    assert records[1]["jobs"] == 2
    text = run_zoo.table(records)
    assert "other zoo builds shared the GPU" in text and "optimization_level 2" in text
    assert "FP16 published and passing: 2 of 2 models" in text


def test_a_spent_budget_skips_and_the_next_call_converts_them(zoo):
    run_zoo = _load("run_zoo")
    assert run_zoo.main(["convert", "--bucket", str(zoo), "--budget", "1", "--min-seconds", "30"]) == 0
    assert all("global budget" in r["skipped"] for r in _records(zoo))
    assert run_zoo._done(zoo / "_zoo" / "results.jsonl") == set()


def test_each_job_gets_its_own_prefect_home_and_no_shared_api(tmp_path, monkeypatch):
    run_zoo = _load("run_zoo")
    monkeypatch.setenv("PREFECT_API_URL", "http://shared:4200/api")
    a, b = run_zoo._own_server_env(tmp_path / "a"), run_zoo._own_server_env(tmp_path / "b")
    assert "PREFECT_API_URL" not in a and a["PREFECT_HOME"] != b["PREFECT_HOME"]
    assert int(a["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]) >= 60  # parallel starts are slow


def test_the_zoo_scripts_compile():
    import py_compile

    for name in ("export_zoo", "run_zoo", "check_zoo", "images"):
        py_compile.compile(str(ROOT / "bench" / "zoo" / f"{name}.py"), doraise=True)
