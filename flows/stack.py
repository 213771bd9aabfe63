"""``trtflow up`` / ``trtflow down``: all of trtflow on one machine, from nothing, with one command.

``up`` starts a Prefect server (SQLite under the state folder, or uses ``PREFECT_API_URL``),
creates the ``cpu`` and ``gpu`` process work pools, applies infra/prefect.yaml's deployments,
starts a CPU worker and, where ``TRT_PYTHON`` imports TensorRT, one GPU worker per GPU
(``CUDA_VISIBLE_DEVICES=<i>``, ``--limit 1``). The bucket defaults to a folder in the state
folder (``file://<state>/bucket``). Every process it starts is recorded in ``<state>/stack.json``
with its start time, so ``down`` stops exactly those (and what they started), never a process that
merely reused a PID.

Environment: ``TRTFLOW_HOME`` (state folder, default ~/.trtflow), ``TRTFLOW_BUCKET``,
``TRTFLOW_GPUS`` ("0,1", or "none"), ``PREFECT_API_URL`` (use that server),
``PREFECT_API_DATABASE_CONNECTION_URL`` (the started server's database, e.g. PostgreSQL),
``TRTFLOW_S3_ENDPOINT_URL`` (MinIO); see infra/README.md.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from flows.deploy import PROJECT_ROOT, DeploySettings, apply_deployments, ensure_work_pools, prefect_command
from flows.supervise import Proc, is_alive, spawn, stop_processes, tail
from tasks.errors import InfraError

log = logging.getLogger("trtflow.stack")

STACK_FILE = "stack.json"
DEFAULT_PORT = 4200


def trtflow_home() -> Path:
    """The one home of local state (stack.json, logs, the local bucket): ``TRTFLOW_HOME``, else
    ``~/.trtflow`` - never the current folder, so `trtflow down` works from anywhere."""
    return Path(os.environ.get("TRTFLOW_HOME") or Path.home() / ".trtflow").expanduser().resolve()


def running_stack(state_dir: Optional[Path] = None) -> Optional["StackInfo"]:
    """The stack recorded in ``state_dir`` (default trtflow_home()) if any of its processes still runs."""
    info = StackInfo.load(Path(state_dir) if state_dir else trtflow_home())
    return info if info is not None and any(is_alive(p) for p in info.processes) else None


@dataclass
class StackOptions:
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    bucket: Optional[str] = None           # default: file://<state>/bucket
    api_url: Optional[str] = None          # an existing Prefect server; None starts one
    gpus: Optional[List[str]] = None       # GPU indices for GPU workers; None detects
    watch_interval: Optional[float] = 30.0
    settle_seconds: Optional[float] = 30.0
    nightly_cron: Optional[str] = None     # None keeps infra/prefect.yaml's (02:00 UTC)
    code_dir: Path = PROJECT_ROOT
    timeout_s: float = 180.0


@dataclass
class StackInfo:
    state_dir: str
    api_url: str
    ui_url: str
    bucket: str
    drop_folder: Optional[str]
    gpus: List[str]
    gpu_note: str
    processes: List[Proc] = field(default_factory=list)

    def save(self) -> None:
        path = Path(self.state_dir) / STACK_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, state_dir: Path) -> Optional["StackInfo"]:
        path = Path(state_dir) / STACK_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        # A record from before psutil (start_ticks, no create_time) names processes that cannot be
        # told from PID reuse: leave them out rather than risk signalling a stranger.
        data["processes"] = [Proc(**p) for p in data.get("processes", []) if "create_time" in p]
        return cls(**data)


# ---- readiness ---------------------------------------------------------------------------------
def wait_for_api(api_url: str, timeout_s: float, server: Optional[Proc] = None) -> None:
    """Wait until ``<api_url>/health`` answers; fail early if the server process died."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if server is not None and not is_alive(server):
            raise InfraError(f"the Prefect server exited during start-up. Last lines of {server.log}:\n"
                             + tail(server.log),
                             fix="See the log; a port in use or a bad PREFECT_API_DATABASE_CONNECTION_URL are usual.")
        try:
            with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as err:
            last = str(err)
        time.sleep(0.5)  # polling for readiness, bounded by the deadline
    raise InfraError(f"the Prefect API at {api_url} did not answer within {timeout_s:.0f} s ({last}).",
                     fix="Check that the server runs and PREFECT_API_URL ends in /api.")


