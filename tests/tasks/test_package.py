"""tasks/package.py: the bucket convention, listing and fetching packages, model URIs and names."""
from __future__ import annotations

import numpy as np
import pytest

from tasks.errors import ModelError
from tasks.package import (ModelRef, calib_cache_key, check_name, conversion_key, engine_prefix, fetch_package,
                           find_package, latest_key, list_packages, open_model, parse_model_uri, qdq_key,
                           status_key, timing_cache_key)
from tasks.storage import sha256_file
from tasks.validate import validate_model
from tests import models


@pytest.fixture(params=["local", "moto"])
def storage(request):
    return request.getfixturevalue({"local": "local_bucket", "moto": "moto_s3"}[request.param])


def _fill(storage, tmp_path):
    """A bucket with a single-file package with external data, a folder package, and noise."""
    src = tmp_path / "src"
    models.save(models.small_cnn(), src / "single" / "cnn.onnx", external_data="cnn.onnx.data")
    storage.upload(src / "single" / "cnn.onnx", "models/cnn.onnx")
    storage.upload(src / "single" / "cnn.onnx.data", "models/cnn.onnx.data")
    models.save(models.two_input_model(), src / "folder" / "model.onnx")
    storage.upload(src / "folder" / "model.onnx", "models/two/model.onnx")
    storage.write_bytes("models/two/trtflow.yaml", b"precisions: [fp16]\n")
    buf = src / "images.npy"
    np.save(buf, np.zeros((2, 16), np.float32))
    storage.upload(buf, "models/two/eval/features.npy")
    storage.write_bytes("models/plain.onnx", models.relu_model().SerializeToString())
    # noise: not packages
    storage.write_bytes("models/README.txt", b"hi")
    storage.write_bytes("models/empty/notes.txt", b"no model.onnx here")
    storage.write_bytes("models/-bad.onnx", b"x")
    storage.write_bytes("engines/cnn/latest.json", b"{}")


def test_list_packages_single_file_folder_and_external_data(storage, tmp_path):
    _fill(storage, tmp_path)
    pkgs = {p.name: p for p in list_packages(storage)}
    assert sorted(pkgs) == ["cnn", "plain", "two"]
    cnn = pkgs["cnn"]
    assert cnn.model_key == "models/cnn.onnx" and cnn.folder is None
    assert sorted(f.key for f in cnn.files) == ["models/cnn.onnx", "models/cnn.onnx.data"]
    two = pkgs["two"]
    assert two.model_key == "models/two/model.onnx" and two.folder == "models/two/"
    assert sorted(two.relative(f.key) for f in two.files) == ["eval/features.npy", "model.onnx", "trtflow.yaml"]
    assert [f.key for f in pkgs["plain"].files] == ["models/plain.onnx"]


def test_fingerprint_changes_with_any_file(storage, tmp_path):
    _fill(storage, tmp_path)
    before = find_package(storage, "two").fingerprint
    assert find_package(storage, "two").fingerprint == before
    storage.write_bytes("models/two/trtflow.yaml", b"precisions: [fp32]\n")
    assert find_package(storage, "two").fingerprint != before


def test_fetch_single_file_package_with_external_data_validates(storage, tmp_path):
    _fill(storage, tmp_path)
    local = fetch_package(storage, find_package(storage, "cnn"), tmp_path / "work")
    assert local.root == tmp_path / "work" / "cnn"
    assert local.model_path == local.root / "cnn.onnx"
    assert (local.root / "cnn.onnx.data").is_file()
    assert local.model_sha256 == sha256_file(tmp_path / "src" / "single" / "cnn.onnx")
    assert local.model_size == local.model_path.stat().st_size
    assert local.source_uri == storage.url("models/cnn.onnx")
    assert local.spec_path is None
    report = validate_model(local.model_path, package_root=local.root)
    assert report.ok and report.external_files == ["cnn.onnx.data"]


def test_fetch_folder_package(storage, tmp_path):
    _fill(storage, tmp_path)
    local = fetch_package(storage, find_package(storage, "two"), tmp_path / "work")
    assert local.model_path == local.root / "model.onnx"
    assert local.spec_path == local.root / "trtflow.yaml"
    assert local.data_dir("eval") == (local.root / "eval").resolve()
    assert local.data_dir("calibration") is None
    with pytest.raises(ModelError, match="outside the model package"):
        local.data_dir("../cnn")


def test_find_package_names_what_is_missing(storage):
    with pytest.raises(ModelError, match="no model package named 'ghost'") as info:
        find_package(storage, "ghost")
    assert "models/ghost.onnx" in info.value.fix


