"""What the bucket watcher remembers between polls, and when a package version is due (plain code).

The watcher lists ``models/`` once per poll and folds that listing into a :class:`WatchState`: a
package version is *due* once the watcher has seen it unchanged for ``settle_seconds`` **and** its
newest file was last modified at least ``settle_seconds`` ago. Watching the fingerprint over
consecutive polls catches multi-file uploads still in progress (a folder package whose
``model.onnx.data`` or ``trtflow.yaml`` arrives later); the ``last_modified`` check covers a
watcher that starts while an upload is under way.

State lives in the bucket itself, ``_trtflow/watch/state.json``, rather than in a Prefect Variable:
it must survive worker restarts (every poll is a fresh process anyway), grows with the number of
models (Prefect variable values are size-limited), belongs to the bucket it describes (a new
Prefect server or a second watcher sees the same state), and is a file people can read. Writers
can race (two overlapping polls) and the last one wins; that costs at most one extra poll of
delay, never a duplicate, because every start carries an idempotency key (:func:`idempotency_key`).

No Prefect here: flows/watch.py (polling) and flows/events.py (SQS) drive it.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Set, Tuple

from tasks.storage import ObjectInfo, Storage

if TYPE_CHECKING:  # tasks.package imports package_fingerprint from here
    from tasks.package import ModelPackage

STATE_KEY = "_trtflow/watch/state.json"
STATE_VERSION = 1


# ---- fingerprints ------------------------------------------------------------------------------
def package_fingerprint(files: Iterable[ObjectInfo]) -> str:
    """Cheap, listing-based fingerprint of a whole package: every file's key, size and ETag.

    Model, external data (``model.onnx.data``), ``trtflow.yaml``, ``calibration/`` and ``eval/``
    files all count, so a weights-only update or new calibration/eval data is a new fingerprint.
    S3's ETag is a content hash for plain uploads (identical bytes, identical fingerprint: a revert
    finds its earlier engine); a local bucket's ETag is size+mtime (tasks/storage.py). No download.
    """
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.key):
        h.update(f"{f.key}\0{f.size}\0{f.etag}\n".encode())
    return h.hexdigest()


def version_of(storage_uri: str, pkg: ModelPackage) -> str:
    """Fingerprint of one *upload* of a package (the watcher's unit of "convert once").

    :func:`package_fingerprint` plus the newest last-modified time and the bucket: without the time
    a model reverted to an earlier upload would reuse that upload's idempotency key and never be
    converted (and re-published as latest) again; without the bucket two buckets could collide.
    """
    h = hashlib.sha256()
    h.update(f"{storage_uri}\0{package_fingerprint(pkg.files)}\0{pkg.last_modified.timestamp():.6f}".encode())
    return h.hexdigest()


def idempotency_key(name: str, version: str) -> str:
    """Same package version -> same key, so overlapping polls start one run between them."""
    return f"{name}-{version[:16]}"


# ---- state -------------------------------------------------------------------------------------
@dataclass
class PackageState:
    """What the watcher knows about one package between polls (times are epoch seconds)."""

    version: str             # version fingerprint last seen (see version_of)
    seen_at: float           # watcher clock when that version was first seen
    last_modified: float     # newest file of that version, from the listing
    submitted: str = ""      # version whose conversion was started ("" = none yet)
    flow_run_id: str = ""
    submitted_at: float = 0.0
    fingerprint: str = ""    # package_fingerprint of that version (for convert-model)


@dataclass
class WatchState:
    packages: Dict[str, PackageState] = field(default_factory=dict)
    clashes: Dict[str, List[str]] = field(default_factory=dict)  # name -> model keys claiming it

    # The dict as last read from or written to the bucket: save_state skips a write that changes nothing.
    saved: Optional[dict] = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        # vars(), not dataclasses.asdict: PackageState holds scalars only, and asdict's recursive
        # copy was the largest part of a poll's own time at 100k packages (5.5 s of ~13 s, bench/watch_scale.py).
        return {"version": STATE_VERSION, "packages": {k: dict(vars(v)) for k, v in sorted(self.packages.items())},
                "clashes": dict(sorted(self.clashes.items()))}

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> "WatchState":
        if not data or data.get("version") != STATE_VERSION:
            return cls()  # unknown layout: start afresh; idempotency keys still prevent duplicates
        fields = set(PackageState.__dataclass_fields__)
        return cls({name: PackageState(**{k: v for k, v in p.items() if k in fields})
                    for name, p in data.get("packages", {}).items()},
                   {name: list(keys) for name, keys in (data.get("clashes") or {}).items()})


def load_state(storage: Storage) -> WatchState:
    state = WatchState.from_dict(storage.read_json(STATE_KEY))  # type: ignore[attr-defined]
    state.saved = state.to_dict()
    return state


def save_state(storage: Storage, state: WatchState) -> bool:
    """Write the state unless it equals what was read: a steady poll of a big bucket then uploads
    nothing (the state is ~300 bytes a package: 30 MB at 100k). Returns whether it wrote."""
    data = state.to_dict()
    if data == state.saved:
        return False
    storage.write_json(STATE_KEY, data)  # type: ignore[attr-defined]
    state.saved = data
    return True


# ---- settling ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Due:
    """A settled package version whose conversion has not been started yet."""

    name: str
    model_key: str
    version: str
    fingerprint: str = ""   # package_fingerprint: what convert-model can key its cache on

    @property
    def idempotency_key(self) -> str:
        return idempotency_key(self.name, self.version)


@dataclass
class Observation:
    """One listing folded into the state: what is due, and which name clashes appeared or went away."""

    due: List[Due] = field(default_factory=list)
    new_clashes: Dict[str, List[str]] = field(default_factory=dict)
    resolved_clashes: List[str] = field(default_factory=list)


def split_clashes(packages: Iterable[ModelPackage]) -> Tuple[List[ModelPackage], Dict[str, List[str]]]:
    """Packages with a name of their own, and names claimed by more than one package.

    ``models/x.onnx`` beside ``models/x/model.onnx`` are two packages named ``x``. Rule: neither is
    converted (either choice could silently convert the file the user did not mean, and the convert
    side would have to agree on it) until one is removed; the watcher records the clash instead.
    """
    by_name: Dict[str, List[ModelPackage]] = defaultdict(list)
    for pkg in packages:
        by_name[pkg.name].append(pkg)
    single = [p[0] for p in by_name.values() if len(p) == 1]
    clashes = {n: sorted(p.model_key for p in pkgs) for n, pkgs in by_name.items() if len(pkgs) > 1}
    return sorted(single, key=lambda p: p.name), clashes


def _fold_package(state: WatchState, storage_uri: str, pkg: ModelPackage, now: float) -> PackageState:
    version = version_of(storage_uri, pkg)
    st = state.packages.get(pkg.name)
    if st is None or st.version != version:
        st = PackageState(version, now, pkg.last_modified.timestamp(),
                          submitted=st.submitted if st else "", flow_run_id=st.flow_run_id if st else "",
                          submitted_at=st.submitted_at if st else 0.0, fingerprint=package_fingerprint(pkg.files))
        state.packages[pkg.name] = st
    return st


def observe(state: WatchState, storage_uri: str, packages: Iterable[ModelPackage], now: float,
            settle_seconds: float) -> Observation:
    """Fold one listing into ``state``: the packages due for conversion and the name clashes.

    Packages absent from the listing are forgotten (a deleted package that comes back is new); a
    clashing name is forgotten too, so that once resolved it settles like a new upload.
    """
    result = Observation()
    single, clashes = split_clashes(packages)
    listed: Set[str] = set()
    for pkg in single:
        listed.add(pkg.name)
        st = _fold_package(state, storage_uri, pkg, now)
        if st.submitted == st.version:
            continue
        if now - st.seen_at >= settle_seconds and now - st.last_modified >= settle_seconds:
            result.due.append(Due(pkg.name, pkg.model_key, st.version, st.fingerprint))
    for name in set(state.packages) - listed:
        del state.packages[name]
    result.new_clashes = {n: keys for n, keys in clashes.items() if state.clashes.get(n) != keys}
    result.resolved_clashes = sorted(set(state.clashes) - set(clashes))
    state.clashes = clashes
    return result


def pending(state: WatchState) -> List[str]:
    """Packages seen but not yet started (still settling, or their start failed)."""
    return sorted(n for n, p in state.packages.items() if p.submitted != p.version)


def next_settle_at(state: WatchState, settle_seconds: float) -> Optional[float]:
    """Earliest watcher time at which a pending package can be due."""
    times = [max(p.seen_at, p.last_modified) + settle_seconds
             for p in state.packages.values() if p.submitted != p.version]
    return min(times) if times else None
