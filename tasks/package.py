"""Model packages in the bucket and the bucket's key convention (one place for every key).

A package is either a single file ``models/<name>.onnx`` (plus ``models/<name>.onnx.data`` style
external data beside it) or a folder ``models/<name>/`` holding ``model.onnx`` and optionally its
external data, ``trtflow.yaml``, ``calibration/`` and ``eval/``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional
from urllib.parse import unquote, urlparse

from tasks.errors import ModelError
from tasks.identity import PackageIdentity, identity_of
from tasks.spec import SPEC_FILENAME
from tasks.storage import ObjectInfo, Storage, open_storage
from tasks.watch_state import package_fingerprint

MODELS_PREFIX = "models/"
ENGINES_PREFIX = "engines/"
STATUS_PREFIX = "_trtflow/status/"
WORK_PREFIX = "_trtflow/work/"
WORKERS_PREFIX = "_trtflow/workers/"
CACHE_PREFIX = "_trtflow/"
FOLDER_MODEL = "model.onnx"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or ".." in name:
        raise ModelError(f"model name {name!r} is not allowed.",
                         fix="Use letters, digits, '.', '_' and '-' (at most 128, starting with a letter or digit).")
    return name


# ---- keys of the bucket convention -------------------------------------------------------------
@dataclass(frozen=True)
class EngineAddress:
    """Where one conversion's engines live: model name, package identity, GPU/TensorRT target, spec key.

    They always travel together (publish, cache hit, latest.json); one object keeps them in step.
    ``package_sha`` (tasks.identity.PackageIdentity.sha256: model, external data, spec, calibration
    and eval data) names the folder, so any changed file of the package is a new address (no cache
    hit); without one (older callers) the model's sha does.
    """

    name: str
    model_sha: str
    target: str  # "sm_90-trt8.6.0"
    spec_key: str
    package_sha: str = ""

    @property
    def identity_sha(self) -> str:
        return self.package_sha or self.model_sha

    @property
    def prefix(self) -> str:
        return conversion_prefix(self.name, self.identity_sha, self.target, self.spec_key)

    @property
    def conversion_key(self) -> str:
        return conversion_key(self.name, self.identity_sha, self.target, self.spec_key)

    def conversion_record_key(self, record_sha: str) -> str:
        """One run's conversion record, under its own sha256: latest.json points here, never at the
        ``conversion.json`` index that a later (forced) run of the same address rewrites."""
        if not re.fullmatch(r"[0-9a-f]{16,64}", record_sha or ""):
            raise ValueError(f"record sha256 {record_sha!r} is not a hex digest")
        return f"{self.prefix}conversions/{record_sha[:16]}.json"

    def engine_prefix(self, precision: str, engine_sha: str) -> str:
        return engine_prefix(self.name, self.identity_sha, self.target, self.spec_key, precision, engine_sha)


def work_prefix(flow_run_id: str, precision: str) -> str:
    """``_trtflow/work/<convert-model run id>/<precision>/``: one GPU build's inputs and outputs.

    convert-model writes the build's inputs there, the build-engine flow (maybe on another host)
    writes its outputs beside them, and convert-model removes the whole prefix when it is done.
    """
    return f"{WORK_PREFIX}{check_name(flow_run_id)}/{precision}/"


def worker_key(worker_id: str) -> str:
    """``_trtflow/workers/<worker id>.json``: what a GPU worker's TensorRT and GPU are (its probe)."""
    return f"{WORKERS_PREFIX}{check_name(worker_id)}.json"


def conversion_prefix(name: str, package_sha: str, target: str, spec_key: str) -> str:
    """``engines/<name>/<package sha[:12]>/<sm_XX>-trt<version>/<spec key>/``; ``target`` is ``sm_90-trt8.6.0``.

    The package sha covers every file of the package and the spec key (hash of profiles, calibration
    and build options) the overrides, so a changed model, data or trtflow.yaml never reuses or
    overwrites the engines an older latest.json points at.
    """
    return f"{ENGINES_PREFIX}{check_name(name)}/{package_sha[:12]}/{target}/{spec_key}/"


