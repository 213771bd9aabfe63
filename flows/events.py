"""Event mode of the watcher: S3 event notifications delivered to SQS wake it at once.

``infra/setup-sqs.sh`` creates the queue and the bucket notification (:func:`setup_event_notifications`);
:func:`watch_events` long-polls the queue and, whenever a message names a package (or a pending
package is due), lists ``models/`` once and settles exactly like polling (flows/watch.py), with the
same state in the bucket. A message it cannot read (not JSON, no ``Records``, a record of the wrong
shape) is logged and dropped; S3's ``s3:TestEvent`` names no object and is skipped quietly.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Set
from urllib.parse import unquote_plus

from prefect import flow
from pydantic import BaseModel, Field, ValidationError

from flows.watch import (DEFAULT_DEPLOYMENT, PollResult, Submit, deployment_submitter, finish_poll, run_logger,
                         settle_and_submit)
from tasks.errors import InfraError
from tasks.package import MODELS_PREFIX, NAME_RE
from tasks.storage import Storage, open_storage
from tasks.watch_state import WatchState, load_state, next_settle_at, pending, save_state

log = logging.getLogger("trtflow.watch.events")


# ---- message bodies ----------------------------------------------------------------------------
class S3Object(BaseModel):
    key: str


class S3Entity(BaseModel):
    object_: S3Object = Field(alias="object")


class S3EventRecord(BaseModel):
    """The part of one S3 notification record the watcher reads (pydantic checks its shape)."""

    eventSource: str
    s3: S3Entity


@dataclass
class EventKeys:
    """Object keys named by one SQS message body (URL-decoded), and what in it could not be read."""

    keys: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)


def event_keys(body: str) -> EventKeys:
    """Read one SQS message body of S3 event notifications.

    S3 URL-encodes keys in events (``models%2Fa.onnx``, spaces as ``+``); the ``s3:TestEvent`` S3
    sends when the notification is configured names no object. SNS-wrapped notifications are
    unwrapped. Nothing here raises: a malformed body must not stop the watcher.
    """
    try:
        data = json.loads(body)
    except (TypeError, ValueError):
        return EventKeys(skipped=[f"message body is not JSON: {str(body)[:80]!r}"])
    if isinstance(data, dict) and data.get("Type") == "Notification" and isinstance(data.get("Message"), str):
        return event_keys(data["Message"])
    if isinstance(data, dict) and data.get("Event") == "s3:TestEvent":
        return EventKeys()
    if not isinstance(data, dict) or not isinstance(data.get("Records"), list):
        return EventKeys(skipped=[f"message has no Records list: {body[:80]!r}"])
    out = EventKeys()
    for i, raw in enumerate(data["Records"]):
        try:
            rec = S3EventRecord.model_validate(raw)
        except ValidationError as err:
            out.skipped.append(f"record {i} is not an S3 event record ({err.error_count()} problem(s): "
                               f"{err.errors()[0]['loc']} {err.errors()[0]['msg']})")
            continue
        if rec.eventSource == "aws:s3":
            out.keys.append(unquote_plus(rec.s3.object_.key))
    return out


def package_name_for_key(key: str, prefix: str = MODELS_PREFIX) -> Optional[str]:
    """The package an object key belongs to (``models/a.onnx`` -> ``a``, ``models/b/x/y`` -> ``b``)."""
    if not key.startswith(prefix):
        return None
    parts = key[len(prefix):].split("/")
    if len(parts) == 1:
        name = parts[0].split(".onnx")[0] if ".onnx" in parts[0] else ""
    else:
        name = parts[0]
    return name if name and NAME_RE.match(name) else None


# ---- the queue ---------------------------------------------------------------------------------
class EventSource:
    """SQS queue of S3 notifications (boto3, long polling)."""

    def __init__(self, queue_url: str, client=None):
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.client("sqs", config=Config(retries={"mode": "standard", "max_attempts": 5}))
        self.queue_url = queue_url
        self.client = client

    def receive(self, wait_seconds: int) -> List[dict]:
        r = self.client.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10,
                                        WaitTimeSeconds=max(0, min(20, int(wait_seconds))))
        return r.get("Messages", [])

    def delete(self, messages: List[dict]) -> None:
        for i in range(0, len(messages), 10):
            batch = messages[i:i + 10]
            self.client.delete_message_batch(QueueUrl=self.queue_url, Entries=[
                {"Id": str(j), "ReceiptHandle": m["ReceiptHandle"]} for j, m in enumerate(batch)])


def storage_prefix(storage: Storage) -> str:
    """The key prefix of an ``s3://bucket/prefix`` storage ("" for the bucket root or a folder)."""
    return getattr(storage, "prefix", "") or ""


def touched_packages(messages: List[dict], prefix: str, logger: logging.Logger = log) -> Set[str]:
    """Names of the packages the messages name; unreadable messages are logged and ignored."""
    touched: Set[str] = set()
    for m in messages:
        read = event_keys(m.get("Body", ""))
        for problem in read.skipped:
            logger.warning("Skipping SQS message %s: %s", m.get("MessageId", "?"), problem)
        for key in read.keys:
            name = package_name_for_key(key[len(prefix):]) if key.startswith(prefix) else None
            if name:
                touched.add(name)
    return touched