def wait_for_workers(expected: Dict[str, List[str]], timeout_s: float, procs: List[Proc]) -> None:
    """Wait until every named worker has sent a heartbeat to its pool."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    missing: List[str] = []
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.role.startswith("worker") and not is_alive(proc):
                raise InfraError(f"{proc.role} exited during start-up. Last lines of {proc.log}:\n{tail(proc.log)}",
                                 fix="See the worker log.")
        missing = []
        with get_client(sync_client=True) as client:
            for pool, names in expected.items():
                online = {w.name for w in client.read_workers_for_work_pool(pool)
                          if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"}
                missing += [f"{pool}/{n}" for n in names if n not in online]
        if not missing:
            return
        time.sleep(0.5)  # polling worker heartbeats, bounded by the deadline
    raise InfraError(f"workers {', '.join(missing)} did not come online within {timeout_s:.0f} s.",
                     fix="See the worker logs under the state folder's logs/.")


# ---- GPUs --------------------------------------------------------------------------------------
def detect_gpus(workdir: Path) -> Tuple[List[str], str]:
    """GPU indices to start workers for, and a sentence saying why.

    ``TRTFLOW_GPUS`` decides when set ("0,1" or "none"). Otherwise TensorRT must import in
    ``TRT_PYTHON`` (probe_gpu), and ``nvidia-smi`` lists the GPUs (one GPU if it is missing).
    """
    from tasks.gpu_client import probe_gpu, trt_python

    forced = os.environ.get("TRTFLOW_GPUS")
    if forced is not None:
        ids = [g.strip() for g in forced.split(",") if g.strip() and g.strip().lower() != "none"]
        return ids, f"TRTFLOW_GPUS={forced!r}"
    try:
        env = probe_gpu(Path(workdir), timeout_s=120)
    except Exception as err:  # noqa: BLE001 - any failure means "no GPU worker here", reported to the user
        reason = getattr(err, "message", None) or str(err)
        return [], f"no GPU worker: TensorRT did not load in {trt_python()} ({reason.splitlines()[0]})"
    ids = ["0"]
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30)
            # indices only: each becomes a worker's name and bucket key (an nvidia-smi that prints
            # anything else, e.g. an error or a wrapper's banner, must not name a worker)
            ids = [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()] or ids
        except (OSError, subprocess.SubprocessError):
            pass
    return ids, f"TensorRT {env.tensorrt} on {env.gpu} ({len(ids)} GPU(s))"


# ---- up / down ---------------------------------------------------------------------------------
def _free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the server will: a port left in TIME_WAIT by a stopped server is free, a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _say_nothing(_: str) -> None:
    pass


def _start_server(opts: StackOptions, base_env: Dict[str, str], logs: Path, state: Path, procs: List[Proc],
                  info: StackInfo, progress: Callable[[str], None]) -> str:
    """The API URL: the given server's once it answers, else one started here (its process in ``procs``)."""
    if opts.api_url:
        api_url = opts.api_url.rstrip("/")
        wait_for_api(api_url, opts.timeout_s)
    else:
        if not _free(opts.host, opts.port):
            raise InfraError(f"port {opts.port} on {opts.host} is in use.",
                             fix="Pass --port, or stop what listens there.")
        server_env = {k: v for k, v in base_env.items() if k != "PREFECT_API_URL"}
        # The UI learns the API's address from settings, not from --host/--port.
        browser_host = "127.0.0.1" if opts.host in ("0.0.0.0", "::") else opts.host
        server_env.update(PREFECT_SERVER_API_HOST=opts.host, PREFECT_SERVER_API_PORT=str(opts.port))
        server_env.setdefault("PREFECT_UI_API_URL", f"http://{browser_host}:{opts.port}/api")
        # Concurrency leases (the per-GPU build slots) on disk, not in server memory: a build killed
        # while holding its GPU is freed when its lease expires even across a server restart. With
        # the in-memory default the slot stays taken after a restart and that GPU never builds again.
        server_env.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE",
                              "prefect.server.concurrency.lease_storage.filesystem")
        progress(f"starting the Prefect server on {opts.host}:{opts.port} (log: {logs / 'server.log'})")
        procs.append(spawn("server", prefect_command() + ["server", "start", "--host", opts.host,
                                                             "--port", str(opts.port)],
                            server_env, logs, state))
        info.save()  # from here on, `trtflow down` can clean up even if `up` is interrupted
        api_url = f"http://{opts.host}:{opts.port}/api"
        progress("waiting for the Prefect API to answer")
        wait_for_api(api_url, opts.timeout_s, procs[0])
    return api_url


