"""watch-events: S3 notifications through SQS (moto), malformed messages, settling with the poll's state."""
from __future__ import annotations

import json
import logging
import time

import boto3
import pytest
from moto import mock_aws

from flows.events import (EventKeys, EventSource, event_keys, event_loop, package_name_for_key,
                          setup_event_notifications, touched_packages)
from flows.watch import poll_once
from tasks.errors import InfraError
from tasks.storage import LocalStorage, S3Storage
from tests.flows.watch_doubles import Recorder


def test_package_name_for_key():
    assert package_name_for_key("models/a.onnx") == "a"
    assert package_name_for_key("models/a.onnx.data") == "a"
    assert package_name_for_key("models/b/calibration/x y.npy") == "b"
    assert package_name_for_key("engines/a/latest.json") is None
    assert package_name_for_key("models/..bad/model.onnx") is None
    assert package_name_for_key("models/readme.txt") is None


def test_event_message_parsing_decodes_keys_and_ignores_the_test_event():
    test_event = json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "b"})
    assert event_keys(test_event) == EventKeys()                   # skipped quietly: names no object
    rec = {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                        "s3": {"object": {"key": "models%2Fk%2Fcalibration%2Fimg+1.npy"}}}]}
    assert event_keys(json.dumps(rec)).keys == ["models/k/calibration/img 1.npy"]
    sns = json.dumps({"Type": "Notification", "Message": json.dumps(rec)})
    assert event_keys(sns).keys == ["models/k/calibration/img 1.npy"]


GOOD_RECORD = {"eventSource": "aws:s3", "s3": {"object": {"key": "models/good.onnx"}}}


@pytest.mark.parametrize("body, problem", [
    ("not json", "not JSON"),
    ("", "not JSON"),
    ("[1, 2]", "no Records list"),
    (json.dumps({"hello": "world"}), "no Records list"),
    (json.dumps({"Records": "models/a.onnx"}), "no Records list"),
    (json.dumps({"Records": ["models/a.onnx"]}), "record 0 is not an S3 event record"),
    (json.dumps({"Records": [{"eventSource": "aws:s3", "s3": {"object": {"key": 5}}}]}), "record 0"),
    (json.dumps({"Records": [{"eventSource": "aws:s3", "s3": {}}]}), "record 0"),
    (json.dumps({"Type": "Notification", "Message": "{broken"}), "not JSON"),
])
def test_malformed_bodies_are_reported_never_raised(body, problem):
    read = event_keys(body)
    assert read.keys == [] and len(read.skipped) == 1 and problem in read.skipped[0]


def test_one_bad_record_does_not_hide_the_good_ones():
    body = json.dumps({"Records": [{"eventSource": "aws:s3"}, GOOD_RECORD,
                                   {"eventSource": "aws:sqs", "s3": {"object": {"key": "models/other.onnx"}}}]})
    read = event_keys(body)
    assert read.keys == ["models/good.onnx"] and len(read.skipped) == 1 and "record 0" in read.skipped[0]


def test_touched_packages_logs_what_it_skips(caplog):
    msgs = [{"MessageId": "m-bad", "Body": "{not json"},
            {"MessageId": "m-ok", "Body": json.dumps({"Records": [GOOD_RECORD]})},
            {"MessageId": "m-none"}]
    with caplog.at_level(logging.WARNING, logger="trtflow.watch.events"):
        assert touched_packages(msgs, "") == {"good"}
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "m-bad" in text and "m-none" in text and "m-ok" not in text


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

        clock = FakeClock(time.time())
        events = ClockedEvents(q, sqs, clock)
        rec = Recorder()
        result = event_loop(storage, events, settle_seconds=5, submit=rec, clock=clock, max_runtime_s=30,
                            max_wait_s=20)
        bodies = [m["Body"] for m in events.received]
        assert any("s3:TestEvent" in b for b in bodies)           # moto sends it first, and it is skipped
        assert any("%2F" in b or "+" in b for b in bodies)        # keys really arrive URL-encoded
        keys = {k for b in bodies for k in event_keys(b).keys}
        assert keys == {"models/m1/model.onnx", "models/m1/calibration/img 1.npy"}
        assert rec.names == ["m1"] and [s["name"] for s in result.started] == ["m1"]
        assert sqs.receive_message(QueueUrl=q, WaitTimeSeconds=0).get("Messages") is None  # all deleted
        # The state it saved is the same state polling uses: a poll right after starts nothing.
        assert poll_once(storage, 5, rec, now=clock.t + 100).started == [] and rec.names == ["m1"]


class FailsOneListing(LocalStorage):
    """Test double: a real local bucket whose n-th listing fails as S3 does when it is unreachable."""

    def __init__(self, root, fail_at: int):
        super().__init__(root)
        self.listings = 0
        self.fail_at = fail_at

    def list(self, prefix: str = ""):
        self.listings += 1
        if self.listings == self.fail_at:
            raise InfraError(f"listing {self.uri}{prefix}: Could not connect to the endpoint URL")
        return super().list(prefix)


def _s3_event(key: str) -> str:
    return json.dumps({"Records": [{"eventSource": "aws:s3", "s3": {"object": {"key": key.replace("/", "%2F")}}}]})


def test_malformed_messages_and_a_failed_listing_do_not_stop_watch_events(aws_env, tmp_path, caplog):
    # Listing 1 (woken by the messages) sees ev still settling; listing 2 (ev due) fails; listing 3 starts it.
    bucket = FailsOneListing(tmp_path / "bucket", fail_at=2)
    (bucket.root / "models").mkdir()
    (bucket.root / "models/ev.onnx").write_bytes(b"ev")
    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        q = sqs.create_queue(QueueName="trtflow-events")["QueueUrl"]
        for body in ("not json", json.dumps({"no": "records"}), json.dumps({"Records": [42]}),
                     json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"}), _s3_event("models/ev.onnx")):
            sqs.send_message(QueueUrl=q, MessageBody=body)
        clock = FakeClock(time.time() + 60)   # the file is older than the settle time by this clock
        rec = Recorder()
        with caplog.at_level(logging.WARNING, logger="trtflow.watch.events"):
            result = event_loop(bucket, ClockedEvents(q, sqs, clock), settle_seconds=5, submit=rec, clock=clock,
                                max_runtime_s=60, max_wait_s=5)
        assert rec.names == ["ev"] and result.errors == [] and bucket.listings == 3
        text = " ".join(r.getMessage() for r in caplog.records)
        assert "not JSON" in text and "no Records list" in text and "record 0" in text
        assert "Could not list" in text                          # the failed listing was logged, then retried
        left = sqs.get_queue_attributes(QueueUrl=q, AttributeNames=["All"])["Attributes"]
        # Deleted, not merely invisible: a malformed message is not re-delivered to trip the watcher again.
        assert (left["ApproximateNumberOfMessages"], left["ApproximateNumberOfMessagesNotVisible"]) == ("0", "0")
