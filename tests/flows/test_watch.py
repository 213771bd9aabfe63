"""watch-bucket: settling with an injected clock, idempotency keys, persisted state, what it cannot read."""
from __future__ import annotations

import json
import logging
import os
import time

import pytest

from flows import watch
from flows.watch import poll_once
from tasks.package import fetch_package, list_packages, status_key
from tasks.storage import LocalStorage
from tasks.watch_state import (STATE_KEY, PackageState, WatchState, idempotency_key, load_state, observe,
                               package_fingerprint, version_of)
from tests.flows.watch_doubles import SETTLE, T0, Recorder, put


@pytest.fixture()
def bucket(tmp_path):
    return LocalStorage(tmp_path / "bucket")


def test_new_model_starts_once_after_settling(bucket):
    put(bucket.root, "models/a.onnx", b"v1", T0)
    rec = Recorder()
    assert poll_once(bucket, SETTLE, rec, now=T0 + 1).waiting == ["a"]
    assert poll_once(bucket, SETTLE, rec, now=T0 + 20).started == []   # seen only 19 s
    started = poll_once(bucket, SETTLE, rec, now=T0 + 31.5).started   # seen 30.5 s, modified 31.5 s ago
    assert [s["name"] for s in started] == ["a"]
    for later in (T0 + 60, T0 + 600):
        assert poll_once(bucket, SETTLE, rec, now=later).started == []
    assert rec.names == ["a"]
    due, params = rec.calls[0]
    assert params == {"request": {"model_uri": bucket.url("models/a.onnx"), "force": False,
                                  "package_fingerprint": due.fingerprint}}
    assert due.fingerprint
    assert due.idempotency_key == f"a-{due.version[:16]}"


def test_multi_file_upload_settles_on_the_last_file(bucket):
    put(bucket.root, "models/b/model.onnx", b"graph", T0)
    rec = Recorder()
    poll_once(bucket, SETTLE, rec, now=T0 + 5)
    put(bucket.root, "models/b/model.onnx.data", b"weights", T0 + 20)   # arrives while settling
    poll_once(bucket, SETTLE, rec, now=T0 + 36)      # first version "settled" by age, but it changed
    assert rec.names == []
    put(bucket.root, "models/b/trtflow.yaml", b"precisions: [fp16]\n", T0 + 40)
    poll_once(bucket, SETTLE, rec, now=T0 + 45)
    poll_once(bucket, SETTLE, rec, now=T0 + 70)      # seen 25 s
    assert rec.names == []
    poll_once(bucket, SETTLE, rec, now=T0 + 76)      # seen 31 s, modified 36 s ago
    assert rec.names == ["b"]
    assert rec.calls[0][1]["request"]["model_uri"] == bucket.url("models/b/model.onnx")


def test_recent_last_modified_holds_back_a_package_seen_long_ago(bucket):
    # The watcher's own observation is old enough, but the object was written just now (e.g. a
    # watcher that (re)started during an upload, or S3's clock ahead of ours).
    put(bucket.root, "models/c.onnx", b"x", T0 + 100)
    state = WatchState()
    assert observe(state, bucket.uri, list_packages(bucket), T0, SETTLE).due == []
    assert observe(state, bucket.uri, list_packages(bucket), T0 + 110, SETTLE).due == []
    assert [d.name for d in observe(state, bucket.uri, list_packages(bucket), T0 + 130, SETTLE).due] == ["c"]


def test_each_update_is_one_more_run_with_its_own_key(bucket):
    rec = Recorder()
    keys = []
    for i, t in enumerate((T0, T0 + 100, T0 + 200)):
        put(bucket.root, "models/d.onnx", f"version {i}".encode(), t)
        poll_once(bucket, SETTLE, rec, now=t + 1)
        poll_once(bucket, SETTLE, rec, now=t + 40)
        poll_once(bucket, SETTLE, rec, now=t + 50)
        keys.append(rec.calls[-1][0].idempotency_key)
    assert rec.names == ["d", "d", "d"]
    assert len(set(keys)) == 3


def test_overlapping_polls_compute_the_same_key(bucket):
    # Two polls that did not see each other's state (overlapping runs) must ask for the same run.
    put(bucket.root, "models/e.onnx", b"e", T0)
    s1, s2 = WatchState(), WatchState()
    for s in (s1, s2):
        observe(s, bucket.uri, list_packages(bucket), T0 + 1, SETTLE)
    d1 = observe(s1, bucket.uri, list_packages(bucket), T0 + 40, SETTLE).due
    d2 = observe(s2, bucket.uri, list_packages(bucket), T0 + 45, SETTLE).due
    assert [d.idempotency_key for d in d1] == [d.idempotency_key for d in d2] and d1