def up(opts: StackOptions, progress: Callable[[str], None] = _say_nothing) -> StackInfo:
    """Start the stack described by ``opts``; raises InfraError (after stopping what it started) on failure.

    ``progress`` is told each step as it starts (the CLI prints them: start-up takes a while).
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    state = Path(opts.state_dir).resolve()
    previous = running_stack(state)
    if previous:
        raise InfraError(f"trtflow is already running at {previous.ui_url} (state in {state}).",
                         fix="Run `trtflow down` first, or give this one another TRTFLOW_HOME.")
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    prefect_home = state / "prefect"
    prefect_home.mkdir(exist_ok=True)
    bucket = opts.bucket or (state / "bucket").as_uri()
    drop_folder = None
    if bucket.startswith("file://") or "://" not in bucket:
        from tasks.storage import open_storage

        root = Path(open_storage(bucket).root)  # type: ignore[attr-defined]
        (root / "models").mkdir(parents=True, exist_ok=True)
        drop_folder = str(root / "models")

    base_env = dict(os.environ)
    base_env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                    PYTHONPATH=str(opts.code_dir) + (os.pathsep + base_env["PYTHONPATH"] if base_env.get("PYTHONPATH") else ""))
    procs: List[Proc] = []
    info = StackInfo(str(state), "", "", bucket, drop_folder, [], "", procs)
    try:
        api_url = _start_server(opts, base_env, logs, state, procs, info, progress)
        info.api_url, info.ui_url = api_url, api_url[:-len("/api")] if api_url.endswith("/api") else api_url

        with temporary_settings({PREFECT_API_URL: api_url}):
            progress("creating the work pools cpu and gpu")
            ensure_work_pools()
            progress("applying the deployments watch-bucket, convert-model, nightly-rebuild")
            apply_deployments(DeploySettings(bucket, opts.code_dir, opts.watch_interval, opts.settle_seconds,
                                             opts.nightly_cron), api_url, state, base_env)
            progress("looking for GPUs (TensorRT in TRT_PYTHON)" if opts.gpus is None else "GPUs as configured")
            gpus, note = ((opts.gpus, "as configured (--gpus / TRTFLOW_GPUS)") if opts.gpus is not None
                          else detect_gpus(state / "probe"))
            info.gpus, info.gpu_note = list(gpus), note

            host = socket.gethostname()
            worker_env = with_worker_defaults(dict(base_env, PREFECT_API_URL=api_url, TRTFLOW_BUCKET=bucket))
            expected: Dict[str, List[str]] = {"cpu": [f"cpu-{host}"], "gpu": []}
            procs.append(spawn("worker-cpu", prefect_command() + ["worker", "start", "--pool", "cpu", "--type",
                                                                     "process", "--name", f"cpu-{host}"],
                                worker_env, logs, opts.code_dir))
            for gpu in gpus:
                proc = _spawn_gpu_worker(gpu, worker_env, logs, opts.code_dir, procs)
                expected["gpu"].append(proc.role[len("worker-"):])
                procs.append(proc)
            info.save()
            progress(f"waiting for {1 + len(gpus)} worker(s) to come online")
            wait_for_workers(expected, opts.timeout_s, procs)
    except BaseException:
        stop_processes(procs)
        (state / STACK_FILE).unlink(missing_ok=True)
        raise
    info.save()
    log.info("trtflow is up: UI %s, bucket %s", info.ui_url, bucket)
    return info


def with_worker_defaults(env: dict) -> dict:
    """``env`` plus the local stack's worker settings, where the user has not set them."""
    env = dict(env)
    # Prefect's workers ask for new runs every 10 s; a drop passes two of them (convert-model on
    # cpu, build-engine on gpu) plus each watch poll's run, so the local stack asks every 2 s
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")
    # The local server's SQLite answers 503 ("database is locked") while many runs write at once;
    # Prefect's client retries 5 times (2..32 s back-off, ~1 min) and then a worker marks the run
    # Crashed (seen with 6 conversions on 3 GPU workers, 2 cores). 8 retries wait out ~8 minutes of
    # contention: a slow run, not a crashed one. The workers' flow runs inherit it.
    env.setdefault("PREFECT_CLIENT_MAX_RETRIES", "8")
    return env


