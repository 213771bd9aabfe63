"""tasks/storage.py on every backend: a local folder, S3 mocked in-process (moto ``mock_aws``) and S3
over real HTTP (moto's ThreadedMotoServer)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tasks.errors import InfraError, ModelError
from tasks.storage import LocalStorage, S3Storage, check_key, open_storage, sha256_file

BACKENDS = ["local", "moto", "moto-server"]


@pytest.fixture(params=BACKENDS)
def storage(request):
    fixture = {"local": "local_bucket", "moto": "moto_s3", "moto-server": "moto_server_s3"}[request.param]
    return request.getfixturevalue(fixture)


def _file(path: Path, size: int, seed: int = 0) -> Path:
    """A file of ``size`` pseudo-random bytes, written in 1 MiB blocks."""
    block = hashlib.sha256(str(seed).encode()).digest() * (1 << 15)  # 1 MiB
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)
    return path


def test_write_read_head_and_delete(storage):
    info = storage.write_bytes("a/b.txt", b"hello", content_type="text/plain")
    assert info.key == "a/b.txt" and info.size == 5 and info.etag
    assert storage.read_bytes("a/b.txt") == b"hello"
    head = storage.head("a/b.txt")
    assert head.size == 5 and head.etag == info.etag and head.modified is not None
    assert storage.head("a/missing.txt") is None
    storage.write_bytes("a/b.txt", b"changed")
    assert storage.head("a/b.txt").etag != info.etag  # an overwrite is visible in the etag
    storage.delete("a/b.txt")
    assert storage.head("a/b.txt") is None
    storage.delete("a/b.txt")  # deleting what is gone is not an error


def test_json_round_trip_and_missing_json(storage):
    storage.write_json("_trtflow/status/x.json", {"status": "ok", "n": 3, "nested": {"a": [1, 2]}})
    assert storage.read_json("_trtflow/status/x.json") == {"status": "ok", "n": 3, "nested": {"a": [1, 2]}}
    assert storage.read_json("_trtflow/status/none.json") is None


def test_missing_objects_are_model_errors(storage, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        storage.download("models/none.onnx", tmp_path / "x")
    with pytest.raises(ModelError):
        storage.read_bytes("models/none.onnx")


def test_list_by_prefix_across_pages(storage):
    calls = []
    if isinstance(storage, S3Storage):
        # Pages of 7 keys: the paginator must follow continuation tokens (S3 pages at 1000).
        def small_pages(params, **kwargs):
            params["MaxKeys"] = 7
            calls.append(1)
        storage.client.meta.events.register("before-parameter-build.s3.ListObjectsV2", small_pages)
    keys = [f"models/m{i:02d}.onnx" for i in range(25)]
    for key in keys:
        storage.write_bytes(key, key.encode())
    storage.write_bytes("engines/x/latest.json", b"{}")
    listed = list(storage.list("models/"))
    assert sorted(o.key for o in listed) == keys
    assert all(o.size == len(o.key) for o in listed)
    assert {o.key for o in storage.list()} == set(keys) | {"engines/x/latest.json"}
    assert list(storage.list("nothing/")) == []
    if isinstance(storage, S3Storage):
        assert len(calls) >= 4  # 25 keys in pages of 7 (moto honours MaxKeys)


def test_upload_and_download_stream_a_multi_megabyte_file(storage, tmp_path):
    src = _file(tmp_path / "src" / "model.onnx", 3 * 1024 * 1024 + 17)
    info = storage.upload(src, "models/big.onnx", content_type="application/octet-stream")
    assert info.size == src.stat().st_size
    dest = tmp_path / "dest" / "nested" / "model.onnx"
    got = storage.download("models/big.onnx", dest)
    assert got.size == info.size and sha256_file(dest) == sha256_file(src)


def test_multipart_upload_above_the_transfer_threshold(storage, tmp_path):
    # boto3's managed transfer switches to multipart above 8 MiB; the object must come back whole.
    src = _file(tmp_path / "w.bin", 9 * 1024 * 1024, seed=1)
    info = storage.upload(src, "models/pkg/model.onnx.data")
    if isinstance(storage, S3Storage):
        assert info.etag.endswith("-2"), info.etag  # a multipart ETag: <md5 of md5s>-<parts>
    dest = storage.download("models/pkg/model.onnx.data", tmp_path / "back.bin")
    assert dest.size == src.stat().st_size
    assert sha256_file(tmp_path / "back.bin") == sha256_file(src)


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/../b", "./a", "", "a\\b", "a/\x00"])
def test_hostile_keys_are_rejected(storage, tmp_path, key):
    src = _file(tmp_path / "f", 10)
    for op in (lambda: storage.write_bytes(key, b"x"), lambda: storage.head(key), lambda: storage.read_bytes(key),
               lambda: storage.download(key, tmp_path / "d"), lambda: storage.upload(src, key),
               lambda: storage.delete(key)):
        with pytest.raises(ModelError) as info:
            op()
        assert info.value.fix
    assert list(storage.list()) == []  # nothing was written anywhere


def test_check_key_accepts_plain_keys():
    for key in ("models/a.onnx", "engines/a/0123/sm_90-trt8.6.0/int8/model.plan", "a.b-c_d", "prefix/"):
        assert check_key(key) == key


# ---- LocalStorage specifics ---------------------------------------------------------------------
def test_local_symlink_out_of_the_bucket_is_rejected(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    store = LocalStorage(tmp_path / "bucket")
    os.symlink(outside, store.root / "models")
    os.symlink(outside / "secret.txt", store.root / "link.txt")
    for op in (lambda: store.read_bytes("models/secret.txt"), lambda: store.head("link.txt"),
               lambda: store.download("link.txt", tmp_path / "d"), lambda: store.write_bytes("models/new.txt", b"x")):
        with pytest.raises(ModelError, match="outside the bucket"):
            op()
    assert not (outside / "new.txt").exists()


def test_local_writes_are_atomic_and_hidden_while_in_progress(tmp_path):
    store = LocalStorage(tmp_path / "bucket")
    (store.root / "models").mkdir()
    (store.root / "models" / ".trtflow-tmp123").write_bytes(b"half")  # another writer, mid-write
    store.write_bytes("models/a.onnx", b"x")
    assert [o.key for o in store.list()] == ["models/a.onnx"]
    assert store.url("models/a.onnx") == store.root.as_uri() + "/models/a.onnx"


# ---- S3 specifics -------------------------------------------------------------------------------
def test_s3_prefix_scopes_every_key(moto_s3):
    store = S3Storage("trtflow-test", prefix="/team/a/", client=moto_s3.client)
    store.write_bytes("models/x.onnx", b"1")
    assert [o.key for o in store.list("models/")] == ["models/x.onnx"]
    raw = moto_s3.client.list_objects_v2(Bucket="trtflow-test")["Contents"]
    assert [o["Key"] for o in raw] == ["team/a/models/x.onnx"]
    assert store.url("models/x.onnx") == "s3://trtflow-test/team/a/models/x.onnx"
    assert store.uri == "s3://trtflow-test/team/a/"


def test_s3_missing_bucket_is_an_infra_error(moto_s3):
    store = S3Storage("no-such-bucket", client=moto_s3.client)
    with pytest.raises(InfraError, match="NoSuchBucket") as info:
        store.write_bytes("a", b"x")
    assert "bucket" in info.value.fix


def test_open_storage_reaches_the_http_server_from_the_environment(moto_server, moto_server_s3):
    store = open_storage(f"s3://{moto_server_s3.bucket}/some/prefix")
    assert isinstance(store, S3Storage) and store.prefix == "some/prefix/"
    assert store.client.meta.endpoint_url == moto_server
    store.write_bytes("k", b"v")
    assert moto_server_s3.read_bytes("some/prefix/k") == b"v"


def test_open_storage_schemes(tmp_path):
    assert isinstance(open_storage(str(tmp_path / "b")), LocalStorage)
    local = open_storage((tmp_path / "c").as_uri())
    assert isinstance(local, LocalStorage) and local.root == (tmp_path / "c").resolve()
    with pytest.raises(ModelError, match="unsupported scheme"):
        open_storage("gs://bucket/x")
    with pytest.raises(ModelError, match="names no bucket"):
        open_storage("s3:///x")
