"""Measure 5 (issue 13): what trtflow adds on top of its GPU work.

- drop -> published minus GPU-subprocess time, on the local stack (`trtflow up`), for a local-folder
  bucket and for S3 (a moto server) — goal <= 10 s;
- `trtflow convert` wall time minus its GPU-subprocess time — goal <= 5 s (against the running
  stack's server, and cold, when it starts a temporary one).

Not run by CI. On a CPU machine the GPU stage is the GPU test double (tests/doubles; its "GPU" time is
onnxruntime's few milliseconds, so overhead ~ wall time); on a GPU machine pass ``--real`` and set
TRT_PYTHON (e.g. /opt/trt/bin/trt-python) and PYTHONPATH=/opt/py312:. for Prefect::

    python bench/pipeline_overhead.py [--real] [--model m.onnx] [--only local|s3|convert]

One JSON line per measure. GPU time is the conversion record's ``gpu_seconds`` (the subprocess as
build-engine timed it). Waiting for a file or an S3 key polls every 0.1 s: a poll, not a timing sleep.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(args, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _until(probe, limit: float, what: str):
    deadline = time.time() + limit
    while time.time() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.1)  # polling for a result; the figures come from timestamps, not from this
    raise TimeoutError(f"{what} did not happen within {limit} s")


def _gpu_seconds(storage, latest: dict) -> float:
    conversion = storage.read_json(latest["conversion"]) or {}
    return round(sum(p.get("gpu_seconds") or 0.0 for p in conversion.get("precisions", {}).values()), 3)


def _env(args, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "TRTFLOW_BUCKET", "TRTFLOW_GPUS")}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1", TRTFLOW_HOME=str(home),
               PYTHONPATH=os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p))
    if not args.real:
        from tests.doubles import make_trt_python_double

        env["TRT_PYTHON"] = str(make_trt_python_double(home / "double"))
    return env


def _phases(api_url: str, flow_run_id: str, dropped: float) -> dict:
    """Where the time went, from the convert-model run's timestamps in the Prefect API."""
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api_url) as client:
        run = client.read_flow_run(flow_run_id)
    created, start, end = (t.timestamp() if t else None for t in (run.created, run.start_time, run.end_time))
    return {"drop_to_run_created_s": round(created - dropped, 2),  # settle + the watcher's poll + its process
            "created_to_started_s": round(start - created, 2) if start else None,  # CPU worker pickup + process start
            "run_s": round(end - start, 2) if start and end else None}  # convert-model itself, GPU work included


def drop_and_wait(storage, drop, name: str, model: Path, limit: float, api_url: str) -> dict:
    """Put the model into models/, wait for latest.json; the time and the GPU time inside it."""
    dropped = time.time()
    drop(model, f"models/{name}.onnx")
    latest = _until(lambda: storage.read_json(f"engines/{name}/latest.json"), limit, f"{name}'s latest.json")
    published_s = time.time() - dropped
    gpu_s = _gpu_seconds(storage, latest)
    out = {"drop_to_published_s": round(published_s, 2), "gpu_s": gpu_s, "overhead_s": round(published_s - gpu_s, 2),
           "precision": latest["precision"]}
    try:
        out["phases"] = _phases(api_url, latest["flow_run_id"], dropped)
    except Exception as err:  # noqa: BLE001 - the breakdown is extra; the figures above stand without it
        out["phases"] = f"unavailable: {err}"
    return out