def _spawn_gpu_worker(gpu: str, worker_env: dict, logs: Path, code_dir: Path, procs: List[Proc]) -> Proc:
    """One GPU worker pinned to GPU ``gpu``; its role (and Prefect worker name) is unique in the stack."""
    host = socket.gethostname()
    taken = {p.role for p in procs}
    name, n = f"gpu{gpu}-{host}", 1
    while f"worker-{name}" in taken:  # a second worker on the same GPU (allowed; gpu_slot serialises them)
        n += 1
        name = f"gpu{gpu}-{host}-{n}"
    # flows.workers records the worker's TensorRT/GPU probe in the bucket, then execs `prefect worker
    # start`. --limit 1: a worker never runs two builds; gpu_slot guards the GPU itself.
    return spawn(f"worker-{name}", [sys.executable, "-m", "flows.workers", "gpu", "--pool", "gpu", "--limit", "1",
                                    "--name", name],
                 dict(worker_env, CUDA_VISIBLE_DEVICES=str(gpu)), logs, code_dir)


def add_gpu_worker(state_dir: Path, gpu: str, timeout_s: float = 120.0) -> Proc:
    """Start one more GPU worker in a running stack (recorded, so ``down`` stops it too)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    state = Path(state_dir).resolve()
    info = StackInfo.load(state)
    if info is None or not any(is_alive(p) for p in info.processes):
        raise InfraError(f"no trtflow stack is running from {state}.", fix="Run `trtflow up` first.")
    env = dict(os.environ, PREFECT_HOME=str(state / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=info.api_url, TRTFLOW_BUCKET=info.bucket)
    env["PYTHONPATH"] = str(PROJECT_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = _spawn_gpu_worker(str(gpu), with_worker_defaults(env), state / "logs", PROJECT_ROOT, info.processes)
    info.processes.append(proc)
    info.save()
    with temporary_settings({PREFECT_API_URL: info.api_url}):
        wait_for_workers({"gpu": [proc.role[len("worker-"):]]}, timeout_s, [proc])
    return proc


def down(state_dir: Path, timeout_s: float = 30.0) -> List[str]:
    """Stop the processes ``up`` recorded in ``state_dir`` (and their children); returns what was stopped."""
    info = StackInfo.load(Path(state_dir))
    if info is None:
        return []
    stopped = stop_processes(info.processes, timeout_s)
    (Path(state_dir) / STACK_FILE).unlink(missing_ok=True)
    return stopped


def status(state_dir: Path) -> Optional[Dict[str, bool]]:
    """{role: running} for the stack recorded in ``state_dir`` (None when there is none)."""
    info = StackInfo.load(Path(state_dir))
    return None if info is None else {p.role: is_alive(p) for p in info.processes}