def test_version_covers_spec_and_reupload(bucket):
    put(bucket.root, "models/f/model.onnx", b"m", T0)
    (pkg,) = list_packages(bucket)
    v1 = version_of(bucket.uri, pkg)
    put(bucket.root, "models/f/trtflow.yaml", b"precisions: [fp32]\n", T0)
    (pkg,) = list_packages(bucket)
    v2 = version_of(bucket.uri, pkg)
    assert v1 != v2                                   # a spec change is a new version
    assert version_of("s3://other/", pkg) != v2        # and keys never collide across buckets
    assert idempotency_key("f", v2) == f"f-{v2[:16]}"


def test_reverting_to_identical_bytes_is_a_new_version():
    # S3 gives identical bytes the same ETag; only the upload time tells a revert (A, B, A) apart.
    from datetime import datetime, timezone

    from tasks.package import ModelPackage
    from tasks.storage import ObjectInfo

    def upload(at: float) -> ModelPackage:
        when = datetime.fromtimestamp(at, tz=timezone.utc)
        return ModelPackage("g", "models/g.onnx", [ObjectInfo("models/g.onnx", 1, "7fc56270e7a70fa81a5935b72eacbe29", when)])

    first, again = upload(T0), upload(T0 + 3600)
    assert first.fingerprint == again.fingerprint
    assert version_of("s3://b/", first) != version_of("s3://b/", again)
    assert version_of("s3://b/", first) == version_of("s3://b/", upload(T0))


def test_state_survives_a_restart_and_lives_in_the_bucket(bucket):
    put(bucket.root, "models/h.onnx", b"h", T0)
    rec = Recorder()
    poll_once(bucket, SETTLE, rec, now=T0 + 1)
    poll_once(bucket, SETTLE, rec, now=T0 + 40)
    saved = json.loads((bucket.root / STATE_KEY).read_text())
    assert saved["packages"]["h"]["flow_run_id"] == "run-1"
    assert saved["packages"]["h"]["submitted"] == saved["packages"]["h"]["version"]
    # A fresh process (new LocalStorage object, nothing in memory) starts nothing new.
    fresh = LocalStorage(bucket.root)
    rec2 = Recorder()
    assert poll_once(fresh, SETTLE, rec2, now=T0 + 100).started == [] and rec2.calls == []
    # A deleted package is forgotten.
    (bucket.root / "models/h.onnx").unlink()
    poll_once(fresh, SETTLE, rec2, now=T0 + 101)
    assert load_state(fresh).packages == {}


def test_unknown_state_layout_starts_afresh(bucket):
    bucket.write_json(STATE_KEY, {"version": 999, "packages": {"x": {"nonsense": 1}}})
    assert load_state(bucket).packages == {}
    ps = PackageState("v", 1.0, 2.0)
    assert WatchState.from_dict(WatchState({"p": ps}).to_dict()).packages == {"p": ps}


def test_a_failed_start_is_retried_on_the_next_poll_and_does_not_block_others(bucket):
    put(bucket.root, "models/i.onnx", b"i", T0)
    put(bucket.root, "models/j.onnx", b"j", T0)
    rec = Recorder(fail={"i"})
    poll_once(bucket, SETTLE, rec, now=T0 + 1)
    result = poll_once(bucket, SETTLE, rec, now=T0 + 40)
    assert rec.names == ["j"] and len(result.errors) == 1 and "i: API unreachable" in result.errors[0]
    rec.fail.clear()
    poll_once(bucket, SETTLE, rec, now=T0 + 41)
    assert rec.names == ["j", "i"]


# ---- what the watcher cannot read (issue 11 item 6) ------------------------------------------------
def test_a_dangling_symlink_is_skipped_and_logged_and_every_other_package_converts(bucket, caplog):
    put(bucket.root, "models/p.onnx", b"p", T0)
    put(bucket.root, "models/q/model.onnx", b"q", T0)
    (bucket.root / "models/gone.onnx").symlink_to(bucket.root / "nowhere.onnx")
    (bucket.root / "models/q/calibration").mkdir()
    (bucket.root / "models/q/calibration/lost.npy").symlink_to("/nonexistent/lost.npy")
    rec = Recorder()
    with caplog.at_level(logging.WARNING, logger="trtflow.storage"):
        poll_once(bucket, SETTLE, rec, now=T0 + 1)
        poll_once(bucket, SETTLE, rec, now=T0 + 40)
    assert rec.names == ["p", "q"]
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert "models/gone.onnx" in skipped and "models/q/calibration/lost.npy" in skipped


