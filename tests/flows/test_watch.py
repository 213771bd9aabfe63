"""watch-bucket: settling with an injected clock, idempotency keys, persisted state, S3 events from SQS."""
from __future__ import annotations

import json
import os
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from flows import watch
from flows.watch import (STATE_KEY, Due, EventSource, PackageState, WatchState, event_loop, idempotency_key,
                         keys_from_message, load_state, observe, package_name_for_key, poll_once,
                         setup_event_notifications, version_of)
from tasks.package import list_packages
from tasks.storage import LocalStorage, S3Storage

T0 = 1_700_000_000.0  # file mtimes are pinned relative to this; the watcher's clock is injected
SETTLE = 30.0


def put(root: Path, key: str, data: bytes, mtime: float) -> None:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


class Recorder:
    """A Submit that records what would be started."""

    def __init__(self, fail: set[str] = frozenset()):
        self.calls: list[tuple[Due, dict]] = []
        self.fail = set(fail)

    def __call__(self, due: Due, params: dict) -> str:
        if due.name in self.fail:
            raise RuntimeError("API unreachable")
        self.calls.append((due, params))
        return f"run-{len(self.calls)}"

    @property
    def names(self) -> list[str]:
        return [d.name for d, _ in self.calls]


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
    assert params == {"request": {"model_uri": bucket.url("models/a.onnx"), "force": False}}
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
    assert observe(state, bucket.uri, list_packages(bucket), T0, SETTLE) == []
    assert observe(state, bucket.uri, list_packages(bucket), T0 + 110, SETTLE) == []
    assert [d.name for d in observe(state, bucket.uri, list_packages(bucket), T0 + 130, SETTLE)] == ["c"]


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
    d1 = observe(s1, bucket.uri, list_packages(bucket), T0 + 40, SETTLE)
    d2 = observe(s2, bucket.uri, list_packages(bucket), T0 + 45, SETTLE)
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


def test_package_name_for_key():
    assert package_name_for_key("models/a.onnx") == "a"
    assert package_name_for_key("models/a.onnx.data") == "a"
    assert package_name_for_key("models/b/calibration/x y.npy") == "b"
    assert package_name_for_key("engines/a/latest.json") is None
    assert package_name_for_key("models/..bad/model.onnx") is None
    assert package_name_for_key("models/readme.txt") is None


def test_event_message_parsing_decodes_keys_and_ignores_the_test_event():
    test_event = json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "b"})
    assert keys_from_message(test_event) == []
    rec = {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                        "s3": {"object": {"key": "models%2Fk%2Fcalibration%2Fimg+1.npy"}}}]}
    assert keys_from_message(json.dumps(rec)) == ["models/k/calibration/img 1.npy"]
    sns = json.dumps({"Type": "Notification", "Message": json.dumps(rec)})
    assert keys_from_message(sns) == ["models/k/calibration/img 1.npy"]
    assert keys_from_message("not json") == []


class FakeClock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


class ClockedEvents(EventSource):
    """Real SQS (moto) whose long poll advances the fake clock instead of waiting."""

    def __init__(self, queue_url, client, clock: FakeClock):
        super().__init__(queue_url, client)
        self.clock = clock
        self.received: list[dict] = []

    def receive(self, wait_seconds):
        msgs = super().receive(0)
        self.received += msgs
        self.clock.t += max(wait_seconds, 1)
        return msgs


def test_event_mode_with_moto_s3_notifications(aws_env):
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        sqs = boto3.client("sqs", region_name="us-east-1")
        s3.create_bucket(Bucket="models-bucket")
        other = sqs.create_queue(QueueName="someone-elses")["QueueUrl"]
        other_arn = sqs.get_queue_attributes(QueueUrl=other, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        s3.put_bucket_notification_configuration(Bucket="models-bucket", NotificationConfiguration={
            "QueueConfigurations": [{"Id": "theirs", "QueueArn": other_arn, "Events": ["s3:ObjectCreated:*"],
                                     "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "logs/"}]}}}]})
        # What infra/setup-sqs.sh runs: queue, queue policy, notification for models/ (twice: idempotent).
        for _ in range(2):
            q = setup_event_notifications("models-bucket", "trtflow-events", s3=s3, sqs=sqs)
        config = s3.get_bucket_notification_configuration(Bucket="models-bucket")["QueueConfigurations"]
        assert sorted(c["Id"] for c in config) == ["theirs", "trtflow-models"]
        policy = json.loads(sqs.get_queue_attributes(QueueUrl=q, AttributeNames=["Policy"])["Attributes"]["Policy"])
        assert policy["Statement"][0]["Condition"]["ArnEquals"]["aws:SourceArn"] == "arn:aws:s3:::models-bucket"
        storage = S3Storage("models-bucket", client=s3)
        s3.put_object(Bucket="models-bucket", Key="models/m1/model.onnx", Body=b"m1")
        s3.put_object(Bucket="models-bucket", Key="models/m1/calibration/img 1.npy", Body=b"c")
        s3.put_object(Bucket="models-bucket", Key="engines/m1/latest.json", Body=b"{}")  # outside the filter

        clock = FakeClock(datetime_now())
        events = ClockedEvents(q, sqs, clock)
        rec = Recorder()
        result = event_loop(storage, events, settle_seconds=5, submit=rec, clock=clock, max_runtime_s=30,
                            max_wait_s=20)
        bodies = [m["Body"] for m in events.received]
        assert any("s3:TestEvent" in b for b in bodies)           # moto sends it first, and it is skipped
        assert any("%2F" in b or "+" in b for b in bodies)        # keys really arrive URL-encoded
        keys = {k for b in bodies for k in keys_from_message(b)}
        assert keys == {"models/m1/model.onnx", "models/m1/calibration/img 1.npy"}
        assert rec.names == ["m1"] and [s["name"] for s in result.started] == ["m1"]
        assert sqs.receive_message(QueueUrl=q, WaitTimeSeconds=0).get("Messages") is None  # all deleted
        # The state it saved is the same state polling uses: a poll right after starts nothing.
        assert poll_once(storage, 5, rec, now=clock.t + 100).started == [] and rec.names == ["m1"]


def datetime_now() -> float:
    import time

    return time.time()


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
