"""Nightly rebuild: start ``convert-model`` for every package in the bucket.

Nothing here decides what is stale: each conversion computes its engine key (model sha + spec
build key + TensorRT version + GPU target) and finishes at once as a cache hit when that engine
exists. So a new TensorRT, a new GPU type, a changed spec or model is rebuilt, the rest costs one
short run each. ``force`` rebuilds everything.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from typing import Iterable, List, Optional

from prefect import flow

from flows.params import ConvertRequest
from flows.watch import DEFAULT_DEPLOYMENT
from tasks.errors import InfraError
from tasks.package import list_packages
from tasks.storage import Storage, open_storage

log = logging.getLogger("trtflow.rebuild")


def rebuild_key(bucket_uri: str, name: str, day: date, force: bool) -> str:
    """One run per package, bucket, day and mode: a retried or doubled nightly run starts nothing new.

    The bucket is hashed in because idempotency keys are unique per flow across the whole server,
    and two buckets may hold packages of the same name.
    """
    bucket = hashlib.sha256(bucket_uri.rstrip("/").encode()).hexdigest()[:8]
    return f"nightly-{day.isoformat()}-{bucket}-{name}-{'force' if force else 'stale'}"


@dataclass
class RebuildResult:
    started: List[dict] = field(default_factory=list)  # {"name", "flow_run_id", "idempotency_key"}
    errors: List[str] = field(default_factory=list)


def start_rebuilds(storage: Storage, day: date, force: bool, submit, logger: logging.Logger = log) -> RebuildResult:
    """Call ``submit(name, parameters, idempotency_key) -> run id`` once per package."""
    result = RebuildResult()
    for pkg in list_packages(storage):
        key = rebuild_key(storage.uri, pkg.name, day, force)
        params = {"request": ConvertRequest(model_uri=storage.url(pkg.model_key), force=force)
                  .model_dump(mode="json", exclude_unset=True)}
        try:
            run_id = submit(pkg.name, params, key)
        except Exception as err:  # noqa: BLE001 - one package must not stop the others; reported below
            logger.warning("Could not start a rebuild of %s: %s", pkg.name, err)
            result.errors.append(f"{pkg.name}: {err}")
            continue
        result.started.append({"name": pkg.name, "flow_run_id": run_id, "idempotency_key": key})
        logger.info("Started convert-model for %s (run %s)", pkg.name, run_id)
    return result


def _run_day() -> date:
    """The UTC date this run was scheduled for (a late or retried run keeps its keys)."""
    from prefect.runtime import flow_run

    scheduled = flow_run.scheduled_start_time
    if scheduled is None:
        return datetime.now(timezone.utc).date()
    return scheduled.astimezone(timezone.utc).date()


def deployment_submitter(deployment: str, tags: Iterable[str] = ("trtflow", "nightly")):
    from prefect.deployments import run_deployment

    def submit(name: str, parameters: dict, key: str) -> str:
        # as_subflow=False: conversions outlive this run (see flows/watch.py).
        run = run_deployment(deployment, parameters=parameters, timeout=0, idempotency_key=key,
                             tags=list(tags), as_subflow=False)
        return str(run.id)

    return submit


@flow(name="nightly-rebuild")
def nightly_rebuild(bucket_uri: str, force: bool = False, deployment: str = DEFAULT_DEPLOYMENT,
                    day: Optional[date] = None) -> dict:
    """Start a conversion of every model in the bucket; current engines finish as cache hits.

    Args:
        bucket_uri: ``s3://bucket[/prefix]`` or a local folder.
        force: rebuild even engines that exist.
        deployment: the convert deployment, ``flow-name/deployment-name``.
        day: the date the idempotency keys use (default: the run's scheduled date, UTC).
    """
    from prefect.logging import get_run_logger

    storage = open_storage(bucket_uri)
    result = start_rebuilds(storage, day or _run_day(), force, deployment_submitter(deployment), get_run_logger())
    if result.errors:
        raise InfraError(f"could not start {len(result.errors)} rebuild(s): {'; '.join(result.errors)}",
                         fix="Check that the convert-model deployment exists and the Prefect API is reachable, "
                             "then run nightly-rebuild again (started runs are not duplicated).")
    return asdict(result)
