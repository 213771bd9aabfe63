"""What an engine IS: the content hashes of its whole package, and hash-checked cache entries.

Two concepts live here because both answer "are these the bytes I think they are?":

* :class:`PackageIdentity`: every file of a model package (model, external data, trtflow.yaml,
  calibration/ and eval/ data) by sha256, one digest over all of them, and the package's upload
  time (newest LastModified of its files). The digest names the conversion's address in the bucket,
  so a weights-only update or new calibration/eval data is a new engine, never a cache hit.
* :func:`put_checked` / :func:`get_checked`: cached intermediates (Q/DQ models, calibration and
  timing caches) are written with a ``<key>.sha256.json`` record beside them and checked against it
  before use; a tampered, torn or unrecorded entry is logged and ignored, and the caller rebuilds and
  overwrites it.

No Prefect here (tasks/ rule); Python 3.9-clean.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Optional

from tasks.spec import SPEC_FILENAME
from tasks.storage import Storage, sha256_file

log = logging.getLogger("trtflow.identity")

IDENTITY_SCHEMA = "trtflow.identity/v1"
CHECK_SUFFIX = ".sha256.json"


@dataclass(frozen=True)
class PackageIdentity:
    """The content of one package version: file hashes, their digest, and when it was uploaded."""

    files: Dict[str, str] = field(default_factory=dict)  # path inside the package -> sha256
    uploaded_at: str = ""  # ISO time of the newest file's LastModified: orders uploads of one package

    @property
    def sha256(self) -> str:
        """One digest over (path, sha256) of every file: equal exactly when every file is equal."""
        return _digest(self.files)

    @property
    def weights_sha256(self) -> str:
        """The model with its external data: the package's top-level files except trtflow.yaml.

        Keys of Q/DQ models and calibration caches: they depend on the weights (a weights-only update
        must not reuse them) but not on eval data."""
        return _digest({p: s for p, s in self.files.items() if "/" not in p and p != SPEC_FILENAME})

    def to_dict(self) -> dict:
        return {"schema": IDENTITY_SCHEMA, "sha256": self.sha256, "weights_sha256": self.weights_sha256,
                "uploaded_at": self.uploaded_at,
                "files": dict(sorted(self.files.items()))}


def _digest(files: Dict[str, str]) -> str:
    lines = "".join(f"{path}\0{sha}\n" for path, sha in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def identity_of(root: Path, uploaded: Optional[datetime]) -> PackageIdentity:
    """Hash every file under a downloaded package folder ``root``."""
    root = Path(root)
    files = {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
    return PackageIdentity(files, upload_time(uploaded) if uploaded else "")


def upload_time(when: datetime) -> str:
    """A fixed-width UTC form (microseconds always present), so upload times compare as strings."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---- hash-checked cache entries ----------------------------------------------------------------
def sha_record_key(key: str) -> str:
    """Where the sha256 record of cache entry ``key`` lives."""
    return key + CHECK_SUFFIX


def put_checked(storage: Storage, key: str, path: Path, content_type: Optional[str] = None) -> str:
    """Upload ``path`` to ``key``, then its sha256 record (the record last: a reader that finds a
    record matching the bytes has a complete entry). Returns the sha256."""
    sha = sha256_file(Path(path))
    storage.upload(Path(path), key, content_type=content_type)
    storage.write_json(sha_record_key(key), {"sha256": sha, "bytes": Path(path).stat().st_size})
    return sha


def get_checked(storage: Storage, key: str, dest: Path) -> Optional[str]:
    """Download cache entry ``key`` to ``dest`` if its bytes match its recorded sha256.

    Returns the sha256 of what was downloaded, or None (nothing usable: absent, no record, or a
    mismatch — logged; ``dest`` is removed so nothing uses the bad bytes).
    """
    if storage.head(key) is None:
        return None
    record = storage.read_json(sha_record_key(key)) if storage.head(sha_record_key(key)) else None
    if not record or not record.get("sha256"):
        log.warning("cache entry %s has no sha256 record; ignoring it (it is rebuilt and rewritten)",
                    storage.url(key))
        return None
    storage.download(key, Path(dest))
    sha = sha256_file(Path(dest))
    if sha != record["sha256"]:
        log.warning("cache entry %s does not match its recorded sha256 (%s, recorded %s); ignoring it "
                    "(it is rebuilt and rewritten)", storage.url(key), sha[:12], record["sha256"][:12])
        Path(dest).unlink()
        return None
    return sha


def hash_record(path: Optional[Path]) -> Optional[str]:
    """sha256 of a local file, None when there is none (for manifests)."""
    return sha256_file(Path(path)) if path and Path(path).is_file() else None
