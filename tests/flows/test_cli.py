"""The trtflow command line as a user meets it: the README's commands, and every error as problem + fix."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows import cli, stack, supervise
from tasks import publish
from tasks.errors import InfraError
from tasks.storage import LocalStorage
from tests import models

runner = CliRunner()


def _run(*args: str, env=None):
    return runner.invoke(cli.app, list(args), env=env)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """TRTFLOW_HOME in tmp; the current folder somewhere else, to prove it does not matter."""
    home = tmp_path / "home"
    monkeypatch.setenv("TRTFLOW_HOME", str(home))
    monkeypatch.delenv("TRTFLOW_BUCKET", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return home


@pytest.fixture
def bucket(tmp_path):
    root = tmp_path / "bucket"
    models.save(models.small_cnn(), root / "models" / "cnn.onnx")
    return root


def test_validate_a_loose_file_reports_and_exits_0(tmp_path):
    path = models.save(models.small_cnn(), tmp_path / "model.onnx")
    result = _run("validate", str(path))
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


def test_validate_a_package_in_a_bucket_folder(bucket):
    result = _run("validate", str(bucket / "models" / "cnn.onnx"), "--target", "10.0")
    assert result.exit_code == 0, result.output


def test_validate_a_corrupt_model_exits_1_without_traceback(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07this is not a protobuf")
    result = _run("validate", str(path))
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_unknown_spec_key_gets_a_did_you_mean(bucket):
    pkg = bucket / "models" / "typo"
    models.save(models.small_cnn(), pkg / "model.onnx")
    (pkg / "trtflow.yaml").write_text("precision: [fp16]\nbuild:\n  workspace_mbb: 100\n")
    result = _run("validate", str(pkg / "model.onnx"))
    assert result.exit_code == 1
    assert "did you mean 'precisions'?" in result.output, result.output
    assert "Traceback" not in result.output


def test_wrong_precision_lists_the_allowed_values(bucket):
    result = _run("convert", str(bucket / "models" / "cnn.onnx"), "-p", "fp8")
    assert result.exit_code == 2
    assert "fp8" in result.output and "fp32, fp16, int8" in result.output


def test_wrong_strategy_lists_the_allowed_values(bucket):
    result = _run("convert", str(bucket / "models" / "cnn.onnx"), "--strategy", "fastest")
    assert result.exit_code == 2 and "fallback, all" in result.output


def test_a_missing_model_is_reported_quickly_before_any_server_starts(home, bucket):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "convert", str(bucket / "models" / "nope.onnx")],
                          capture_output=True, text=True, timeout=60, cwd=Path(cli.__file__).parent.parent)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1
    assert "nope" in proc.stderr and "fix:" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert "prefect" not in (proc.stdout + proc.stderr).lower()  # no server banner, no telemetry noise
    assert elapsed < 10, f"took {elapsed:.1f}s"  # includes interpreter start on a loaded 2-core CI box
    assert not (home / "prefect").exists()


def test_missing_s3_credentials_name_the_settings(monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "TRTFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    result = _run("convert", "s3://trtflow-no-such-bucket/models/m.onnx")
    assert result.exit_code == 1
    assert "AWS_ACCESS_KEY_ID" in result.output and "~/.aws" in result.output, result.output
    assert "network" not in result.output


def test_rich_markup_in_a_fix_is_printed_as_written(capsys):
    with pytest.raises(Exception):
        cli.fail(InfraError("TensorRT cannot be imported.", fix="pip install 'trtflow[gpu]'"))
    assert "trtflow[gpu]" in capsys.readouterr().err


def _status_bucket(root: Path) -> LocalStorage:
    models.save(models.small_cnn(), root / "models" / "good.onnx")
    (root / "models" / "bad.onnx").write_bytes(b"junk")
    storage = LocalStorage(root)
    publish.write_status(storage, name="good", model_sha="a" * 64, status="waiting", stage="gpu",
                         extra={"reason": "waiting for a GPU worker (pool gpu has none online)"})
    from tasks.errors import ModelError

    publish.write_status(storage, name="bad", model_sha="b" * 64, status="failed", stage="validate",
                         error=ModelError("bad.onnx is not an ONNX model.", fix="Upload the .onnx file [again]."))
    return storage


def test_status_shows_outcomes_and_exits_1_when_a_model_failed(tmp_path):
    _status_bucket(tmp_path / "b")
    result = _run("status", str(tmp_path / "b"))
    assert result.exit_code == 1, result.output
    assert "waiting for a GPU worker" in result.output and "failed" in result.output
    assert "[again]" in result.output  # markup escaped
    as_json = _run("status", str(tmp_path / "b"), "--json")
    rows = {r["model"]: r for r in json.loads(as_json.output)["models"]}
    assert rows["good"]["status"] == "waiting" and rows["bad"]["status"] == "failed"
    assert rows["bad"]["stage"] == "validate" and as_json.exit_code == 1


def test_status_never_creates_folders(home):
    result = _run("status")
    assert result.exit_code == 2 and "trtflow up" in result.output
    assert not home.exists() and not (Path.cwd() / ".trtflow").exists()


def test_watch_without_a_server_says_how_to_get_one(home):
    result = _run("watch")
    assert result.exit_code == 2
    assert "trtflow up" in result.output and "PREFECT_API_URL" in result.output and "None" not in result.output


def _sleeper_stack(home: Path) -> stack.StackInfo:
    home.mkdir(parents=True, exist_ok=True)
    proc = supervise.spawn("server", [sys.executable, "-c", "import time; time.sleep(120)"], {}, home, home)
    info = stack.StackInfo(str(home), "http://127.0.0.1:4999/api", "http://127.0.0.1:4999", str(home / "bucket"),
                           None, [], "", [proc])
    info.save()
    return info


def test_a_second_up_says_where_the_first_runs_and_down_works_from_any_folder(home, tmp_path, monkeypatch):
    _sleeper_stack(home)
    second = _run("up", "--gpus", "none")
    assert second.exit_code == 1 and "Traceback" not in second.output
    assert "already running at http://127.0.0.1:4999" in second.output and "trtflow down" in second.output
    monkeypatch.chdir(tmp_path)  # another folder: the state is found through TRTFLOW_HOME all the same
    down = _run("down")
    assert down.exit_code == 0 and "server (pid" in down.output
    assert stack.running_stack(home) is None


def test_convert_form_schema_has_no_null_toggles():
    from prefect.utilities.callables import parameter_schema

    from flows.convert import convert_model

    schema = parameter_schema(convert_model).model_dump()
    text = json.dumps(schema)
    request = schema["definitions"]["ConvertRequest"]["properties"]
    for name in ("precisions", "strategy", "tolerances", "force"):
        assert "anyOf" not in request[name], (name, request[name])
    assert '"type": "null"' not in text
    from flows.params import SPEC_STRATEGIES

    assert {"fallback", "all"} <= set(SPEC_STRATEGIES)
    assert request["strategy"]["enum"] == ["spec", *SPEC_STRATEGIES] and request["strategy"]["default"] == "spec"
    precision = schema["definitions"]["Precision"]
    assert request["precisions"]["items"] == {"$ref": "#/definitions/Precision"}
    assert precision["enum"] == ["fp32", "fp16", "int8"]


def test_empty_form_fields_keep_the_spec():
    from flows.params import ConvertRequest

    assert ConvertRequest(model_uri="s3://b/models/m.onnx").spec_overrides() == {}
    req = ConvertRequest(model_uri="x", precisions=["fp16"], strategy="all", tolerances={"fp16": {"min_cosine": 0.9}})
    assert req.spec_overrides() == {"precisions": ["fp16"], "strategy": "all",
                                    "tolerances": {"fp16": {"min_cosine": 0.9}}}
    with pytest.raises(ValueError, match="min_cosin"):
        ConvertRequest(model_uri="x", tolerances={"fp16": {"min_cosin": 0.9}})


def test_an_unreachable_prefect_api_is_named_with_its_url_and_the_fix(tmp_path):
    """A real run against a port nothing listens on: the user learns which API and what to check."""
    model = models.save(models.small_cnn(), tmp_path / "bucket" / "models" / "m.onnx")
    env = dict(__import__("os").environ, PREFECT_API_URL="http://127.0.0.1:9/api", PREFECT_CLIENT_MAX_RETRIES="0",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "convert", str(model), "-p", "fp32"],
                          capture_output=True, text=True, env=env, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "lost the Prefect API at http://127.0.0.1:9/api" in out, out[-2000:]
    assert "PREFECT_API_URL" in out and "Run again with -v" not in out


def test_a_quiet_watch_says_what_it_looked_at(prefect_harness, tmp_path, monkeypatch):
    """A poll that starts nothing says so (it printed nothing, which reads as "did it run?")."""
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    empty = tmp_path / "empty"
    (empty / "models").mkdir(parents=True)
    result = _run("watch", "--bucket", str(empty))
    assert result.exit_code == 0, result.output
    assert f"nothing to start: no models under {empty}/models/" in result.output

    bucket = tmp_path / "bucket"
    models.save(models.small_cnn(), bucket / "models" / "cnn.onnx")
    result = _run("watch", "--bucket", str(bucket), "--settle-seconds", "3600")  # seen, not settled
    assert result.exit_code == 0 and "settling: cnn" in result.output and "nothing" not in result.output, result.output
