"""Issue 11: publication that is never wrong, torn or lost.

convert-model under prefect_test_harness with the GPU test double (onnxruntime in place of
TensorRT), against a local bucket folder. One section per item of the issue:
  item 1  identity is the whole package (weights-only, calibration and eval updates are no cache hit)
  item 2  latest.json: self-healing, reverts, an older run finishing last
  item 3  content-addressed engines, one conversion per version, the bucket reader loop
  item 7  a crashed precision is built again by the next run, not pinned by the cache
  item 9  a tampered Q/DQ cache entry is noticed and rebuilt
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from flows.convert import convert_model
from flows.params import ConvertRequest
from tasks import publish
from tasks.identity import get_checked, put_checked, sha_record_key
from tasks.package import latest_key
from tasks.storage import LocalStorage, sha256_file
from tests import models
from tests.doubles import make_trt_python_double

T0 = 1_700_000_000  # upload times, set explicitly so "newer upload" never depends on the clock


@pytest.fixture
def gpu_double(tmp_path_factory, monkeypatch):
    """TRT_PYTHON points at the test double (onnxruntime in place of TensorRT)."""
    script = make_trt_python_double(tmp_path_factory.mktemp("double"))
    monkeypatch.setenv("TRT_PYTHON", str(script))
    for var in ("TRTFLOW_DOUBLE_FAIL", "TRTFLOW_DOUBLE_FAIL_ONLY", "TRTFLOW_DOUBLE_NONDETERMINISTIC",
                "TRTFLOW_DOUBLE_NOISE_INT8", "TRTFLOW_DOUBLE_NOISE_FP16", "TRTFLOW_DOUBLE_TRACE"):
        monkeypatch.delenv(var, raising=False)
    return script


@pytest.fixture
def bucket(tmp_path, gpu_double):
    """An empty local bucket with the double recorded as its GPU worker (so cache hits are known)."""
    from flows.workers import record_worker_probe
    from tasks.gpu_client import probe_gpu

    root = tmp_path / "bucket"
    record_worker_probe(LocalStorage(root), "gpu0-test", probe_gpu(Path(tempfile.mkdtemp(dir=tmp_path))))
    return root


def _convert(uri, **kw) -> dict:
    return convert_model(ConvertRequest(model_uri=str(uri), **kw))


def _touch(root: Path, when: float) -> None:
    """Give every file under ``root`` the upload time ``when`` (LocalStorage's LastModified)."""
    for p in Path(root).rglob("*"):
        if p.is_file():
            os.utime(p, (when, when))


def _folder_package(bucket: Path, name: str = "w", seed: int = 1, when: float = T0) -> Path:
    """models/<name>/: model.onnx with its weights in model.onnx.data, trtflow.yaml, calibration/, eval/."""
    root = bucket / "models" / name
    rng = np.random.default_rng(seed)
    models.save(models.small_cnn(seed=seed), root / "model.onnx", external_data="model.onnx.data")
    (root / "trtflow.yaml").write_text("precisions: [fp32]\n")
    (root / "calibration").mkdir(parents=True, exist_ok=True)
    np.save(root / "calibration" / "images.npy", rng.standard_normal((4, 3, 32, 32)).astype(np.float32))
    (root / "eval").mkdir(parents=True, exist_ok=True)
    np.save(root / "eval" / "images.npy", rng.standard_normal((4, 3, 32, 32)).astype(np.float32))
    _touch(root, when)
    return root


def _latest(bucket: Path, name: str) -> dict:
    return LocalStorage(bucket).read_json(latest_key(name))


# ---- item 1: the identity is the whole package --------------------------------------------------------
def _change_weights(root: Path) -> None:
    """Only model.onnx.data changes: the same graph with other weights (model.onnx is byte-identical)."""
    other = root.parent / "other"
    models.save(models.small_cnn(seed=7), other / "model.onnx", external_data="model.onnx.data")
    before = (root / "model.onnx").read_bytes()
    (root / "model.onnx.data").write_bytes((other / "model.onnx.data").read_bytes())
    assert (root / "model.onnx").read_bytes() == before
    for p in other.iterdir():
        p.unlink()
    other.rmdir()


@pytest.mark.parametrize("change", ["weights", "calibration", "eval"])
def test_item1_weights_calibration_or_eval_update_is_not_a_cache_hit(prefect_harness, bucket, change):
    root = _folder_package(bucket)
    first = _convert(root)
    assert first["status"] == "published"
    assert _convert(root)["status"] == "cached"  # nothing changed: a hit
    old = _latest(bucket, "w")
    if change == "weights":
        _change_weights(root)
        changed_file = "model.onnx.data"
    else:
        np.save(root / change / "images.npy", np.ones((4, 3, 32, 32), np.float32))
        changed_file = f"{change}/images.npy"
    _touch(root, T0 + 100)
    second = _convert(root)
    assert second["status"] == "published", f"a {change}-only update must be converted, not cached"
    new = _latest(bucket, "w")
    assert new["package_sha256"] != old["package_sha256"] and new["engine"] != old["engine"]
    store = LocalStorage(bucket)
    manifest = store.read_json(new["manifest"])
    assert manifest["package"]["files"][changed_file] == sha256_file(root / changed_file)
    assert set(manifest["package"]["files"]) == {"model.onnx", "model.onnx.data", "trtflow.yaml",
                                                 "calibration/images.npy", "eval/images.npy"}
    assert store.read_json(old["manifest"])["package"]["files"][changed_file] != sha256_file(root / changed_file)


# ---- item 2: latest.json names the newest upload, whoever finishes last --------------------------------
def test_item2_lost_latest_write_heals_on_the_next_run_as_a_cache_hit(prefect_harness, bucket, monkeypatch):
    root = _folder_package(bucket)
    real = LocalStorage.write_bytes
    failed = []

    def failing_latest(self, key, data, content_type=None):
        if key == latest_key("w") and not failed:
            failed.append(key)
            raise OSError("injected: latest.json write lost (S3 error or a kill after conversion.json)")
        return real(self, key, data, content_type)

    monkeypatch.setattr(LocalStorage, "write_bytes", failing_latest)
    with pytest.raises(Exception, match="injected"):
        _convert(root)
    store = LocalStorage(bucket)
    assert failed and store.head(latest_key("w")) is None
    healed = _convert(root)
    assert healed["status"] == "cached"
    latest = _latest(bucket, "w")
    assert store.head(latest["engine"]) is not None and store.head(latest["manifest"]) is not None
    assert store.read_json(latest["manifest"])["engine"]["sha256"] == sha256_file(bucket / latest["engine"])


def test_item2_revert_to_an_earlier_upload_makes_its_engine_latest_without_a_rebuild(prefect_harness, bucket):
    root = _folder_package(bucket, seed=1, when=T0)
    assert _convert(root)["status"] == "published"
    engine_a = _latest(bucket, "w")["engine"]
    saved = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    _change_weights(root)
    _touch(root, T0 + 100)
    assert _convert(root)["status"] == "published"
    assert _latest(bucket, "w")["engine"] != engine_a
    for rel, data in saved.items():  # the user uploads the earlier version again
        (root / rel).write_bytes(data)
    _touch(root, T0 + 200)
    reverted = _convert(root)
    assert reverted["status"] == "cached"  # no rebuild
    latest = _latest(bucket, "w")
    assert latest["engine"] == engine_a and latest["uploaded_at"].startswith("2023-11-14T22:16:40")


def test_item2_an_older_upload_finishing_last_does_not_roll_latest_back(prefect_harness, bucket, monkeypatch):
    """Run A (upload at T0) is paused just before it publishes; upload B (T0+100) arrives and its run
    publishes; then A finishes. latest.json must stay on B."""
    root = _folder_package(bucket, seed=1, when=T0)
    real_write_conversion = publish.write_conversion
    seen = {}

    def interleave(storage, address, record):
        key = real_write_conversion(storage, address, record)
        if "b" not in seen:  # only in run A: B is uploaded and converted while A waits here
            seen["b"] = None
            _change_weights(root)
            _touch(root, T0 + 100)
            seen["b"] = _convert(root)
        return key

    monkeypatch.setattr(publish, "write_conversion", interleave)
    run_a = _convert(root)
    run_b = seen["b"]
    assert run_a["status"] == run_b["status"] == "published"
    latest = _latest(bucket, "w")
    assert latest["engine"] == run_b["latest"]["engine"] != run_a["latest"]["engine"]
    assert latest["uploaded_at"] > "2023-11-14T22:13:20"  # B's time, not A's
    # and A's own re-run (a cache hit of the older upload's content, still older) does not move it
    assert publish.write_latest(LocalStorage(bucket), _address_of(bucket, run_a), _best(run_a), "c", "r",
                                uploaded_at="2023-11-14T22:13:20.000000Z")["engine"] == latest["engine"]


def _address_of(bucket: Path, summary: dict):
    from tasks.package import EngineAddress

    parts = summary["latest"]["engine"].split("/")  # engines/<name>/<pkg12>/<target>/<spec>/...
    return EngineAddress(parts[1], summary["model_sha"], parts[3], parts[4], parts[2])


def _best(summary: dict) -> publish.PublishedEngine:
    key = summary["latest"]["engine"]
    return publish.PublishedEngine(summary["latest"]["precision"], key.rsplit("/", 1)[0] + "/", key,
                                   key.rsplit("/", 1)[0] + "/manifest.json", key)


# ---- item 3: never overwritten; one conversion per version; the reader loop ---------------------------
def _read_through_latest(store: LocalStorage, name: str) -> bool:
    """One reader step: latest.json -> manifest -> engine; True when the engine's sha256 is the manifest's."""
    latest = store.read_json(latest_key(name))
    manifest = store.read_json(latest["manifest"])
    data = store.read_bytes(latest["engine"])
    return hashlib.sha256(data).hexdigest() == manifest["engine"]["sha256"]


def test_item3_reader_loop_sees_no_mismatch_during_forced_and_overlapping_rebuilds(prefect_harness, bucket,
                                                                                   monkeypatch, tmp_path):
    monkeypatch.setenv("TRTFLOW_DOUBLE_NONDETERMINISTIC", "1")  # every rebuild makes other engine bytes
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv("TRTFLOW_DOUBLE_TRACE", str(trace))
    models.save(models.small_cnn(), bucket / "models" / "cnn.onnx")
    assert _convert(bucket / "models" / "cnn.onnx", precisions=["fp32"])["status"] == "published"
    store = LocalStorage(bucket)
    counts = {"reads": 0, "mismatches": 0, "errors": 0}
    done = threading.Event()

    def reader():
        while not done.is_set() or counts["reads"] < 10_000:
            try:
                counts["mismatches"] += 0 if _read_through_latest(store, "cnn") else 1
            except Exception:  # noqa: BLE001 - a missing/torn object is a failure too, counted
                counts["errors"] += 1
            counts["reads"] += 1

    def rebuild(results):
        results.append(_convert(bucket / "models" / "cnn.onnx", precisions=["fp32"], force=True))

    results: list = []
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(2):  # rounds of two overlapping forced rebuilds of the same version
            pair = [threading.Thread(target=rebuild, args=(results,)) for _ in range(2)]
            for t in pair:
                t.start()
            for t in pair:
                t.join()
    finally:
        done.set()
        thread.join()
    print(f"reader loop: {counts['reads']} reads, {counts['mismatches']} mismatches, {counts['errors']} errors, "
          f"{len(results)} forced rebuilds")
    assert counts["reads"] >= 10_000 and counts["mismatches"] == 0 and counts["errors"] == 0
    assert [r["status"] for r in results] == ["published"] * 4
    engines = {r["latest"]["engine"] for r in results}
    assert len(engines) == 4  # four different engines, each under its own key: nothing overwritten
    assert all(store.head(e) is not None for e in engines)
    # at most one conversion of this version at a time: the builds of overlapping runs never overlap
    spans = sorted((float(a), float(b)) for _, _, a, b in (line.split() for line in trace.read_text().splitlines()))
    assert len(spans) == 5 and all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:]))


