"""One Storage interface over ``s3://bucket/prefix`` (boto3) and ``file:///dir`` (a local folder).

Keys are ``/``-separated and relative to the storage root. Large objects are streamed to and from
disk (boto3's managed transfers, ``shutil.copyfileobj``); listings paginate.

S3 configuration comes from the standard boto3 chain (environment, ~/.aws, instance role) plus
``TRTFLOW_S3_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for MinIO or moto. Retries use botocore's
``standard`` mode rather than a loop of our own.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Iterator, Optional, Protocol
from urllib.parse import unquote, urlparse

from tasks.errors import InfraError, ModelError

log = logging.getLogger("trtflow.storage")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    modified: datetime


def check_key(key: str) -> str:
    """Reject keys that could escape the storage root or are ambiguous."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise ModelError(f"object key {key!r} is not a relative '/'-separated path.",
                         fix="Use keys like 'models/<name>.onnx'.")
    parts = PurePosixPath(key).parts
    if any(p in ("..", ".") for p in parts) or key != "/".join(parts) + ("/" if key.endswith("/") else ""):
        raise ModelError(f"object key {key!r} contains '.', '..' or empty segments.",
                         fix="Rename the object to a plain path without '..' or '//'.")
    return key


class Storage(Protocol):
    uri: str

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...
    def head(self, key: str) -> Optional[ObjectInfo]: ...
    def download(self, key: str, dest: Path) -> ObjectInfo: ...
    def upload(self, src: Path, key: str, content_type: Optional[str] = None) -> ObjectInfo: ...
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes, content_type: Optional[str] = None) -> ObjectInfo: ...
    def delete(self, key: str) -> None: ...
    def url(self, key: str) -> str: ...


class _Helpers:
    """JSON conveniences shared by both backends."""

    def read_json(self, key: str) -> Optional[dict]:
        if self.head(key) is None:  # type: ignore[attr-defined]
            return None
        return json.loads(self.read_bytes(key))  # type: ignore[attr-defined]

    def write_json(self, key: str, data: dict) -> ObjectInfo:
        body = json.dumps(data, indent=2, sort_keys=True, default=str).encode()
        return self.write_bytes(key, body, content_type="application/json")  # type: ignore[attr-defined]


