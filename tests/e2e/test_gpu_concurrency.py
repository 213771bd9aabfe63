"""Two flow runs that build on the same GPU never hold it at once; runs on different GPUs do overlap.

Real Prefect server (``prefect_test_harness`` starts one over HTTP), real global concurrency limits,
two flow runs in two separate processes (as two workers would run them). Runs anywhere on CPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from flows.gpu_slot import gpu_limit_name

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def api_url(prefect_harness) -> str:
    """The session's test server, reachable over HTTP by other processes."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _run_pair(api_url: str, tmp_path: Path, gpu_a: str, gpu_b: str) -> tuple[dict, dict]:
    env = dict(os.environ, PREFECT_API_URL=api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.e2e.slot_flow", gpu, me, other, str(tmp_path)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for gpu, me, other in ((gpu_a, "a", "b"), (gpu_b, "b", "a"))]
    for p in procs:
        out, _ = p.communicate(timeout=200)
        assert p.returncode == 0, out[-4000:]
    return (json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text()))


def _overlap(x: dict, y: dict) -> bool:
    return x["start"] < y["end"] and y["start"] < x["end"]


def test_same_gpu_never_overlaps(api_url, tmp_path):
    gpu = f"GPU-{uuid.uuid4()}"
    a, b = _run_pair(api_url, tmp_path, gpu, gpu)
    assert not _overlap(a, b), (a, b)
    # Both really competed: the second one was waiting while the first held the slot.
    first, second = sorted((a, b), key=lambda r: r["start"])
    assert second["start"] >= first["end"]

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(gpu_limit_name(gpu))
    assert limit.limit == 1 and limit.active_slots == 0  # created on first use, released after


def test_different_gpus_overlap(api_url, tmp_path):
    a, b = _run_pair(api_url, tmp_path, f"GPU-{uuid.uuid4()}", f"GPU-{uuid.uuid4()}")
    assert _overlap(a, b), (a, b)


def test_limit_name_is_a_valid_prefect_name():
    assert gpu_limit_name("GPU-1a2b") == "gpu-1a2b"  # NVIDIA UUIDs start with GPU-
    assert gpu_limit_name("host/x-cuda0") == "gpu-host_x-cuda0"
    with pytest.raises(ValueError):
        gpu_limit_name("")