class DeletesDuringListing(LocalStorage):
    """Test double: a real local bucket in which one file is deleted while the watcher is listing it."""

    def __init__(self, root, victim: str):
        super().__init__(root)
        self.victim = victim

    def list(self, prefix: str = ""):
        for i, info in enumerate(super().list(prefix)):
            if i == 0:
                (self.root / self.victim).unlink()  # after os.walk named it, before it is stat-ed
            yield info


def test_a_file_deleted_during_listing_does_not_fail_the_poll(bucket):
    for name in ("r1", "r2", "r3"):
        put(bucket.root, f"models/{name}.onnx", name.encode(), T0)
    racy = DeletesDuringListing(bucket.root, "models/r2.onnx")
    rec = Recorder()
    poll_once(racy, SETTLE, rec, now=T0 + 1)
    poll_once(bucket, SETTLE, rec, now=T0 + 40)
    assert rec.names == ["r1", "r3"]


def test_s3_folder_markers_do_not_break_their_packages(moto_s3, tmp_path):
    s3 = moto_s3.client
    for key, body in [("models/", b""), ("models/resnet/", b""), ("models/resnet/model.onnx", b"resnet"),
                      ("models/bert/", b""), ("models/bert/model.onnx", b"bert"),
                      ("models/bert/calibration/", b""), ("models/bert/calibration/a.npy", b"calib")]:
        s3.put_object(Bucket=moto_s3.bucket, Key=key, Body=body)
    rec = Recorder()
    now = time.time() + 60  # moto stamps real times; settle by the watcher's clock
    poll_once(moto_s3, SETTLE, rec, now=now)
    poll_once(moto_s3, SETTLE, rec, now=now + 31)
    assert rec.names == ["bert", "resnet"]
    bert = {p.name: p for p in list_packages(moto_s3)}["bert"]
    assert sorted(f.key for f in bert.files) == ["models/bert/calibration/a.npy", "models/bert/model.onnx"]
    local = fetch_package(moto_s3, bert, tmp_path / "work")  # the marker once made this refuse the package
    assert (local.root / "calibration" / "a.npy").read_bytes() == b"calib"


def test_two_packages_claiming_one_name_are_refused_with_a_status_record_until_one_goes(bucket):
    put(bucket.root, "models/x.onnx", b"single", T0)
    put(bucket.root, "models/x/model.onnx", b"folder", T0)
    put(bucket.root, "models/y.onnx", b"y", T0)
    rec = Recorder()
    for t in (T0 + 1, T0 + 40, T0 + 400):
        result = poll_once(bucket, SETTLE, rec, now=t)
    assert rec.names == ["y"]                                     # x never starts, y is not held up
    assert result.clashes == {"x": ["models/x.onnx", "models/x/model.onnx"]}
    record = bucket.read_json(status_key("x", ""))
    assert record["status"] == "failed" and record["stage"] == "watch"
    assert "models/x.onnx" in record["error"]["message"] and "models/x/model.onnx" in record["error"]["message"]
    assert "delete or rename" in record["error"]["fix"]
    (bucket.root / "models/x.onnx").unlink()                      # the user keeps the folder package
    poll_once(bucket, SETTLE, rec, now=T0 + 401)
    assert bucket.read_json(status_key("x", "")) is None           # the watcher's own record is gone
    poll_once(bucket, SETTLE, rec, now=T0 + 432)
    assert rec.names == ["y", "x"]
    assert rec.calls[-1][1]["request"]["model_uri"] == bucket.url("models/x/model.onnx")


def test_a_clash_record_is_written_once_not_every_poll(bucket):
    put(bucket.root, "models/z.onnx", b"single", T0)
    put(bucket.root, "models/z/model.onnx", b"folder", T0)
    poll_once(bucket, SETTLE, Recorder(), now=T0 + 1)
    record = bucket.root / status_key("z", "")
    os.utime(record, (T0, T0))  # any rewrite of the record would give it a new mtime
    poll_once(bucket, SETTLE, Recorder(), now=T0 + 40)
    assert record.stat().st_mtime == T0


class CountingListings(LocalStorage):
    """Test double: a real local bucket that counts its listings."""

    def __init__(self, root):
        super().__init__(root)
        self.listed: list[str] = []

    def list(self, prefix: str = ""):
        self.listed.append(prefix)
        return super().list(prefix)


