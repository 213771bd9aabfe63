"""The published benchmark record (issue 13): manifest summary, sweep table and plot beside the
manifest and in the run's artifacts. convert-model under prefect_test_harness with the GPU test
double, whose benchmark is assembled by tasks/gpu/bench.py's own record functions."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml

from flows.convert import convert_model
from flows.params import ConvertRequest
from tasks.package import latest_key
from tasks.storage import LocalStorage
from tests import models
from tests.doubles import make_trt_python_double

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def package(tmp_path, tmp_path_factory, monkeypatch):
    """A folder package with a sweep and a p99 target in its spec; the double recorded as the GPU worker."""
    monkeypatch.setenv("TRTFLOW_DOUBLE_TRT_VERSION", "8.6.0")
    monkeypatch.setenv("TRT_PYTHON", str(make_trt_python_double(tmp_path_factory.mktemp("double"))))
    for var in ("TRTFLOW_DOUBLE_FAIL", "TRTFLOW_DOUBLE_NOISE_FP32"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "bucket"
    pkg = root / "models" / "cnn"
    models.save(models.small_cnn(), pkg / "model.onnx")
    spec = {"precisions": ["fp32"], "profiles": [{"images": {"min": [1, 3, 32, 32], "opt": [4, 3, 32, 32],
                                                              "max": [16, 3, 32, 32]}}],
            "bench": {"sweep": True, "p99_target_ms": 10000.0, "window_ms": 20, "iterations": 5,
                      "layer_times": True}}
    (pkg / "trtflow.yaml").write_text(yaml.safe_dump(spec))
    from flows.workers import record_worker_probe
    from tasks.gpu_client import probe_gpu

    record_worker_probe(LocalStorage(root), "gpu0-test", probe_gpu(Path(tempfile.mkdtemp(dir=tmp_path))))
    return root, pkg


def _artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return sorted(found, key=lambda a: a.created)[-1]


def test_manifest_carries_the_benchmark_record_and_the_sweep(prefect_harness, package):
    root, pkg = package
    summary = convert_model(ConvertRequest(model_uri=str(pkg) + "/"))
    assert summary["status"] == "published", summary
    store = LocalStorage(root)
    manifest = store.read_json(store.read_json(latest_key("cnn"))["manifest"])
    rec = manifest["benchmark"]["summary"]
    # graph / no graph, with the reason recorded when not
    assert rec["cuda_graph"] is False and rec["cuda_graph_fallback"] == "test double: no CUDA"
    # enqueue-ahead throughput at the opt shape and its stability figure
    assert rec["batch"] == 4 and rec["shape"] == {"images": [4, 3, 32, 32]}
    assert rec["throughput_per_s"] > 0 and 0 <= rec["throughput_cov"] and isinstance(rec["stable"], bool)
    # GPU and host latency, the copies apart
    assert set(rec["gpu_latency_ms"]) == {"p50", "p90", "p99"} and rec["gpu_latency_ms"]["p99"] > 0
    assert set(rec["host_latency_ms"]) == {"p50", "p90", "p99"} and set(rec["h2d_ms"]) == set(rec["d2h_ms"])
    # the sweep: min, powers of two, opt, max; the largest batch under the (generous) p99 target
    assert rec["sweep"]["batches"] == [1, 2, 4, 8, 16]
    assert rec["sweep"]["largest_batch_under_target"] == 16 and rec["sweep"]["p99_target_ms"] == 10000.0
    full = manifest["benchmark"]["tensorrt"]["sweep"]["points"]
    assert [p["device_memory_bytes"] for p in full] == [1024 * b for b in (1, 2, 4, 8, 16)]
    assert all(p["throughput_per_s"] > 0 and p["latency_ms"]["p99"] >= p["latency_ms"]["p50"] for p in full)
    # table and plot beside the manifest
    files = manifest["files"]
    prefix = manifest["files"]["model.plan"].rsplit("/", 1)[0]
    assert files["sweep.png"] == f"{prefix}/sweep.png" and files["sweep.md"] == f"{prefix}/sweep.md"
    assert store.read_bytes(files["sweep.png"]).startswith(PNG_MAGIC)
    assert files["layer_times.json"] == f"{prefix}/layer_times.json"  # bench.layer_times: true, published too
    table = store.read_bytes(files["sweep.md"]).decode()
    assert [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ")][1:] == \
        ["| 1", "| 2", "| 4", "| 8", "| 16"]  # header, then one row per batch
    assert "| 16 |" in table and "Largest batch with GPU p99 ≤ 10000.0 ms: **16**" in table
    # and in the run's artifacts: the markdown summary and a table artifact
    md = _artifact("trtflow-cnn").data
    assert "## Batch sweep (fp32)" in md and "sweep.png" in md and "| 16 |" in md
    rows = _artifact("trtflow-cnn-sweep").data
    assert "throughput/s" in str(rows) and "16" in str(rows)


def test_no_sweep_no_sweep_files(prefect_harness, package):
    root, pkg = package
    spec = yaml.safe_load((pkg / "trtflow.yaml").read_text())
    spec["bench"]["sweep"] = False
    (pkg / "trtflow.yaml").write_text(yaml.safe_dump(spec))
    assert convert_model(ConvertRequest(model_uri=str(pkg) + "/", force=True))["status"] == "published"
    store = LocalStorage(root)
    manifest = store.read_json(store.read_json(latest_key("cnn"))["manifest"])
    assert manifest["benchmark"]["summary"]["sweep"] is None and manifest["benchmark"]["summary"]["throughput_per_s"] > 0
    assert "sweep.png" not in manifest["files"] and "sweep.md" not in manifest["files"]