def engine_prefix(name: str, package_sha: str, target: str, spec_key: str, precision: str, engine_sha: str) -> str:
    """``<conversion prefix><precision>/<engine sha[:16]>/``: content-addressed, so publishing never
    overwrites an engine (or the manifest beside it) that a reader may be following; a rebuild that
    makes other bytes gets another folder."""
    if not re.fullmatch(r"[0-9a-f]{16,64}", engine_sha or ""):
        raise ValueError(f"engine sha256 {engine_sha!r} is not a hex digest")
    return f"{conversion_prefix(name, package_sha, target, spec_key)}{precision}/{engine_sha[:16]}/"


def conversion_key(name: str, package_sha: str, target: str, spec_key: str) -> str:
    """The record of a finished conversion: its existence is the engine cache hit."""
    return f"{conversion_prefix(name, package_sha, target, spec_key)}conversion.json"


def latest_key(name: str) -> str:
    return f"{ENGINES_PREFIX}{check_name(name)}/latest.json"


def status_key(name: str, model_sha: str) -> str:
    return f"{STATUS_PREFIX}{check_name(name)}/{model_sha[:12] if model_sha else 'unknown'}.json"


def timing_cache_key(target: str) -> str:
    return f"{CACHE_PREFIX}timing-cache/{target}.cache"


def qdq_key(name: str, model_sha: str, data_sha: str, method: str) -> str:
    return f"{CACHE_PREFIX}qdq/{check_name(name)}/{model_sha[:12]}-{data_sha[:12]}-{method}.onnx"


def calib_cache_key(name: str, model_sha: str, data_sha: str, target: str) -> str:
    return f"{CACHE_PREFIX}calibration-cache/{check_name(name)}/{model_sha[:12]}-{data_sha[:12]}-{target}.cache"


# ---- packages ----------------------------------------------------------------------------------
@dataclass
class ModelPackage:
    """A model package as listed in the bucket (nothing downloaded)."""

    name: str
    model_key: str
    files: List[ObjectInfo] = field(default_factory=list)
    folder: Optional[str] = None  # "models/<name>/" for folder packages

    def relative(self, key: str) -> str:
        """The file's path inside the local copy of the package."""
        if self.folder:
            return key[len(self.folder):]
        return PurePosixPath(key).name

    @property
    def fingerprint(self) -> str:
        """Changes whenever any file of the package changes (see tasks/watch_state.package_fingerprint)."""
        return package_fingerprint(self.files)

    @property
    def last_modified(self):
        return max(f.modified for f in self.files)


@dataclass
class LocalPackage:
    """A package downloaded to a working folder."""

    name: str
    root: Path
    model_path: Path
    model_sha256: str
    model_etag: str
    model_size: int
    source_uri: str
    identity: PackageIdentity = field(default_factory=PackageIdentity)

    @property
    def package_sha256(self) -> str:
        """Every file of the package (tasks.identity); the model's sha where no identity was taken."""
        return self.identity.sha256 if self.identity.files else self.model_sha256

    @property
    def weights_sha256(self) -> str:
        """The model with its external data (keys of Q/DQ models and calibration caches)."""
        return self.identity.weights_sha256 if self.identity.files else self.model_sha256

    @property
    def uploaded_at(self) -> str:
        return self.identity.uploaded_at

    @property
    def spec_path(self) -> Optional[Path]:
        p = self.root / SPEC_FILENAME
        return p if p.exists() else None

    def data_dir(self, relative: str) -> Optional[Path]:
        p = (self.root / relative).resolve()
        if self.root.resolve() not in p.parents and p != self.root.resolve():
            raise ModelError(f"data folder {relative!r} points outside the model package.",
                             fix="Name a folder inside the package, e.g. 'calibration'.")
        return p if p.is_dir() else None


def list_packages(storage: Storage, prefix: str = MODELS_PREFIX) -> List[ModelPackage]:
    """Every package under ``models/``; objects that fit no package shape are ignored."""
    singles: Dict[str, ModelPackage] = {}
    folders: Dict[str, ModelPackage] = {}
    extras: Dict[str, List[ObjectInfo]] = {}
    for obj in storage.list(prefix):
        rest = obj.key[len(prefix):]
        parts = rest.split("/")
        if len(parts) == 1:
            m = re.match(r"^(.+)\.onnx$", rest)
            if m and NAME_RE.match(m.group(1)):
                singles[m.group(1)] = ModelPackage(m.group(1), obj.key, [obj])
            elif ".onnx." in rest:  # external data of a single-file package: <name>.onnx.data
                extras.setdefault(rest.split(".onnx.")[0], []).append(obj)
        elif NAME_RE.match(parts[0]):
            pkg = folders.setdefault(parts[0], ModelPackage(parts[0], f"{prefix}{parts[0]}/{FOLDER_MODEL}",
                                                            [], folder=f"{prefix}{parts[0]}/"))
            pkg.files.append(obj)
    for name, objs in extras.items():
        if name in singles:
            singles[name].files.extend(objs)
    out = list(singles.values())
    out += [p for p in folders.values() if any(f.key == p.model_key for f in p.files)]
    return sorted(out, key=lambda p: p.name)


