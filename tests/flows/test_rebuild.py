"""nightly-rebuild: one convert-model run per package per day and mode, never doubled."""
from __future__ import annotations

from datetime import date

import boto3
from moto import mock_aws

from flows import rebuild
from flows.rebuild import rebuild_key, start_rebuilds
from tasks.storage import LocalStorage, S3Storage

DAY = date(2026, 1, 2)


class Recorder:
    def __init__(self, fail=()):
        self.calls = []
        self.fail = set(fail)

    def __call__(self, name, params, key):
        if name in self.fail:
            raise RuntimeError("API unreachable")
        self.calls.append((name, params, key))
        return f"run-{len(self.calls)}"


def test_every_package_once_on_s3_with_force_in_request_and_key(aws_env):
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="nightly-bucket")
        for key in ("models/a.onnx", "models/b/model.onnx", "models/b/trtflow.yaml", "models/notes.txt",
                    "engines/a/latest.json"):
            s3.put_object(Bucket="nightly-bucket", Key=f"team/{key}", Body=b"x")
        storage = S3Storage("nightly-bucket", "team", client=s3)
        rec = Recorder()
        result = start_rebuilds(storage, DAY, force=True, submit=rec)
    assert [c[0] for c in rec.calls] == ["a", "b"]
    assert rec.calls[0][1] == {"request": {"model_uri": "s3://nightly-bucket/team/models/a.onnx", "force": True}}
    assert rec.calls[1][1]["request"]["model_uri"] == "s3://nightly-bucket/team/models/b/model.onnx"
    assert all(k.startswith("nightly-2026-01-02-") and k.endswith("-force") for _, _, k in rec.calls)
    assert [s["flow_run_id"] for s in result.started] == ["run-1", "run-2"] and result.errors == []


def test_keys_differ_by_day_mode_bucket_and_name():
    k = rebuild_key("s3://x", "a", DAY, False)
    assert k == rebuild_key("s3://x/", "a", DAY, False)
    others = {rebuild_key("s3://x", "a", date(2026, 1, 3), False), rebuild_key("s3://x", "a", DAY, True),
              rebuild_key("s3://y", "a", DAY, False), rebuild_key("s3://x", "b", DAY, False)}
    assert k not in others and len(others) == 4


def test_one_failure_does_not_stop_the_rest(tmp_path):
    storage = LocalStorage(tmp_path)
    for n in ("a", "b", "c"):
        (tmp_path / "models").mkdir(exist_ok=True)
        (tmp_path / "models" / f"{n}.onnx").write_bytes(b"m")
    rec = Recorder(fail={"b"})
    result = start_rebuilds(storage, DAY, force=False, submit=rec)
    assert [c[0] for c in rec.calls] == ["a", "c"] and result.errors == ["b: API unreachable"]


def test_nightly_flow_twice_a_day_starts_each_model_once(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        dep_id = str(client.create_deployment(flow_id=client.create_flow_from_name("convert-model"),
                                              name="nightly-test"))
    (tmp_path / "models").mkdir()
    for n in ("a", "b"):
        (tmp_path / "models" / f"{n}.onnx").write_bytes(b"m")
    kw = dict(bucket_uri=str(tmp_path), deployment="convert-model/nightly-test", day=DAY)
    first = rebuild.nightly_rebuild(**kw)
    again = rebuild.nightly_rebuild(**kw)          # a retry, or a second trigger the same night
    forced = rebuild.nightly_rebuild(force=True, **kw)
    assert [s["flow_run_id"] for s in again["started"]] == [s["flow_run_id"] for s in first["started"]]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep_id])))
    assert len(runs) == 4  # a, b stale-check + a, b forced
    assert sorted(r.parameters["request"]["force"] for r in runs) == [False, False, True, True]
    assert {s["flow_run_id"] for s in forced["started"]}.isdisjoint({s["flow_run_id"] for s in first["started"]})
