"""Poll the bucket's ``models/`` folder and start one ``convert-model`` run per settled model version.

Deployment ``watch-bucket`` (an interval schedule) runs :func:`watch_bucket`: each run lists
``models/`` once, folds the listing into the state kept in the bucket (tasks/watch_state.py: what
was seen, when a version settles) and starts a conversion for each due package. Event mode (S3
notifications through SQS) is flows/events.py; it settles packages with the same state.

What the watcher cannot read it skips and logs, and carries on with every other package: local
files that vanish or dangle while listed and S3 "folder" markers are left out by the storage
listing; two packages claiming one name get a status record naming the clash and the fix.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List

from prefect import flow

from flows.params import ConvertRequest
from tasks.errors import InfraError, ModelError
from tasks.package import list_packages, status_key
from tasks.publish import write_status
from tasks.storage import Storage, open_storage
from tasks.watch_state import Due, Observation, WatchState, load_state, observe, pending, save_state
from tasks.watch_state import idempotency_key, version_of  # noqa: F401 - tests/e2e/test_stack.py imports them from here

DEFAULT_DEPLOYMENT = "convert-model/convert-model"
CLASH_STAGE = "watch"   # the stage of status records the watcher itself writes

log = logging.getLogger("trtflow.watch")


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
    req = ConvertRequest(model_uri=storage.url(due.model_key), force=force, package_fingerprint=due.fingerprint)
    return {"request": req.model_dump(mode="json", exclude_unset=True)}


@dataclass
class PollResult:
    started: List[dict] = field(default_factory=list)   # {"name", "version", "flow_run_id", "idempotency_key", ...}
    waiting: List[str] = field(default_factory=list)     # still settling
    errors: List[str] = field(default_factory=list)
    clashes: Dict[str, List[str]] = field(default_factory=dict)  # name -> model keys claiming it (not converted)
    packages: int = 0  # packages the listing found, so a quiet poll can say what it looked at


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
                               "idempotency_key": d.idempotency_key, "package_fingerprint": d.fingerprint})
        logger.info("Started convert-model for %s (run %s, key %s)", d.name, run_id, d.idempotency_key)
    result.waiting = [n for n in pending(state) if n not in {d.name for d in due}]
    return result


def clash_error(name: str, model_keys: List[str]) -> ModelError:
    return ModelError(f"{len(model_keys)} packages claim the name {name!r}: {', '.join(model_keys)}; "
                      "the watcher converts neither until one is gone.",
                      fix=f"Keep one: delete or rename {' or '.join(model_keys)} (a folder package is "
                          "models/<name>/model.onnx, a single file models/<name>.onnx).")


def record_clashes(storage: Storage, seen: Observation, logger: logging.Logger = log) -> None:
    """A failed status record for each new name clash; the watcher's own record goes when it is resolved."""
    for name, keys in seen.new_clashes.items():
        err = clash_error(name, keys)
        logger.warning("Not converting %s: %s", name, err)
        write_status(storage, name=name, model_sha="", status="failed", stage=CLASH_STAGE, error=err)
    for name in seen.resolved_clashes:
        key = status_key(name, "")
        record = storage.read_json(key)  # type: ignore[attr-defined]
        if record and record.get("stage") == CLASH_STAGE:  # never remove a record the convert flow wrote
            storage.delete(key)
            logger.info("Name clash of %s resolved; it settles like a new upload", name)


def settle_and_submit(storage: Storage, state: WatchState, settle_seconds: float, submit: Submit, now: float,
                      logger: logging.Logger = log) -> PollResult:
    """List ``models/`` (the one listing of this poll), fold it into ``state``, record clashes, start due runs."""
    packages = list_packages(storage)
    seen = observe(state, storage.uri, packages, now, settle_seconds)
    record_clashes(storage, seen, logger)
    result = submit_due(storage, state, seen.due, submit, now, logger)
    result.clashes, result.packages = dict(state.clashes), len(packages)
    return result


def poll_once(storage: Storage, settle_seconds: float, submit: Submit, now: float,
              logger: logging.Logger = log) -> PollResult:
    """One poll: load state, list ``models/`` once, start due conversions, save state."""
    state = load_state(storage)
    result = settle_and_submit(storage, state, settle_seconds, submit, now, logger)
    save_state(storage, state)
    return result


def run_logger() -> logging.Logger:
    """The Prefect run logger inside a flow run (logs reach the UI), else the module logger."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()  # type: ignore[return-value]
    except MissingContextError:
        return log


def report_started(result: PollResult) -> None:
    """A table artifact of the runs this poll (or event run) started."""
    if not result.started:
        return
    from prefect.artifacts import create_table_artifact

    create_table_artifact(result.started, key="watch-started",
                          description="Conversions started by this poll (one per settled model version)")


def finish_poll(result: PollResult) -> dict:
    """The flow's return value; a start that failed fails the run so the UI shows it (the next poll retries)."""
    report_started(result)
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
    result = poll_once(storage, settle_seconds, deployment_submitter(deployment), time.time(), run_logger())
    return finish_poll(result)