def find_package(storage: Storage, name: str) -> ModelPackage:
    check_name(name)
    for pkg in list_packages(storage):
        if pkg.name == name:
            return pkg
    raise ModelError(f"no model package named {name!r} under {storage.url(MODELS_PREFIX)}.",
                     fix=f"Upload models/{name}.onnx or models/{name}/model.onnx.")


def fetch_package(storage: Storage, pkg: ModelPackage, workdir: Path) -> LocalPackage:
    """Download every file of the package into ``workdir/<name>/`` (streamed, each file once)."""
    root = Path(workdir) / pkg.name
    root.mkdir(parents=True, exist_ok=True)
    model_info = None
    infos = []
    for obj in pkg.files:
        rel = pkg.relative(obj.key)
        dest = (root / rel).resolve()
        if root.resolve() not in dest.parents:
            raise ModelError(f"package file {obj.key!r} would land outside the package folder.",
                             fix="Rename the object.")
        info = storage.download(obj.key, dest)
        infos.append(info)
        if obj.key == pkg.model_key:
            model_info = info
    model_path = root / pkg.relative(pkg.model_key)
    if model_info is None:
        raise ModelError(f"{storage.url(pkg.model_key)} is missing.", fix="Upload the model file.")
    # The upload time is that of the bytes downloaded (not the listing's): it orders this version
    # against others of the package in latest.json (tasks.publish.write_latest).
    identity = identity_of(root, max(i.modified for i in infos))
    return LocalPackage(pkg.name, root, model_path, identity.files[model_path.relative_to(root).as_posix()],
                        model_info.etag, model_info.size, storage.url(pkg.model_key), identity)


@dataclass(frozen=True)
class ModelRef:
    storage_uri: str
    name: str


def parse_model_uri(uri: str) -> ModelRef:
    """Split a model URI or path into (bucket root, package name).

    ``s3://b/p/models/x.onnx``, ``s3://b/p/models/x/`` and ``/dir/models/x/model.onnx`` all work; a
    local file outside any ``models/`` folder is treated as a single-file package in its own folder.
    """
    parsed = urlparse(uri)
    scheme = parsed.scheme if parsed.scheme in ("s3", "file") else ""
    if scheme == "s3":
        path = unquote(parsed.path).strip("/")
        root_prefix = f"s3://{parsed.netloc}/"
    else:
        raw = unquote(parsed.path) if scheme == "file" else uri
        path = str(Path(raw).resolve()).strip("/")
        root_prefix = "/"
    parts = path.split("/") if path else []
    if "models" in parts:
        i = len(parts) - 1 - parts[::-1].index("models")
        rest = parts[i + 1:]
        root = root_prefix + "/".join(parts[:i])
        if rest and rest[-1] == FOLDER_MODEL:
            rest = rest[:-1]
        if len(rest) == 1:
            name = rest[0][:-5] if rest[0].endswith(".onnx") else rest[0]
            return ModelRef(root.rstrip("/") or "/", check_name(name))
    if scheme == "" and parts and parts[-1].endswith(".onnx"):
        raise ModelError(f"{uri} is not inside a bucket's models/ folder.",
                         fix="Put it at <bucket>/models/<name>.onnx (or <bucket>/models/<name>/model.onnx) "
                             "and pass that path.")
    raise ModelError(f"cannot tell the model from {uri!r}.",
                     fix="Pass <bucket>/models/<name>.onnx, <bucket>/models/<name>/ or s3://bucket/models/<name>.onnx.")


def open_model(uri: str):
    """(storage, package) for a model URI."""
    ref = parse_model_uri(uri)
    storage = open_storage(ref.storage_uri)
    return storage, find_package(storage, ref.name)
