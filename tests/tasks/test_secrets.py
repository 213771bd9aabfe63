"""tasks/secrets.py and where it is used: the GPU child's environment is an allow-list without
credentials, and secrets are scrubbed from log tails, errors, build.log and status records (issue 11
item 8). The GPU child here is the test double (tests/doubles), started by the real gpu_client."""
from __future__ import annotations

import json

import pytest

from tasks.errors import InfraError
from tasks.gpu_client import run_gpu
from tasks.publish import list_statuses, write_status
from tasks.secrets import REDACTED, gpu_child_env, scrub
from tests.doubles import make_trt_python_double

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"


def test_child_env_keeps_what_the_gpu_needs_and_drops_credentials():
    env = gpu_child_env({
        "PATH": "/usr/bin", "HOME": "/home/w", "LD_LIBRARY_PATH": "/opt/trt/lib", "CUDA_VISIBLE_DEVICES": "0",
        "LC_ALL": "C.UTF-8", "PYTHONPATH": "/x", "TRT_EXTRA_PYTHONPATH": "/y", "TRTFLOW_CUDA": "pycuda",
        "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": "t" * 20,
        "AWS_PROFILE": "prod", "PREFECT_API_KEY": "pnu_x", "GITHUB_TOKEN": "ghp_x", "TRTFLOW_API_TOKEN": "x",
        "DATABASE_URL": "postgresql://u:p@db/prefect", "SSH_AUTH_SOCK": "/tmp/agent"})
    assert sorted(env) == ["CUDA_VISIBLE_DEVICES", "HOME", "LC_ALL", "LD_LIBRARY_PATH", "PATH", "PYTHONPATH",
                           "TRTFLOW_CUDA", "TRT_EXTRA_PYTHONPATH"]


@pytest.mark.parametrize("text, kept", [
    (f"aws_secret_access_key = {SECRET}", "aws_secret_access_key = "),
    (f"using key {KEY_ID} for s3", "using key "),
    ("endpoint https://minio:s3cr3tpass@minio.local:9000/bucket", "https://minio:"),
    ("GET /m.onnx?X-Amz-Credential=AKIAX%2F20261202&X-Amz-Signature=9f8e7d6c5b4a", "X-Amz-Signature="),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig", "Bearer "),
])
def test_scrub_redacts_credentials_and_keeps_the_rest(text, kept):
    out = scrub(text, environ={})
    assert REDACTED in out and out.startswith(text.split()[0]) and kept in out
    for secret in (SECRET, KEY_ID, "s3cr3tpass", "9f8e7d6c5b4a", "eyJhbGciOiJIUzI1NiJ9"):
        assert secret not in out


def test_scrub_redacts_this_processes_credential_values_anywhere():
    env = {"AWS_SECRET_ACCESS_KEY": SECRET, "HOME": "/home/worker"}
    out = scrub({"message": f"failed: {SECRET}", "details": [f"x{SECRET}y"], "n": 3}, environ=env)
    assert out == {"message": f"failed: {REDACTED}", "details": [f"x{REDACTED}y"], "n": 3}
    assert scrub("/home/worker/model.onnx", environ=env) == "/home/worker/model.onnx"


def test_gpu_child_errors_tail_and_build_log_are_scrubbed(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("TRT_PYTHON", str(make_trt_python_double(tmp_path / "double")))
    leak = f"s3://b/m.onnx key={KEY_ID} https://u:hunter2pw@minio:9000 {SECRET}"
    monkeypatch.setenv("TRTFLOW_DOUBLE_LEAK", leak)
    monkeypatch.setenv("TRTFLOW_DOUBLE_ENV_DUMP", str(tmp_path / "env.json"))
    with pytest.raises(InfraError) as err:
        run_gpu("engine", {"precision": "fp32"}, tmp_path / "work", timeout_s=60)
    text = json.dumps(err.value.to_dict()) + (tmp_path / "work" / "build.log").read_text()
    assert "double: failed near" in text and "double: building with" in text
    for secret in (SECRET, KEY_ID, "hunter2pw"):
        assert secret not in text
    child_env = json.loads((tmp_path / "env.json").read_text())
    assert not [k for k in child_env if k.startswith("AWS_")]  # (the leak text itself came in TRTFLOW_DOUBLE_LEAK)


def test_status_records_are_scrubbed(local_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    write_status(local_bucket, name="m", model_sha="a" * 64, status="failed", stage="fetch",
                 error=InfraError(f"S3 said no to https://u:pw12345678@s3.local with {SECRET}"),
                 extra={"message": f"key {KEY_ID}"})
    [record] = list_statuses(local_bucket, "m")
    text = json.dumps(record)
    assert SECRET not in text and KEY_ID not in text and "pw12345678" not in text
    assert "S3 said no to https://u:" in record["error"]["message"]