class LocalStorage(_Helpers):
    """A local folder as a bucket: the embedded default (``file:///srv/trtflow``)."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if path != self.root and self.root not in path.parents:
            raise ModelError(f"object key {key!r} resolves outside the bucket folder {self.root}.",
                             fix="Remove the symbolic link or '..' that leads out of the bucket folder.")
        return path

    @staticmethod
    def _etag(path: Path) -> str:
        # Local "ETag": size+mtime is cheap and changes whenever the file does (a sha would re-read GBs).
        st = path.stat()
        return f"{st.st_size:x}-{st.st_mtime_ns:x}"

    def _info(self, key: str, path: Path) -> ObjectInfo:
        st = path.stat()
        return ObjectInfo(key, st.st_size, self._etag(path), datetime.fromtimestamp(st.st_mtime, tz=timezone.utc))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self.root
        # Walk only the folder the prefix names ("models/" need not walk engines/).
        start = base / prefix.rsplit("/", 1)[0] if "/" in prefix else base
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".trtflow-tmp"))
            for name in sorted(filenames):
                if name.startswith(".trtflow-tmp"):
                    continue  # a write in progress
                path = Path(dirpath) / name
                key = path.relative_to(base).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    info = self._info(key, path)
                except OSError as err:
                    # A dangling symlink, or a file deleted while we list: skip it, list the rest.
                    log.warning("Skipping %s in the listing: %s", self.url(key), err)
                    continue
                yield info

    def head(self, key: str) -> Optional[ObjectInfo]:
        path = self._path(key)
        return self._info(key, path) if path.is_file() else None

    def download(self, key: str, dest: Path) -> ObjectInfo:
        path = self._path(key)
        if not path.is_file():
            raise ModelError(f"{self.url(key)} does not exist.", fix="Check the model name and the bucket.")
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        return self._info(key, path)

    def _atomic_write(self, key: str, writer) -> ObjectInfo:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename: readers never see half an object (as with S3).
        fd, tmp = tempfile.mkstemp(prefix=".trtflow-tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                writer(out)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self._info(key, path)

    def upload(self, src: Path, key: str, content_type: Optional[str] = None) -> ObjectInfo:
        def copy(out):
            with open(src, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
        return self._atomic_write(key, copy)

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise ModelError(f"{self.url(key)} does not exist.", fix="Check the name and the bucket.")
        return path.read_bytes()

    def write_bytes(self, key: str, data: bytes, content_type: Optional[str] = None) -> ObjectInfo:
        return self._atomic_write(key, lambda out: out.write(data))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def url(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"


class S3Storage(_Helpers):
    """An S3 bucket (AWS, MinIO, moto) with an optional key prefix."""

    def __init__(self, bucket: str, prefix: str = "", client=None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}"
        if client is None:
            endpoint = os.environ.get("TRTFLOW_S3_ENDPOINT_URL") or None
            # A session of its own, not boto3's default one: that caches the credentials it first
            # resolved for the life of the process, so a worker would keep using rotated-away keys.
            client = boto3.session.Session().client("s3", endpoint_url=endpoint,
                                                    config=Config(retries={"mode": "standard", "max_attempts": 5}))
        self.client = client

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _call(self, what: str, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ModelError(f"{what}: not found.", fix="Check the model name and the bucket.") from None
            if code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise InfraError(f"{what}: {code} on bucket {self.bucket!r}.",
                                 fix="Check the bucket name, credentials and the IAM policy in infra/iam-policy.json.") from None
            raise InfraError(f"{what}: {err}") from err
        except BotoCoreError as err:
            raise InfraError(f"{what}: {err}", fix="Check the S3 endpoint and network.") from err

    @staticmethod
    def _etag(raw: str) -> str:
        return raw.strip('"')

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
        page_iter = iter(pages)
        while True:
            page = self._call(f"listing {self.uri}{prefix}", next, page_iter, None)
            if page is None:
                return
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):
                    continue  # a console "folder" marker, not an object (LocalStorage lists no folders either)
                yield ObjectInfo(obj["Key"][len(self.prefix):], obj["Size"], self._etag(obj["ETag"]), obj["LastModified"])

    def head(self, key: str) -> Optional[ObjectInfo]:
        from botocore.exceptions import ClientError

        try:
            r = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise InfraError(f"head {self.url(key)}: {err}") from err
        return ObjectInfo(key, r["ContentLength"], self._etag(r["ETag"]), r["LastModified"])

    def download(self, key: str, dest: Path) -> ObjectInfo:
        info = self.head(key)
        if info is None:
            raise ModelError(f"{self.url(key)} does not exist.", fix="Check the model name and the bucket.")
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        self._call(f"download {self.url(key)}", self.client.download_file, self.bucket, self._key(key), str(dest))
        return info

    def upload(self, src: Path, key: str, content_type: Optional[str] = None) -> ObjectInfo:
        extra = {"ContentType": content_type} if content_type else None
        self._call(f"upload {self.url(key)}", self.client.upload_file, str(src), self.bucket, self._key(key),
                   ExtraArgs=extra)
        info = self.head(key)
        assert info is not None
        return info

    def read_bytes(self, key: str) -> bytes:
        r = self._call(f"read {self.url(key)}", self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return r["Body"].read()

    def write_bytes(self, key: str, data: bytes, content_type: Optional[str] = None) -> ObjectInfo:
        kwargs = {"ContentType": content_type} if content_type else {}
        r = self._call(f"write {self.url(key)}", self.client.put_object, Bucket=self.bucket, Key=self._key(key),
                       Body=data, **kwargs)
        return ObjectInfo(key, len(data), self._etag(r["ETag"]), datetime.now(timezone.utc))

    def delete(self, key: str) -> None:
        self._call(f"delete {self.url(key)}", self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"


def open_storage(uri: str) -> Storage:
    """``s3://bucket[/prefix]``, ``file:///dir`` or a plain local path."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ModelError(f"{uri!r} names no bucket.", fix="Write s3://<bucket>[/<prefix>].")
        return S3Storage(parsed.netloc, unquote(parsed.path))
    if parsed.scheme == "file":
        return LocalStorage(Path(unquote(parsed.path)))
    if parsed.scheme == "":
        return LocalStorage(Path(uri))
    raise ModelError(f"storage URI {uri!r} has an unsupported scheme {parsed.scheme!r}.",
                     fix="Use s3://bucket/prefix or file:///path (or a plain local folder).")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
