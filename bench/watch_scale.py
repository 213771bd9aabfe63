"""Measure 6 (issue 13): one watcher poll over a bucket of 1k, 10k and 100k objects (moto server).

Goal: <= 5 s for one poll at 100k objects, memory flat. Not run by CI. Runs anywhere with the test
extra (moto[server])::

    python bench/watch_scale.py [--sizes 1000 10000 100000]      # one JSON line per size, then a summary

The bucket is served by moto's ThreadedMotoServer and read by trtflow's S3Storage over HTTP (boto3,
the same listing as production); the objects are put straight into moto's in-process backend (a
PUT per object over HTTP would take minutes and measures nothing of the watcher). Each size gets:
the first poll (every package new: listed, fingerprinted, state written) and three steady polls
(nothing changed: the cost of every scheduled poll), timed with ``flows.watch.poll_once`` and a
submitter that only counts. Memory: RSS after each poll and tracemalloc's peak during the last one.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUCKET = "trtflow-watch-scale"
ACCOUNT = "123456789012"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill(count: int, start: int) -> None:
    """Objects models/m<i>.onnx for i in [start, count), put into moto's backend directly."""
    from moto.s3.models import s3_backends

    backend = s3_backends[ACCOUNT]["aws"]
    for i in range(start, count):
        backend.put_object(BUCKET, f"models/m{i:06d}.onnx", b"onnx-bytes-%d" % i)


def serve(port: int) -> int:
    """The moto server in its own process (so its objects never count in the watcher's memory and its
    CPU is not the watcher's): reads ``fill N`` lines on stdin, answers ``filled N``; EOF stops it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket=BUCKET)
    have = 0
    print("ready", flush=True)
    for line in sys.stdin:
        n = int(line.split()[1])
        fill(n, have)
        have = max(have, n)
        print(f"filled {have}", flush=True)
    server.stop()
    return 0


def measure(storage, count: int, steady: int = 3, trace_max: int = 10000) -> dict:
    import psutil

    from flows.watch import poll_once
    from tasks.package import list_packages
    from tasks.watch_state import load_state, observe, pending, save_state

    started = []
    proc = psutil.Process()
    now = time.time()
    t = time.perf_counter()
    first = poll_once(storage, 30.0, lambda d, p: started.append(d.name) or "run", now)
    first_s = time.perf_counter() - t
    rss, times = [proc.memory_info().rss], []
    for i in range(steady):
        t = time.perf_counter()
        poll_once(storage, 30.0, lambda d, p: started.append(d.name) or "run", now + 1 + i)  # not settled yet
        times.append(time.perf_counter() - t)
        rss.append(proc.memory_info().rss)
    t = time.perf_counter()
    packages = list_packages(storage)  # the S3 listing alone: what every poll pays before trtflow's own work
    list_s = time.perf_counter() - t
    t = time.perf_counter()  # trtflow's own work on that listing: load state, fold, clashes, pending, save
    state = load_state(storage)
    observe(state, storage.uri, packages, now + 1 + steady, 30.0)
    pending(state)
    save_state(storage, state)
    own_s = time.perf_counter() - t
    # One page of 1000 keys, raw boto3: real S3 serves a page in about the same time at any bucket
    # size; moto scans the whole bucket for each page, so this grows with the bucket here.
    t = time.perf_counter()
    storage.client.list_objects_v2(Bucket=storage.bucket, Prefix="models/", MaxKeys=1000)
    page_s = time.perf_counter() - t
    peak = None
    if count <= trace_max:
        tracemalloc.start()  # one more poll, untimed: tracing slows Python several times over
        poll_once(storage, 30.0, lambda d, p: started.append(d.name) or "run", now + 1 + steady)
        peak = round(tracemalloc.get_traced_memory()[1] / 2 ** 20, 1)
        tracemalloc.stop()
    return {"measure": "watch_scale", "objects": count, "first_poll_s": round(first_s, 3),
            "steady_poll_s": [round(x, 3) for x in times], "listing_only_s": round(list_s, 3), "packages": len(packages),
            "one_page_s": round(page_s, 4), "pages": -(-count // 1000),
            "trtflow_own_s": round(own_s, 3), "waiting": len(first.waiting), "started": len(started),
            "rss_mib_after_polls": [round(r / 2 ** 20, 1) for r in rss],
            "poll_traced_peak_mib": peak}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "MOTO_ACCOUNT_ID": ACCOUNT})
    if args.serve:
        return serve(args.serve)
    port = _free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    os.environ["TRTFLOW_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    try:
        from tasks.storage import open_storage

        rows = []
        for n in sorted(args.sizes):
            server.stdin.write(f"fill {n}\n")
            server.stdin.flush()
            assert server.stdout.readline().startswith("filled")
            storage = open_storage(f"s3://{BUCKET}")
            storage.delete("_trtflow/watch/state.json")  # each size starts as a fresh watcher
            rows.append(measure(storage, n))
            print(json.dumps(rows[-1]), flush=True)
        big = rows[-1]
        per_k = [round(max(r["steady_poll_s"]) / (r["objects"] / 1000), 4) for r in rows]
        print(json.dumps({"measure": "watch_scale_summary", "objects": [r["objects"] for r in rows],
                          "steady_poll_s": [max(r["steady_poll_s"]) for r in rows], "s_per_1k_objects": per_k,
                          "listing_only_s": [r["listing_only_s"] for r in rows],
                          "trtflow_own_s": [r["trtflow_own_s"] for r in rows],
                          "goal": "<= 5 s at the largest size", "ok": max(big["steady_poll_s"]) <= 5.0,
                          "rss_growth_over_steady_polls_mib": round(big["rss_mib_after_polls"][-1]
                                                                    - big["rss_mib_after_polls"][1], 1)}))
    finally:
        server.stdin.close()
        server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
