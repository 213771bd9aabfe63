"""tasks/limits.py and the spec's bounds: heavy CPU stages under a time and memory limit, spec
numbers that would exhaust the worker refused up front, array files that lie about their size or
hold pickles refused before they are read (issue 11 items 5 and 10)."""
from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tasks.accuracy import reference_from_package
from tasks.errors import InfraError, ModelError
from tasks.limits import load_npy, load_npz, run_limited
from tasks.package import LocalPackage
from tasks.spec import Limits, ModelSpec, parse_spec
from tasks.storage import sha256_file
from tasks.validate import validate_model
from tests import models


def _package(tmp_path: Path, model, name: str = "m") -> LocalPackage:
    root = tmp_path / "work" / name
    path = models.save(model, root / "model.onnx")
    return LocalPackage(name, root, path, sha256_file(path), "etag", path.stat().st_size, f"file://{path}")


# ---- run_limited --------------------------------------------------------------------------------
def _allocate(mib: int) -> int:
    return int(np.ones(mib * 1024 * 1024, np.uint8).sum())


def _raise_model_error() -> None:
    raise ModelError("bad model", fix="fix it")


def test_endless_loop_model_passes_validation_but_fails_the_reference_stage_within_its_limit(tmp_path):
    pkg = _package(tmp_path, models.endless_loop_model())
    spec = parse_spec({"limits": {"cpu_stage_timeout_s": 4}})
    report = validate_model(pkg.model_path, spec, pkg.root)
    assert report.ok, report.summary_lines()  # nothing static gives a 10^12-trip Loop away
    start = time.monotonic()
    with pytest.raises(ModelError) as err:
        run_limited("reference outputs", reference_from_package, pkg, spec, report.profiles, limits=spec.limits)
    seconds = time.monotonic() - start
    assert seconds < 4 + 10, seconds  # the limit plus a process start, not 10^12 trips
    assert "reference outputs ran past its 4 s time limit" in err.value.message
    assert "limits.cpu_stage_timeout_s" in err.value.fix


def test_reference_stage_in_a_limited_child_returns_outputs_and_latency(tmp_path):
    pkg = _package(tmp_path, models.small_cnn())
    spec = parse_spec({"bench": {"ort_iterations": 3}})
    profiles = validate_model(pkg.model_path, spec, pkg.root).profiles
    eval_set, reference, ort = run_limited("reference outputs", reference_from_package, pkg, spec, profiles,
                                           limits=spec.limits)
    assert eval_set.synthetic and reference.exists() and ort["iterations"] == 3


def test_a_stage_over_its_memory_limit_is_a_model_error_naming_the_key():
    limits = Limits(cpu_memory_mib=600)
    with pytest.raises(ModelError) as err:
        run_limited("calibration", _allocate, 2048, limits=limits)
    assert "600 MiB memory limit" in err.value.message and "limits.cpu_memory_mib" in err.value.fix


def test_a_stage_within_its_limits_returns_its_value_and_keeps_its_model_errors():
    assert run_limited("calibration", _allocate, 8, limits=Limits()) == 8 * 1024 * 1024
    with pytest.raises(ModelError, match="bad model"):
        run_limited("quantisation", _raise_model_error, limits=Limits())


def _run_again_if_main_is_rerun() -> str:
    return "ran once"


def test_the_child_does_not_rerun_the_callers_main_script(tmp_path):
    """A user's script without a __main__ guard must not start its conversion again in the child
    (multiprocessing's spawn would re-run it)."""
    import subprocess
    import sys

    script = tmp_path / "convert_now.py"
    marker = tmp_path / "runs.txt"
    script.write_text("from tasks.limits import run_limited\nfrom tasks.spec import Limits\n"
                      "from tests.tasks.test_limits import _run_again_if_main_is_rerun\n"
                      f"open({str(marker)!r}, 'a').write('run\\n')\n"
                      "print(run_limited('reference outputs', _run_again_if_main_is_rerun, limits=Limits()))\n")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ran once" and marker.read_text() == "run\n"


def test_a_stage_killed_from_outside_is_infra_not_model():
    with pytest.raises(InfraError, match="died without a result"):
        run_limited("calibration", _kill_self_term, limits=Limits())


def _kill_self_term() -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGTERM)


# ---- spec bounds ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, key", [
    ({"bench": {"ort_iterations": 10**9}}, "bench.ort_iterations"),
    ({"eval": {"synthetic_samples": 10**8}}, "eval.synthetic_samples"),
    ({"build": {"default_opt_batch": 10**6}}, "build.default_opt_batch"),
    ({"profiles": [{"x": {"min": [1, 3, 224, 224], "opt": [10**6, 3, 224, 224], "max": [10**6, 3, 224, 224]}}]},
     "profiles"),
    ({"profiles": [{"x": {"min": [1, 3, 224, 224], "opt": [8, 3, 224, 224], "max": [10**6, 3, 224, 224]}}]},
     "profiles"),
])
def test_spec_numbers_that_would_exhaust_a_worker_are_refused_by_name(spec, key):
    with pytest.raises(ModelError) as err:
        parse_spec(spec)
    message = err.value.message
    assert key in message and ("less than or equal" in message or "over TensorRT's limit" in message), message


def test_limits_do_not_change_the_engine_address():
    assert parse_spec({"limits": {"cpu_stage_timeout_s": 60}}).build_key() == ModelSpec().build_key()


# ---- array files ---------------------------------------------------------------------------------
def _npz_bomb(tmp_path: Path, inflated_gib: int = 4) -> Path:
    """A 4 MB .npz whose one member inflates to ``inflated_gib`` GiB (a .npy header, then zeros)."""
    path = tmp_path / "bomb.npz"
    count = inflated_gib * 2**30 // 4
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (count,)})
    chunk = bytes(64 * 2**20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("images.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            for _ in range(inflated_gib * 16):
                member.write(chunk)
    return path


def test_an_npz_that_inflates_to_4_gib_is_refused_before_reading(tmp_path):
    bomb = _npz_bomb(tmp_path)
    assert bomb.stat().st_size < 6 * 2**20
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ModelError) as err:
        load_npz(bomb, "calibration/bomb.npz", max_member_mib=1024)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert "inflates to 4096 MiB" in err.value.message and "was not read" in err.value.message
    assert "limits.max_array_mib" in err.value.fix
    assert grown_kib < 256 * 1024  # nothing near 4 GiB was allocated


def test_pickled_arrays_are_model_errors_not_infrastructure(tmp_path):
    npy = tmp_path / "objects.npy"
    np.save(npy, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    npz = tmp_path / "objects.npz"
    np.savez(npz, images=np.array([{"a": 1}], dtype=object))
    for loader, path in ((load_npy, npy), (load_npz, npz), (load_npy, npy.read_bytes())):
        with pytest.raises(ModelError) as err:
            loader(path, "eval/objects")
        assert not err.value.retriable
        assert "pickled" in err.value.message and "np.save" in err.value.fix


def test_a_raw_pickle_named_npy_is_a_model_error(tmp_path):
    import pickle

    path = tmp_path / "raw.npy"
    path.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ModelError, match="not a readable .npy"):
        load_npy(path, "eval/raw.npy")