def test_one_listing_per_poll(bucket):
    put(bucket.root, "models/s.onnx", b"s", T0)
    put(bucket.root, "models/s2/model.onnx", b"s2", T0)
    counting = CountingListings(bucket.root)
    poll_once(counting, SETTLE, Recorder(), now=T0 + 1)
    poll_once(counting, SETTLE, Recorder(), now=T0 + 40)
    assert counting.listed == ["models/", "models/"]


# ---- the whole-package fingerprint (issue 11 item 1, watcher side) -------------------------------------
@pytest.mark.parametrize("changed", ["model.onnx.data", "trtflow.yaml", "calibration/a.npy", "eval/b.npy"])
def test_any_file_of_the_package_is_a_new_fingerprint_and_a_new_run(bucket, changed):
    files = ["model.onnx", "model.onnx.data", "trtflow.yaml", "calibration/a.npy", "eval/b.npy"]
    for f in files:
        put(bucket.root, f"models/w/{f}", f.encode(), T0)
    rec = Recorder()
    poll_once(bucket, SETTLE, rec, now=T0 + 1)
    poll_once(bucket, SETTLE, rec, now=T0 + 40)
    put(bucket.root, f"models/w/{changed}", b"new bytes of " + changed.encode(), T0 + 100)  # only this file
    poll_once(bucket, SETTLE, rec, now=T0 + 101)
    poll_once(bucket, SETTLE, rec, now=T0 + 140)
    (first, first_params), (second, second_params) = rec.calls
    assert first.fingerprint and second.fingerprint and first.fingerprint != second.fingerprint
    (pkg,) = list_packages(bucket)
    assert second.fingerprint == package_fingerprint(pkg.files)
    # convert-model is told which version the watcher saw
    assert first_params["request"]["package_fingerprint"] == first.fingerprint
    assert second_params["request"]["package_fingerprint"] == second.fingerprint


def test_single_file_packages_fingerprint_their_external_data(bucket):
    put(bucket.root, "models/v.onnx", b"graph", T0)
    put(bucket.root, "models/v.onnx.data", b"weights 1", T0)
    before = package_fingerprint(list_packages(bucket)[0].files)
    put(bucket.root, "models/v.onnx.data", b"weights 2", T0 + 10)
    assert package_fingerprint(list_packages(bucket)[0].files) != before


def test_fingerprint_is_the_listing_only_so_identical_s3_uploads_match(moto_s3):
    s3 = moto_s3.client
    s3.put_object(Bucket=moto_s3.bucket, Key="models/u/model.onnx", Body=b"same bytes")
    before = package_fingerprint(list_packages(moto_s3)[0].files)
    s3.put_object(Bucket=moto_s3.bucket, Key="models/u/model.onnx", Body=b"same bytes")  # a revert re-upload
    assert package_fingerprint(list_packages(moto_s3)[0].files) == before
    s3.put_object(Bucket=moto_s3.bucket, Key="models/u/eval/x.npy", Body=b"eval")
    assert package_fingerprint(list_packages(moto_s3)[0].files) != before


def _make_deployment(name: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("convert-model")
        return str(client.create_deployment(flow_id=flow_id, name=name))


def test_overlapping_polls_start_one_run_through_the_prefect_api(prefect_harness, bucket):
    """Two watchers with separate (lost) state and the real run_deployment: one flow run per version."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    dep_id = _make_deployment("watch-idem")
    put(bucket.root, "models/n.onnx", b"n", T0)
    submit = watch.deployment_submitter("convert-model/watch-idem")
    poll_once(bucket, SETTLE, submit, now=T0 + 1)
    poll_once(bucket, SETTLE, submit, now=T0 + 40)
    bucket.delete(STATE_KEY)  # as if a second, overlapping poll had not seen the first one's state
    poll_once(bucket, SETTLE, submit, now=T0 + 41)
    poll_once(bucket, SETTLE, submit, now=T0 + 80)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep_id])))
    assert len(runs) == 1
    assert runs[0].parameters["request"]["model_uri"] == bucket.url("models/n.onnx")
    assert runs[0].idempotency_key.startswith("n-")


def test_watch_bucket_flow_end_to_end_in_process(prefect_harness, bucket):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    dep_id = _make_deployment("watch-flow")
    put(bucket.root, "models/o.onnx", b"o", T0)  # long settled by the real clock
    first = watch.watch_bucket(str(bucket.root), settle_seconds=0, deployment="convert-model/watch-flow")
    second = watch.watch_bucket(str(bucket.root), settle_seconds=0, deployment="convert-model/watch-flow")
    assert [s["name"] for s in first["started"]] == ["o"] and second["started"] == []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep_id])))
    assert [str(r.id) for r in runs] == [first["started"][0]["flow_run_id"]]
