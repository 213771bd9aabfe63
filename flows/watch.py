"""Watch the bucket's ``models/`` folder and start one ``convert-model`` run per settled model version.

Polling (the default, deployment ``watch-bucket`` on an interval schedule): each run lists
``models/`` once, compares every package's fingerprint with the state kept from earlier polls, and
starts a conversion for each package whose current version has *settled*: seen unchanged by the
watcher for ``settle_seconds`` **and** last modified at least ``settle_seconds`` ago. Watching the
fingerprint over consecutive polls catches multi-file uploads still in progress (a folder package
whose ``model.onnx.data`` or ``trtflow.yaml`` arrives later); the ``last_modified`` check covers a
watcher that starts while an upload is under way.

Event mode (:func:`watch_events`): S3 event notifications delivered to SQS (set up by
``infra/setup-sqs.sh``) wake the watcher at once; it then settles packages exactly like polling.

State lives in the bucket itself, ``_trtflow/watch/state.json``, rather than in a Prefect Variable:
it must survive worker restarts (every poll is a fresh process anyway), grows with the number of
models (Prefect variable values are size-limited), belongs to the bucket it describes (a new
Prefect server or a second watcher sees the same state), and is a file people can read. Writers
can race (two overlapping polls) and the last one wins; that costs at most one extra poll of
delay, never a duplicate, because every start carries an idempotency key that the Prefect server
turns into "return the run that already exists".
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Set
from urllib.parse import unquote_plus

from prefect import flow

from flows.params import ConvertRequest
from tasks.errors import InfraError
from tasks.package import MODELS_PREFIX, NAME_RE, ModelPackage, list_packages
from tasks.storage import Storage, open_storage

STATE_KEY = "_trtflow/watch/state.json"
STATE_VERSION = 1
DEFAULT_DEPLOYMENT = "convert-model/convert-model"

log = logging.getLogger("trtflow.watch")


# ---- state -------------------------------------------------------------------------------------
@dataclass
class PackageState:
    """What the watcher knows about one package between polls (times are epoch seconds)."""

    version: str             # version fingerprint last seen (see version_of)
    seen_at: float           # watcher clock when that version was first seen
    last_modified: float     # newest file of that version, from the listing
    submitted: str = ""      # version whose conversion was started ("" = none yet)
    flow_run_id: str = ""
    submitted_at: float = 0.0


@dataclass
class WatchState:
    packages: Dict[str, PackageState] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"version": STATE_VERSION, "packages": {k: asdict(v) for k, v in sorted(self.packages.items())}}

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> "WatchState":
        if not data or data.get("version") != STATE_VERSION:
            return cls()  # unknown layout: start afresh; idempotency keys still prevent duplicates
        fields = set(PackageState.__dataclass_fields__)
        return cls({name: PackageState(**{k: v for k, v in p.items() if k in fields})
                    for name, p in data.get("packages", {}).items()})


def load_state(storage: Storage) -> WatchState:
    return WatchState.from_dict(storage.read_json(STATE_KEY))  # type: ignore[attr-defined]


def save_state(storage: Storage, state: WatchState) -> None:
    storage.write_json(STATE_KEY, state.to_dict())  # type: ignore[attr-defined]


# ---- settling (pure) ---------------------------------------------------------------------------
def version_of(storage_uri: str, pkg: ModelPackage) -> str:
    """Fingerprint of one upload of a package.

    The package fingerprint (key, size and ETag of every file, trtflow.yaml included) plus the
    newest last-modified time and the bucket: S3 gives identical bytes the same ETag, so without the
    time a model reverted to an earlier upload would reuse that upload's idempotency key and never
    be converted (and re-published as latest) again.
    """
    h = hashlib.sha256()
    h.update(f"{storage_uri}\0{pkg.fingerprint}\0{pkg.last_modified.timestamp():.6f}".encode())
    return h.hexdigest()


def idempotency_key(name: str, version: str) -> str:
    """Same package version -> same key, so overlapping polls start one run between them."""
    return f"{name}-{version[:16]}"


@dataclass(frozen=True)
class Due:
    """A settled package version whose conversion has not been started yet."""

    name: str
    model_key: str
    version: str

    @property
    def idempotency_key(self) -> str:
        return idempotency_key(self.name, self.version)


def observe(state: WatchState, storage_uri: str, packages: Iterable[ModelPackage], now: float,
            settle_seconds: float) -> List[Due]:
    """Fold one listing into ``state`` and return the packages that are due for conversion.

    Packages absent from the listing are forgotten (a deleted package that comes back is new).
    """
    due: List[Due] = []
    listed: Set[str] = set()
    for pkg in packages:
        listed.add(pkg.name)
        version = version_of(storage_uri, pkg)
        last_modified = pkg.last_modified.timestamp()
        st = state.packages.get(pkg.name)
        if st is None or st.version != version:
            st = PackageState(version, now, last_modified,
                              submitted=st.submitted if st else "", flow_run_id=st.flow_run_id if st else "",
                              submitted_at=st.submitted_at if st else 0.0)
            state.packages[pkg.name] = st
        if st.submitted == version:
            continue
        if now - st.seen_at >= settle_seconds and now - st.last_modified >= settle_seconds:
            due.append(Due(pkg.name, pkg.model_key, version))
    for name in set(state.packages) - listed:
        del state.packages[name]
    return due


def pending(state: WatchState) -> List[str]:
    """Packages seen but not yet started (still settling, or their start failed)."""
    return sorted(n for n, p in state.packages.items() if p.submitted != p.version)


def next_settle_at(state: WatchState, settle_seconds: float) -> Optional[float]:
    """Earliest watcher time at which a pending package can be due."""
    times = [max(p.seen_at, p.last_modified) + settle_seconds
             for p in state.packages.values() if p.submitted != p.version]
    return min(times) if times else None


# ---- starting conversions ----------------------------------------------------------------------
Submit = Callable[[Due, dict], str]
"""Starts one conversion for a due package with the given ``{"request": ...}`` parameters; returns the run id."""


def deployment_submitter(deployment: str = DEFAULT_DEPLOYMENT, tags: Iterable[str] = ("trtflow", "watch")) -> Submit:
    """A :data:`Submit` that calls ``run_deployment`` without waiting for the run."""
    from prefect.deployments import run_deployment

    def submit(due: Due, parameters: dict) -> str:
        # as_subflow=False: a conversion must outlive the poll that started it (cancelling a parent
        # flow run cancels its subflows), and idempotent re-submissions from later polls would
        # otherwise be attributed to whichever poll came first.
        run = run_deployment(deployment, parameters=parameters, timeout=0, idempotency_key=due.idempotency_key,
                             tags=list(tags), as_subflow=False)
        return str(run.id)

    return submit


def request_for(storage: Storage, due: Due, force: bool = False) -> dict:
    """The convert-model parameters for one package."""
    req = ConvertRequest(model_uri=storage.url(due.model_key), force=force)
    return {"request": req.model_dump(mode="json", exclude_unset=True)}


@dataclass
class PollResult:
    started: List[dict] = field(default_factory=list)   # {"name", "version", "flow_run_id", "idempotency_key"}
    waiting: List[str] = field(default_factory=list)     # still settling
    errors: List[str] = field(default_factory=list)


def submit_due(storage: Storage, state: WatchState, due: List[Due], submit: Submit, now: float,
               logger: logging.Logger = log) -> PollResult:
    """Start every due conversion and record it in ``state``; one failure does not stop the others."""
    result = PollResult()
    for d in due:
        try:
            run_id = submit(d, request_for(storage, d))
        except Exception as err:  # noqa: BLE001 - reported below and retried on the next poll
            logger.warning("Could not start a conversion of %s: %s", d.name, err)
            result.errors.append(f"{d.name}: {err}")
            continue
        st = state.packages[d.name]
        st.submitted, st.flow_run_id, st.submitted_at = d.version, run_id, now
        result.started.append({"name": d.name, "version": d.version[:16], "flow_run_id": run_id,
                               "idempotency_key": d.idempotency_key})
        logger.info("Started convert-model for %s (run %s, key %s)", d.name, run_id, d.idempotency_key)
    result.waiting = [n for n in pending(state) if n not in {d.name for d in due}]
    return result


def poll_once(storage: Storage, settle_seconds: float, submit: Submit, now: float,
              logger: logging.Logger = log) -> PollResult:
    """One poll: load state, list ``models/``, start due conversions, save state."""
    state = load_state(storage)
    due = observe(state, storage.uri, list_packages(storage), now, settle_seconds)
    result = submit_due(storage, state, due, submit, now, logger)
    save_state(storage, state)
    return result


def _run_logger() -> logging.Logger:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()  # type: ignore[return-value]
    except MissingContextError:
        return log


def _report(result: PollResult) -> None:
    if not result.started:
        return
    from prefect.artifacts import create_table_artifact

    create_table_artifact(result.started, key="watch-started",
                          description="Conversions started by this poll (one per settled model version)")


def _finish(result: PollResult) -> dict:
    _report(result)
    if result.errors:
        raise InfraError(f"could not start {len(result.errors)} conversion(s): {'; '.join(result.errors)}",
                         fix="Check that the convert-model deployment exists and the Prefect API is reachable; "
                             "the next poll tries again.")
    return asdict(result)


@flow(name="watch-bucket", log_prints=False)
def watch_bucket(bucket_uri: str, settle_seconds: float = 30, deployment: str = DEFAULT_DEPLOYMENT) -> dict:
    """Poll the bucket once and start a conversion for every new or changed model that has settled.

    Args:
        bucket_uri: ``s3://bucket[/prefix]`` or a local folder; models are under ``models/``.
        settle_seconds: a model version must be unchanged this long before it is converted.
        deployment: the convert deployment, ``flow-name/deployment-name``.
    """
    storage = open_storage(bucket_uri)
    result = poll_once(storage, settle_seconds, deployment_submitter(deployment), time.time(), _run_logger())
    return _finish(result)


# ---- event mode (S3 -> SQS) --------------------------------------------------------------------
def keys_from_message(body: str) -> List[str]:
    """Object keys named by one SQS message body of S3 event notifications (URL-decoded).

    S3 URL-encodes keys in events (``models%2Fa.onnx``, spaces as ``+``); the ``s3:TestEvent`` S3
    sends when the notification is configured names no object. SNS-wrapped notifications are
    unwrapped.
    """
    try:
        data = json.loads(body)
    except ValueError:
        return []
    if isinstance(data, dict) and data.get("Type") == "Notification" and isinstance(data.get("Message"), str):
        return keys_from_message(data["Message"])
    if not isinstance(data, dict) or data.get("Event") == "s3:TestEvent":
        return []
    keys = []
    for rec in data.get("Records") or []:
        if rec.get("eventSource") != "aws:s3":
            continue
        key = ((rec.get("s3") or {}).get("object") or {}).get("key")
        if key:
            keys.append(unquote_plus(key))
    return keys


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


def event_loop(storage: Storage, events: EventSource, settle_seconds: float, submit: Submit,
               clock: Callable[[], float], max_runtime_s: Optional[float], max_wait_s: int = 20,
               logger: logging.Logger = log) -> PollResult:
    """Consume S3 events until ``max_runtime_s``; list and settle whenever something changed or is pending.

    Messages are deleted only after the state that reflects them is saved, so a crash re-delivers them.
    """
    total = PollResult()
    start = clock()
    state = load_state(storage)
    prefix = storage_prefix(storage)
    first = True
    while max_runtime_s is None or clock() - start < max_runtime_s:
        wake = next_settle_at(state, settle_seconds)
        wait = max_wait_s if wake is None else max(0, min(max_wait_s, int(wake - clock() + 0.999)))
        if max_runtime_s is not None:
            wait = max(0, min(wait, int(start + max_runtime_s - clock())))
        messages = events.receive(wait)
        touched = set()
        for m in messages:
            for key in keys_from_message(m.get("Body", "")):
                if key.startswith(prefix):
                    name = package_name_for_key(key[len(prefix):])
                    if name:
                        touched.add(name)
        now = clock()
        wake = next_settle_at(state, settle_seconds)
        if first or touched or (wake is not None and now >= wake):
            # One listing settles everything: cheaper to reason about than per-key bookkeeping,
            # and it also notices changes whose events were lost.
            due = observe(state, storage.uri, list_packages(storage), now, settle_seconds)
            r = submit_due(storage, state, due, submit, now, logger)
            total.started += r.started
            total.errors += r.errors
            save_state(storage, state)
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
                        time.time, max_runtime_s, logger=_run_logger())
    return _finish(result)