def stack_measure(args, kind: str, model: Path, watch_interval: float, settle: float) -> dict:
    """`trtflow up` on a local folder or a moto S3 bucket, one drop, then `trtflow convert --force` twice."""
    from tasks.storage import open_storage

    home = Path(tempfile.mkdtemp(prefix=f"trtflow-overhead-{kind}-"))
    env = _env(args, home)
    server = None
    if kind == "s3":
        from moto.server import ThreadedMotoServer

        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "TRTFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        env.update(creds)
        os.environ.update(creds)
        import boto3

        boto3.client("s3", endpoint_url=creds["TRTFLOW_S3_ENDPOINT_URL"]).create_bucket(Bucket="overhead")
        bucket = "s3://overhead"
    else:
        bucket = str(home / "bucket")
    storage = open_storage(bucket)
    try:
        t = time.time()
        up = _cli(["up", "--port", str(_free_port()), "--bucket", bucket, "--watch-interval", str(watch_interval),
                   "--settle-seconds", str(settle)], env)
        if up.returncode != 0:
            return {"measure": f"overhead_{kind}", "error": (up.stdout + up.stderr)[-1500:]}
        up_s = round(time.time() - t, 1)
        if kind == "s3":
            drop = lambda src, key: storage.upload(src, key)  # noqa: E731
        else:
            def drop(src, key):  # copy beside, then rename: the watcher never sees half a file
                dest = home / "bucket" / key
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dest.with_name("." + dest.name + ".tmp"))
                os.replace(dest.with_name("." + dest.name + ".tmp"), dest)
        api = re.search(r"Prefect UI:\s+(\S+)", up.stdout).group(1).rstrip("/") + "/api"
        out = {"measure": f"overhead_{kind}", "up_s": up_s, "watch_interval_s": watch_interval, "settle_s": settle,
               **drop_and_wait(storage, drop, "dropped", model, args.limit, api), "goal_s": 10,
               "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
        out["ok"] = out["overhead_s"] <= 10
        out["convert_with_stack"] = [convert_measure(env, storage.url("models/dropped.onnx"), storage, "dropped")
                                     for _ in range(2)]
        return out
    finally:
        _cli(["down"], env, timeout=120)
        if server is not None:
            server.stop()
        shutil.rmtree(home, ignore_errors=True)


def convert_measure(env: dict, uri: str, storage, name: str) -> dict:
    t = time.time()
    proc = _cli(["convert", uri, "-p", "fp32", "--force", "--json"], env)
    wall = time.time() - t
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr)[-800:]}
    gpu_s = _gpu_seconds(storage, storage.read_json(f"engines/{name}/latest.json"))
    return {"wall_s": round(wall, 2), "gpu_s": gpu_s, "overhead_s": round(wall - gpu_s, 2), "goal_s": 5,
            "ok": wall - gpu_s <= 5, "load_avg_1m": round(os.getloadavg()[0], 2)}


def cold_convert(args, model: Path) -> dict:
    """`trtflow convert` with no stack running: it starts a temporary Prefect server first."""
    from tasks.storage import open_storage

    home = Path(tempfile.mkdtemp(prefix="trtflow-overhead-cold-"))
    env = _env(args, home)
    try:
        dest = home / "bucket" / "models" / "cold.onnx"
        dest.parent.mkdir(parents=True)
        shutil.copy(model, dest)
        return dict(convert_measure(env, str(dest), open_storage(str(home / "bucket")), "cold"),
                    measure="overhead_convert_cold")
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", action="store_true", help="use TRT_PYTHON as it is (a GPU machine)")
    ap.add_argument("--model", type=Path, help="the ONNX to drop (default: tests/models.py small_cnn)")
    ap.add_argument("--only", choices=["local", "s3", "convert"])
    ap.add_argument("--watch-interval", type=float, default=2.0)
    ap.add_argument("--settle-seconds", type=float, default=1.0)
    ap.add_argument("--limit", type=float, default=300.0)
    args = ap.parse_args()
    model = args.model
    if model is None:
        from tests import models

        model = models.save(models.small_cnn(), Path(tempfile.mkdtemp()) / "cnn.onnx")
    for kind in ("local", "s3", "convert"):
        if args.only not in (None, kind):
            continue
        try:
            row = cold_convert(args, model) if kind == "convert" else \
                stack_measure(args, kind, model, args.watch_interval, args.settle_seconds)
        except Exception as err:  # noqa: BLE001 - one measure failing must not stop the others
            row = {"measure": f"overhead_{kind}", "error": f"{type(err).__name__}: {err}"}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
