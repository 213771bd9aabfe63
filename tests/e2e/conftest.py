"""The e2e stack: `trtflow up` against moto's S3 server over HTTP, with the GPU stage as the test double.

Started once per session (the server, deployments and workers take ~20 s on 2 cores) and shared
by test_stack.py and test_browser.py; stopped with `trtflow down` at the end.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import pytest

from flows import stack
from tests.doubles import make_trt_python_double

E2E_ENV = {
    # Workers ask for work every second instead of every 10 s: the test waits on conversions.
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "PREFECT_API_LOG_RETRYABLE_ERRORS": "true",  # the server logs what it answers 503 for
    "PREFECT_WORKER_PREFETCH_SECONDS": "5",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
# TRTFLOW_E2E_REAL_GPU=1 (on a GPU machine, with TRT_PYTHON set): real TensorRT instead of the double,
# and `trtflow up`'s own GPU detection (one worker per GPU that nvidia-smi lists).
REAL_GPU = os.environ.get("TRTFLOW_E2E_REAL_GPU") == "1"
WATCH_INTERVAL = 4.0
SETTLE_SECONDS = 3.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Optional[object]], timeout_s: float, what: str, every_s: float = 0.5):
    """Poll ``condition`` until it returns something truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)  # waiting for a condition, not timing anything


@contextmanager
def running_stack(moto_endpoint: str, state: Path, gpus: Optional[List[str]] = None) -> Iterator[stack.StackInfo]:
    """`trtflow up` on a fresh moto bucket (GPU stage: the test double unless REAL_GPU); `down` after.

    ``gpus=[]`` starts no GPU worker (``stack.add_gpu_worker`` adds one later); None detects them.
    """
    import boto3

    bucket = f"e2e-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    mp = pytest.MonkeyPatch()
    for key, value in E2E_ENV.items():
        mp.setenv(key, value)
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "PREFECT_API_URL", "TRTFLOW_GPUS",
                "TRTFLOW_BUCKET", "PREFECT_API_DATABASE_CONNECTION_URL", "TRTFLOW_GPU_DEPLOYMENT",
                "TRTFLOW_TARGET_TRT"):
        mp.delenv(var, raising=False)
    mp.setenv("TRTFLOW_S3_ENDPOINT_URL", moto_endpoint)
    if not REAL_GPU:
        mp.setenv("TRT_PYTHON", str(make_trt_python_double(state / "double")))
    started = time.monotonic()
    info = stack.up(stack.StackOptions(state_dir=state, port=free_port(), bucket=f"s3://{bucket}", gpus=gpus,
                                       watch_interval=WATCH_INTERVAL, settle_seconds=SETTLE_SECONDS))
    info.__dict__["startup_s"] = time.monotonic() - started
    try:
        yield info
    finally:
        stopped = stack.down(state)
        mp.undo()
        assert any(s.startswith("server") for s in stopped), stopped
        assert stack.status(state) is None


def pytest_collection_modifyitems(config, items):
    """The tests that share ``e2e_stack`` run last, side by side.

    Why: the shared stack lives until the session ends, and an idle stack is not idle: its watcher
    starts a flow-run process every WATCH_INTERVAL seconds and its workers poll every second, which
    on CI's 2 cores slowed every e2e test that ran after the first user of the stack.
    """
    items.sort(key=lambda item: "e2e_stack" in getattr(item, "fixturenames", ()))  # stable: else in order


@pytest.fixture(scope="session")
def e2e_stack(_moto_server_endpoint: str, tmp_path_factory) -> Iterator[stack.StackInfo]:
    with running_stack(_moto_server_endpoint, tmp_path_factory.mktemp("trtflow-stack")) as info:
        yield info


@pytest.fixture(scope="session")
def e2e_client(e2e_stack):
    """A sync Prefect client on the stack's server."""
    from prefect.client.orchestration import SyncPrefectClient

    client = SyncPrefectClient(e2e_stack.api_url)
    with client:
        yield client
