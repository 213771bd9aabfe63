"""What the GPU pool's workers run, recorded where the CPU side can read it.

Each GPU worker probes its TensorRT and GPU once when it starts and writes the probe to
``_trtflow/workers/<worker id>.json`` in the bucket (:func:`record_worker_probe`). convert-model,
on the CPU pool, reads those records (:func:`known_targets`) to validate and prepare a model for
the TensorRT that will build it, before any GPU work starts. With no record, the setting
``TRTFLOW_TARGET_TRT`` names the target (default 8.6).

Start a GPU worker with ``python -m flows.workers gpu --pool gpu --name gpu0-host --limit 1``: it
probes, records, then becomes ``prefect worker start`` (exec, so signals reach Prefect directly).
"""
from __future__ import annotations

import os
import socket
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

import typer

from tasks.errors import TrtflowError
from tasks.gpu.compat import Caps, caps_for_version
from tasks.gpu_client import GpuEnv, gpu_env_from_dict, probe_gpu
from tasks.package import WORKERS_PREFIX, worker_key
from tasks.storage import Storage, open_storage

WORKER_SCHEMA = "trtflow.worker/v1"
DEFAULT_TARGET_TRT = "8.6"
TARGET_SETTING = "TRTFLOW_TARGET_TRT"


@dataclass(frozen=True)
class WorkerRecord:
    """One GPU worker's probe as recorded in the bucket."""

    worker: str
    pool: str
    env: GpuEnv
    recorded_at: str


@dataclass(frozen=True)
class Target:
    """The TensorRT a model is validated and prepared for, and where that choice came from."""

    tensorrt: str
    source: str              # "GPU worker gpu0-host (pool gpu, recorded ...)" or "setting TRTFLOW_TARGET_TRT=8.6"
    env: Optional[GpuEnv] = None  # the worker's probe; None when only the setting is known

    @property
    def key(self) -> Optional[str]:
        """``sm_90-trt8.6.0`` (the engines' cache key part) when a worker is known."""
        return self.env.target if self.env else None

    @property
    def caps(self) -> dict:
        return dict(self.env.caps) if self.env else {}

    def policy(self) -> Caps:
        """The one TensorRT policy object for this target: the worker's probed caps, else the version's."""
        return self.env.policy() if self.env else caps_for_version(self.tensorrt)

    def to_dict(self) -> dict:
        return {"tensorrt": self.tensorrt, "source": self.source, "key": self.key}


def record_worker_probe(storage: Storage, worker_id: str, env: GpuEnv, pool: str = "gpu") -> str:
    """Write ``env`` (a probe_gpu result) as worker ``worker_id``'s record; returns its key."""
    key = worker_key(worker_id)
    storage.write_json(key, {"schema": WORKER_SCHEMA, "worker": worker_id, "pool": pool, "env": env.to_dict(),
                             "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return key


def known_targets(storage: Storage, pool: str = "gpu") -> List[WorkerRecord]:
    """Every recorded GPU worker of ``pool``, the most recently started first."""
    records = []
    for obj in storage.list(WORKERS_PREFIX):
        data = storage.read_json(obj.key) if obj.key.endswith(".json") else None
        env = gpu_env_from_dict((data or {}).get("env") or {})
        if data and env and data.get("pool", "gpu") == pool:
            records.append(WorkerRecord(data.get("worker", ""), data.get("pool", "gpu"), env,
                                        data.get("recorded_at", "")))
    return sorted(records, key=lambda r: r.recorded_at, reverse=True)


def target_for_validation(storage: Optional[Storage], pool: str = "gpu") -> Target:
    """The newest recorded worker of ``pool``, else the ``TRTFLOW_TARGET_TRT`` setting (default 8.6).

    The newest record wins because a pool upgraded to a new TensorRT starts its new workers last;
    a pool that mixes versions should be split into one pool per version.
    """
    records = known_targets(storage, pool) if storage is not None else []  # None: a loose file, no bucket
    if records:
        r = records[0]
        return Target(r.env.tensorrt, f"GPU worker {r.worker} (pool {r.pool}, recorded {r.recorded_at})", r.env)
    setting = os.environ.get(TARGET_SETTING)
    if setting:
        return Target(setting, f"setting {TARGET_SETTING}={setting} (no GPU worker of pool {pool} recorded)")
    return Target(DEFAULT_TARGET_TRT, f"default TensorRT {DEFAULT_TARGET_TRT} (no GPU worker of pool {pool} "
                                      f"recorded, {TARGET_SETTING} unset)")


app = typer.Typer(add_completion=False, help="Start trtflow workers.")


@app.callback()
def _workers() -> None:
    """Keeps ``gpu`` a subcommand (typer runs a lone command without its name otherwise)."""


@app.command("gpu")
def gpu_worker(pool: str = typer.Option("gpu", help="Prefect work pool to poll."),
               name: str = typer.Option("", help="Worker name (default gpu-<host>); also its record's id."),
               limit: int = typer.Option(1, help="Flow runs at a time (one build per worker)."),
               bucket: str = typer.Option("", envvar="TRTFLOW_BUCKET", help="Bucket URI to record the probe in.")):
    """Probe TensorRT/GPU, record it in the bucket, then run `prefect worker start` for ``pool``."""
    if not bucket:
        raise typer.BadParameter("no bucket: pass --bucket s3://... or set TRTFLOW_BUCKET.")
    name = name or f"gpu-{socket.gethostname()}"
    try:
        env = probe_gpu(Path(tempfile.mkdtemp(prefix="trtflow-probe-")), timeout_s=120)
    except TrtflowError as err:
        typer.echo(f"not starting GPU worker {name}: {err.message}\nfix: {err.fix}", err=True)
        raise typer.Exit(2)
    key = record_worker_probe(open_storage(bucket), name, env, pool)
    typer.echo(f"GPU worker {name}: TensorRT {env.tensorrt} on {env.gpu} ({env.sm}); recorded at {key}")
    argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
            "--limit", str(limit), "--name", name]
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    app()