def _receive_wait(state: WatchState, settle_seconds: float, now: float, stop_at: Optional[float],
                  max_wait_s: int) -> int:
    """Seconds to long-poll: until the next package can settle, the end of the run, or ``max_wait_s``."""
    wake = next_settle_at(state, settle_seconds)
    wait = max_wait_s if wake is None else max(0, min(max_wait_s, int(wake - now + 0.999)))
    if stop_at is not None:
        wait = max(0, min(wait, int(stop_at - now)))
    return wait


def event_loop(storage: Storage, events: EventSource, settle_seconds: float, submit: Submit,
               clock: Callable[[], float], max_runtime_s: Optional[float], max_wait_s: int = 20,
               logger: logging.Logger = log) -> PollResult:
    """Consume S3 events until ``max_runtime_s``; list and settle whenever something changed or is pending.

    Messages are deleted only after the state that reflects them is saved, so a crash (or a listing
    that failed) re-delivers them.
    """
    total = PollResult()
    stop_at = None if max_runtime_s is None else clock() + max_runtime_s
    state = load_state(storage)
    prefix = storage_prefix(storage)
    first = True
    while stop_at is None or clock() < stop_at:
        messages = events.receive(_receive_wait(state, settle_seconds, clock(), stop_at, max_wait_s))
        touched = touched_packages(messages, prefix, logger)
        now = clock()
        wake = next_settle_at(state, settle_seconds)
        if first or touched or (wake is not None and now >= wake):
            # One listing settles everything: cheaper to reason about than per-key bookkeeping,
            # and it also notices changes whose events were lost.
            try:
                r = settle_and_submit(storage, state, settle_seconds, submit, now, logger)
                save_state(storage, state)
            except InfraError as err:
                logger.warning("Could not list or save the watch state (%s); trying again on the next wake", err)
                continue
            total.started += r.started
            total.errors += r.errors
            total.clashes = r.clashes
            first = False
            if touched:
                logger.info("Events for %s", ", ".join(sorted(touched)))
        if messages:
            events.delete(messages)
    total.waiting = pending(state)
    return total


NOTIFICATION_FILE = Path(__file__).resolve().parent.parent / "infra" / "s3-sqs-notification.json"
NOTIFICATION_ID = "trtflow-models"


def setup_event_notifications(bucket: str, queue_name: str = "trtflow-model-events", prefix: str = "",
                              s3=None, sqs=None, config_path: Path = NOTIFICATION_FILE) -> str:
    """Create the SQS queue, let the bucket send to it, and notify it of changes under ``<prefix>models/``.

    The bucket's other notification configurations are kept (S3 replaces the whole set on write).
    Used by infra/setup-sqs.sh. Returns the queue URL for :func:`watch_events`.
    """
    import boto3

    if s3 is None:
        s3 = boto3.client("s3", endpoint_url=os.environ.get("TRTFLOW_S3_ENDPOINT_URL") or None)
    sqs = sqs or boto3.client("sqs")
    queue_url = sqs.create_queue(QueueName=queue_name)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    policy = {"Version": "2012-10-17", "Statement": [{
        "Sid": "trtflow-s3-notifications", "Effect": "Allow", "Principal": {"Service": "s3.amazonaws.com"},
        "Action": "sqs:SendMessage", "Resource": arn,
        "Condition": {"ArnEquals": {"aws:SourceArn": f"arn:aws:s3:::{bucket}"}}}]}
    sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"Policy": json.dumps(policy)})
    ours = json.loads(Path(config_path).read_text())["QueueConfigurations"]
    for qc in ours:
        qc["QueueArn"] = arn
        for rule in qc.get("Filter", {}).get("Key", {}).get("FilterRules", []):
            if rule["Name"].lower() == "prefix":
                rule["Value"] = prefix.strip("/") + "/" + MODELS_PREFIX if prefix.strip("/") else MODELS_PREFIX
    current = s3.get_bucket_notification_configuration(Bucket=bucket)
    current.pop("ResponseMetadata", None)
    ids = {qc["Id"] for qc in ours}
    current["QueueConfigurations"] = [q for q in current.get("QueueConfigurations", []) if q.get("Id") not in ids] + ours
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration=current)
    return queue_url



@flow(name="watch-events")
def watch_events(queue_url: str, bucket_uri: str, settle_seconds: float = 30,
                 deployment: str = DEFAULT_DEPLOYMENT, max_runtime_s: Optional[float] = 3600) -> dict:
    """Event mode: wake on S3 notifications from SQS, settle, start conversions; stop after ``max_runtime_s``.

    Args:
        queue_url: the SQS queue receiving the bucket's notifications (see infra/setup-sqs.sh).
        bucket_uri: ``s3://bucket[/prefix]`` the notifications come from.
        settle_seconds: a model version must be unchanged this long before it is converted.
        deployment: the convert deployment, ``flow-name/deployment-name``.
        max_runtime_s: return after this long so a schedule restarts it (None runs until cancelled).
    """
    storage = open_storage(bucket_uri)
    result = event_loop(storage, EventSource(queue_url), settle_seconds, deployment_submitter(deployment),
                        time.time, max_runtime_s, logger=run_logger())
    return finish_poll(result)