@pytest.mark.parametrize("uri,expected", [
    ("s3://bucket/models/resnet.onnx", ModelRef("s3://bucket", "resnet")),
    ("s3://bucket/team/a/models/resnet.onnx", ModelRef("s3://bucket/team/a", "resnet")),
    ("s3://bucket/models/resnet/", ModelRef("s3://bucket", "resnet")),
    ("s3://bucket/models/resnet/model.onnx", ModelRef("s3://bucket", "resnet")),
    ("s3://bucket/models/bert%2Dbase.onnx", ModelRef("s3://bucket", "bert-base")),
    ("/srv/trtflow/models/resnet.onnx", ModelRef("/srv/trtflow", "resnet")),
    ("file:///srv/trtflow/models/resnet/", ModelRef("/srv/trtflow", "resnet")),
])
def test_parse_model_uri(uri, expected):
    assert parse_model_uri(uri) == expected


def test_parse_relative_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_model_uri("bucket/models/x.onnx") == ModelRef(str(tmp_path / "bucket"), "x")


@pytest.mark.parametrize("uri,match", [
    ("/tmp/loose/model.onnx", "not inside a bucket's models/ folder"),
    ("s3://bucket/elsewhere/x.onnx", "cannot tell the model"),
    ("s3://bucket/models/a/b/model.onnx", "cannot tell the model"),
    ("s3://bucket/models/..onnx", "not allowed"),
    ("s3://bucket/models/has%20space.onnx", "not allowed"),
])
def test_parse_model_uri_rejects(uri, match):
    with pytest.raises(ModelError, match=match) as info:
        parse_model_uri(uri)
    assert info.value.fix


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "-dash", "a..b", "", "x" * 129, "a b", "naïve"])
def test_hostile_names_are_rejected_everywhere(name):
    for fn in (check_name, latest_key, lambda n: engine_prefix(n, "0" * 64, "sm_90-trt8.6.0", "abc123", "fp16", "f" * 64),
               lambda n: status_key(n, "abc"), lambda n: qdq_key(n, "a", "b", "minmax")):
        with pytest.raises(ModelError, match="not allowed"):
            fn(name)


def test_bucket_convention_keys():
    sha = "0123456789abcdef" * 4
    assert (engine_prefix("resnet", sha, "sm_90-trt8.6.0", "5pec5pec5pec", "int8", "fedcba9876543210" * 4)
            == "engines/resnet/0123456789ab/sm_90-trt8.6.0/5pec5pec5pec/int8/fedcba9876543210/")
    with pytest.raises(ValueError, match="not a hex digest"):  # an engine folder is always named by its bytes
        engine_prefix("resnet", sha, "sm_90-trt8.6.0", "5pec5pec5pec", "int8", "")
    assert (conversion_key("resnet", sha, "sm_90-trt8.6.0", "5pec5pec5pec")
            == "engines/resnet/0123456789ab/sm_90-trt8.6.0/5pec5pec5pec/conversion.json")
    assert latest_key("resnet") == "engines/resnet/latest.json"
    assert status_key("resnet", sha) == "_trtflow/status/resnet/0123456789ab.json"
    assert status_key("resnet", "") == "_trtflow/status/resnet/unknown.json"
    assert timing_cache_key("sm_90-trt8.6.0") == "_trtflow/timing-cache/sm_90-trt8.6.0.cache"
    assert qdq_key("r", sha, "f" * 64, "entropy") == "_trtflow/qdq/r/0123456789ab-ffffffffffff-entropy.onnx"
    assert calib_cache_key("r", sha, "f" * 64, "sm_90-trt8.6.0").startswith("_trtflow/calibration-cache/r/")


def test_open_model_on_a_local_bucket(tmp_path):
    models.save(models.small_cnn(), tmp_path / "bucket" / "models" / "cnn.onnx")
    storage, pkg = open_model(str(tmp_path / "bucket" / "models" / "cnn.onnx"))
    assert pkg.name == "cnn" and storage.uri == (tmp_path / "bucket").resolve().as_uri()


def test_open_model_on_s3(moto_s3, tmp_path):
    moto_s3.upload(models.save(models.small_cnn(), tmp_path / "m.onnx"), "models/cnn.onnx")
    storage, pkg = open_model("s3://trtflow-test/models/cnn.onnx")
    assert pkg.model_key == "models/cnn.onnx" and storage.bucket == "trtflow-test"
