"""Q/DQ models in the bucket, keyed by model, data and recipe: each is made once, checked by sha256 on use."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from tasks.identity import get_checked, put_checked
from tasks.package import qdq_key
from tasks.spec import ModelSpec
from tasks.storage import Storage
from tasks.quantize.result import QuantizeResult, quantize_recipe, stats_path_for

log = logging.getLogger("trtflow.quantize")

@dataclass
class QdqCache:
    """A Q/DQ model and its statistics in the bucket, keyed by model sha + data sha + method (+ recipe)."""

    storage: Storage
    key: str

    @property
    def stats_key(self) -> str:
        return self.key + ".stats.json"

    def get(self, dest: Union[str, Path]) -> Optional[QuantizeResult]:
        """Download the model to ``dest`` (statistics beside it); None when the bucket has no complete
        entry or its model or external data does not match the recorded sha256 (tampered, torn): the
        caller then quantises again and overwrites the entry."""
        if self.storage.head(self.key) is None or self.storage.head(self.stats_key) is None:
            return None
        dest = Path(dest)
        if get_checked(self.storage, self.key, dest) is None:
            return None
        if self.storage.head(self.key + ".data") is not None \
                and get_checked(self.storage, self.key + ".data", dest.with_name(dest.name + ".data")) is None:
            return None
        stats = stats_path_for(dest)
        self.storage.download(self.stats_key, stats)
        record = json.loads(stats.read_text()).get("result", {})
        result = QuantizeResult.from_dict(record)
        result.out_path, result.stats_path = str(dest), str(stats)
        log.info("reusing Q/DQ model %s (sha256 checked)", self.storage.url(self.key))
        return result

    def put(self, result: QuantizeResult) -> str:
        """Upload the model (and external data) with their sha256 records first and the statistics
        last: a reader that finds the statistics finds a complete entry."""
        path = Path(result.out_path)
        data = path.with_name(path.name + ".data")
        if data.exists():
            put_checked(self.storage, self.key + ".data", data)
        put_checked(self.storage, self.key, path, content_type="application/octet-stream")
        self.storage.upload(Path(result.stats_path or stats_path_for(path)), self.stats_key,
                            content_type="application/json")
        return self.storage.url(self.key)


def qdq_cache(storage: Storage, name: str, model_sha: str, data_sha: str, method: str,
              recipe: Optional[str] = None) -> QdqCache:
    """The cache entry of one Q/DQ model. Pass ``recipe`` (:func:`quantize_recipe`) so that a changed
    exclusion list or placement never reuses an older model; ``method`` alone keys by method only."""
    tag = f"{method}-{recipe}" if recipe else method
    return QdqCache(storage, qdq_key(name, model_sha, data_sha, tag))


def qdq_cache_key(name: str, model_sha: str, data_sha: str, spec: ModelSpec, tensorrt: Optional[str] = None) -> str:
    """``tasks.package.qdq_key`` with the method tagged by :func:`quantize_recipe`."""
    return qdq_key(name, model_sha, data_sha, f"{spec.calibration.method}-{quantize_recipe(spec, tensorrt)}")


def fetch_cached_qdq(storage: Storage, key: str, dest: Union[str, Path]) -> bool:
    """Download the cached Q/DQ model at ``key`` to ``dest``; False when there is none."""
    return QdqCache(storage, key).get(dest) is not None


def store_cached_qdq(storage: Storage, key: str, path: Union[str, Path], result: QuantizeResult) -> str:
    """Upload the Q/DQ model at ``path`` and its statistics under ``key``."""
    if Path(result.out_path) != Path(path):
        result = QuantizeResult.from_dict({**result.to_dict(), "out_path": str(path)})
    return QdqCache(storage, key).put(result)
