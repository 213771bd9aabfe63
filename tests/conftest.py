"""Shared fixtures: one Prefect test harness per session, S3 through moto (in-process and over HTTP),
and a local folder bucket."""
from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Iterator

import pytest

# Before anything imports Prefect: no telemetry from test runs.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.hookimpl(optionalhook=True)  # only called where pytest-xdist is installed
def pytest_xdist_make_scheduler(config, log):
    """With ``--dist loadgroup`` (`make test`): tests/e2e runs in one worker, one test at a time.

    Why: on CI's 2 cores two Prefect stacks at once (each a server on SQLite, workers and flow-run
    processes) starved each other: the server answered 503 and test_two_pools missed its 15 s
    feedback bound. Unit tests are spread as with ``--dist load`` and share the other worker.
    Written here rather than with ``xdist_group`` marks: xdist 3.8 groups by rewriting
    ``item._nodeid``, which pytest 9.2's node ids no longer read, so those marks group nothing.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class PrefectStacksOneAtATime(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "tests/e2e" if nodeid.startswith("tests/e2e/") else nodeid

    return PrefectStacksOneAtATime(config, log)


FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
# Settings that would send boto3 somewhere other than moto.
AWS_LEAKS = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "TRTFLOW_S3_ENDPOINT_URL",
             "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect API and database for the whole session (started once: it takes seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials, and nothing pointing boto3 at a real endpoint."""
    for var in AWS_LEAKS:
        monkeypatch.delenv(var, raising=False)
    for key, value in FAKE_AWS.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def moto_s3(aws_env):
    """S3Storage on a fresh bucket, S3 mocked in-process by moto's ``mock_aws``."""
    import boto3
    from moto import mock_aws

    from tasks.storage import S3Storage

    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="trtflow-test")
        yield S3Storage("trtflow-test")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def _moto_server_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def moto_server(_moto_server_endpoint: str, aws_env, monkeypatch: pytest.MonkeyPatch) -> str:
    """A moto S3 server over real HTTP on a free loopback port (one per session; buckets persist
    across tests, so make unique names). Sets ``TRTFLOW_S3_ENDPOINT_URL`` and fake credentials;
    yields the endpoint URL."""
    monkeypatch.setenv("TRTFLOW_S3_ENDPOINT_URL", _moto_server_endpoint)
    return _moto_server_endpoint


@pytest.fixture
def moto_server_s3(moto_server: str):
    """S3Storage on a fresh bucket of the moto HTTP server (a client built from the environment)."""
    import boto3

    from tasks.storage import S3Storage

    bucket = f"trtflow-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return S3Storage(bucket)


@pytest.fixture
def local_bucket(tmp_path: Path):
    """LocalStorage on an empty folder (the file:// default)."""
    from tasks.storage import LocalStorage

    return LocalStorage(tmp_path / "bucket")
