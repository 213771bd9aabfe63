"""Apply trtflow's deployments (infra/prefect.yaml) to a Prefect server, and create its work pools.

Deployments go through ``prefect deploy --all --prefect-file ...`` rather than ``flow.deploy()``:
infra/prefect.yaml stays the one description of them that operators read and run by hand, and
with a ``set_working_directory`` pull step and process pools nothing is built, pushed or cloned,
so it works offline. What the file cannot template (``prefect deploy`` validates schedules before
it fills ``{{ $VAR }}``), :func:`render_prefect_file` writes into a copy.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional

import yaml

from tasks.errors import InfraError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _prefect_file() -> Path:
    """infra/prefect.yaml of a checkout (editable install), else the copy a wheel installs as data."""
    checkout = PROJECT_ROOT / "infra" / "prefect.yaml"
    if checkout.exists():
        return checkout
    return Path(sys.prefix) / "share" / "trtflow" / "prefect.yaml"


PREFECT_FILE = _prefect_file()
POOLS = ("cpu", "gpu")

log = logging.getLogger("trtflow.deploy")


@dataclass
class DeploySettings:
    """What varies between installations; None keeps infra/prefect.yaml's value."""

    bucket: str
    code_dir: Path = PROJECT_ROOT
    watch_interval: Optional[float] = None   # seconds between polls of watch-bucket
    settle_seconds: Optional[float] = None   # a model must be unchanged this long
    nightly_cron: Optional[str] = None       # nightly-rebuild's schedule (UTC)


def prefect_command() -> list:
    """``python -m prefect`` of this interpreter: the same Prefect the flows import."""
    return [sys.executable, "-m", "prefect"]


def render_prefect_file(settings: DeploySettings, dest: Path, src: Path = PREFECT_FILE) -> Path:
    """Copy ``src`` to ``dest`` with the schedule and settle overrides of ``settings`` applied."""
    doc = yaml.safe_load(Path(src).read_text())
    for dep in doc.get("deployments", []):
        if dep["name"] == "watch-bucket":
            if settings.watch_interval is not None:
                dep["schedules"] = [{"interval": float(settings.watch_interval)}]
            if settings.settle_seconds is not None:
                dep.setdefault("parameters", {})["settle_seconds"] = float(settings.settle_seconds)
        if dep["name"] == "nightly-rebuild" and settings.nightly_cron:
            dep["schedules"] = [{"cron": settings.nightly_cron, "timezone": "UTC"}]
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(f"# Written by trtflow from {src}; edit that file, not this copy.\n"
                    + yaml.safe_dump(doc, sort_keys=False))
    return dest


def ensure_work_pools(names: Iterable[str] = POOLS) -> Dict[str, str]:
    """Create the process work pools that do not exist yet; returns {name: "created"|"exists"}."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    out = {}
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_work_pool(name)
                out[name] = "exists"
                continue
            except ObjectNotFound:
                pass
            try:
                client.create_work_pool(WorkPoolCreate(
                    name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template(),
                    description=f"trtflow {name} workers (process)"))
                out[name] = "created"
            except ObjectAlreadyExists:
                out[name] = "exists"
    return out


def apply_deployments(settings: DeploySettings, api_url: str, workdir: Path, env: Optional[dict] = None,
                      timeout_s: float = 300) -> Path:
    """Run ``prefect deploy --all`` for a rendered copy of infra/prefect.yaml; returns its log file.

    Raises:
        InfraError: ``prefect deploy`` failed (its log says why).
    """
    workdir = Path(workdir)
    prefect_file = render_prefect_file(settings, workdir / "prefect.yaml")
    log_path = workdir / "deploy.log"
    run_env = dict(os.environ if env is None else env)
    run_env.update(PREFECT_API_URL=api_url, TRTFLOW_BUCKET=settings.bucket,
                   TRTFLOW_CODE_DIR=str(Path(settings.code_dir).resolve()),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false")
    cmd = prefect_command() + ["--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)]
    with open(log_path, "wb") as out:
        try:
            rc = subprocess.run(cmd, cwd=settings.code_dir, env=run_env, stdout=out, stderr=subprocess.STDOUT,
                                timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    text = log_path.read_text(errors="replace")
    # `prefect deploy` exits 0 even when it skips a deployment over invalid fields.
    if rc != 0 or "Skipping deployment" in text or "Invalid fields" in text:
        raise InfraError(f"`prefect deploy` failed (exit {rc}). Last lines of {log_path}:\n"
                         + "\n".join(text.splitlines()[-25:]),
                         fix="Check PREFECT_API_URL and infra/prefect.yaml; run the command in the log by hand.")
    log.info("Deployments applied from %s", prefect_file)
    return log_path