def test_item3_two_runs_of_one_new_version_build_once(prefect_harness, bucket, monkeypatch, tmp_path):
    """watch-bucket plus nightly-rebuild (or the UI) start the same version together: one builds, the
    other waits for the version's lock and then is a cache hit."""
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv("TRTFLOW_DOUBLE_TRACE", str(trace))
    models.save(models.small_cnn(), bucket / "models" / "cnn.onnx")
    results: list = []
    runs = [threading.Thread(target=lambda: results.append(_convert(bucket / "models" / "cnn.onnx",
                                                                    precisions=["fp32"]))) for _ in range(2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert sorted(r["status"] for r in results) == ["cached", "published"]
    assert len(trace.read_text().splitlines()) == 1  # one engine build
    assert len({r["engines"]["fp32"] for r in results}) == 1


def test_item3_a_published_engine_key_is_never_written_twice(prefect_harness, bucket, monkeypatch):
    models.save(models.small_cnn(), bucket / "models" / "cnn.onnx")
    writes = []
    real = LocalStorage.upload

    def spy(self, src, key, content_type=None):
        writes.append(key)
        return real(self, src, key, content_type)

    monkeypatch.setattr(LocalStorage, "upload", spy)
    first = _convert(bucket / "models" / "cnn.onnx", precisions=["fp32"])
    first_record_key = _latest(bucket, "cnn")["conversion"]
    first_record = LocalStorage(bucket).read_json(first_record_key)
    again = _convert(bucket / "models" / "cnn.onnx", precisions=["fp32"], force=True)  # same bytes (deterministic)
    assert first["latest"]["engine"] == again["latest"]["engine"]
    assert writes.count(first["latest"]["engine"]) == 1  # found there, not overwritten
    # the conversion record latest.json named is immutable too; the rerun's record has its own key
    assert _latest(bucket, "cnn")["conversion"] != first_record_key
    assert LocalStorage(bucket).read_json(first_record_key) == first_record


# ---- item 7: a crash of this run is retried by the next, not pinned by the cache ----------------------
def test_item7_crashed_preferred_precision_is_built_again_next_run(prefect_harness, bucket, monkeypatch):
    models.save(models.small_cnn(), bucket / "models" / "cnn.onnx")
    monkeypatch.setenv("TRTFLOW_DOUBLE_FAIL", "crash")
    monkeypatch.setenv("TRTFLOW_DOUBLE_FAIL_ONLY", "fp16")  # the GPU crashes on fp16 builds only
    crashed = _convert(bucket / "models" / "cnn.onnx", precisions=["fp16", "fp32"])
    assert crashed["results"] == {"fp16": "failed", "fp32": "passed"} and crashed["latest"]["precision"] == "fp32"
    store = LocalStorage(bucket)
    record = store.read_json(_latest(bucket, "cnn")["conversion"])
    assert record["crashed"] == ["fp16"] and record["precisions"]["fp16"]["error"]["kind"] == "infra"
    monkeypatch.delenv("TRTFLOW_DOUBLE_FAIL")  # the GPU is healthy again
    healed = _convert(bucket / "models" / "cnn.onnx", precisions=["fp16", "fp32"])
    assert healed["status"] == "published" and healed["latest"]["precision"] == "fp16"
    assert _latest(bucket, "cnn")["precision"] == "fp16"
    assert _convert(bucket / "models" / "cnn.onnx", precisions=["fp16", "fp32"])["status"] == "cached"


def test_item7_a_model_error_is_not_retried_by_the_next_run(prefect_harness, bucket, monkeypatch):
    models.save(models.small_cnn(), bucket / "models" / "cnn.onnx")
    monkeypatch.setenv("TRTFLOW_DOUBLE_FAIL", "model")
    monkeypatch.setenv("TRTFLOW_DOUBLE_FAIL_ONLY", "fp16")
    assert _convert(bucket / "models" / "cnn.onnx", precisions=["fp16", "fp32"])["latest"]["precision"] == "fp32"
    assert _convert(bucket / "models" / "cnn.onnx", precisions=["fp16", "fp32"])["status"] == "cached"


# ---- item 9: cached intermediates are checked against their recorded sha256 ---------------------------
def _trained_package(bucket: Path, name: str) -> Path:
    from tests import trained

    model, eval_x, _, calib_x = trained.train_small_cnn()
    root = bucket / "models" / name
    models.save(model, root / "model.onnx")
    (root / "trtflow.yaml").write_text("precisions: [int8]\ncalibration: {mode: qdq}\n")
    (root / "calibration").mkdir(parents=True)
    np.save(root / "calibration" / "images.npy", calib_x)
    (root / "eval").mkdir(parents=True)
    np.save(root / "eval" / "images.npy", eval_x[:64])
    return root


def test_item9_tampered_qdq_cache_entry_is_rebuilt_not_published(prefect_harness, bucket):
    root = _trained_package(bucket, "bars")
    first = _convert(root)
    assert first["results"] == {"int8": "passed"}
    store = LocalStorage(bucket)
    conversion = store.read_json(_latest(bucket, "bars")["conversion"])
    prepared = conversion["precisions"]["int8"]["prepared"]
    key = prepared["qdq_key"]
    good = store.read_bytes(key)
    assert store.read_json(sha_record_key(key))["sha256"] == hashlib.sha256(good).hexdigest()
    # tamper: a valid ONNX model (the float model itself), so only the hash can tell
    store.write_bytes(key, (root / "model.onnx").read_bytes())
    again = _convert(root, force=True)
    assert again["results"] == {"int8": "passed"}
    redo = store.read_json(_latest(bucket, "bars")["conversion"])["precisions"]["int8"]["prepared"]
    assert redo["qdq_reused"] is False  # noticed and quantised again
    assert store.read_bytes(key) == good  # the entry is whole again (Q/DQ is deterministic)
    assert redo["onnx_sha256"] == prepared["onnx_sha256"]  # the engine was built from the right graph
    assert b"QuantizeLinear" in store.read_bytes(_latest(bucket, "bars")["engine"])
    third = _convert(root, force=True)
    assert store.read_json(_latest(bucket, "bars")["conversion"])["precisions"]["int8"]["prepared"]["qdq_reused"]
    assert third["results"] == {"int8": "passed"}


@pytest.mark.parametrize("entry", ["_trtflow/calibration-cache/m/abc-def-sm_90-trt8.6.0.cache",
                                   "_trtflow/timing-cache/sm_90-trt8.6.0.cache"])
def test_item9_calibration_and_timing_cache_entries_are_checked(tmp_path, entry):
    store = LocalStorage(tmp_path / "bucket")
    src = tmp_path / "cache.bin"
    src.write_bytes(b"cache entries " * 100)
    put_checked(store, entry, src)
    assert get_checked(store, entry, tmp_path / "ok.bin") == sha256_file(src)
    store.write_bytes(entry, b"tampered " * 100)
    assert get_checked(store, entry, tmp_path / "bad.bin") is None and not (tmp_path / "bad.bin").exists()
    store.delete(sha_record_key(entry))
    store.write_bytes(entry, src.read_bytes())
    assert get_checked(store, entry, tmp_path / "unrecorded.bin") is None  # no record: not trusted either
