"""Test doubles and helpers shared by the watcher's tests (polling and events)."""
from __future__ import annotations

import os
from pathlib import Path

from tasks.watch_state import Due

T0 = 1_700_000_000.0  # file mtimes are pinned relative to this; the watcher's clock is injected
SETTLE = 30.0


def put(root: Path, key: str, data: bytes, mtime: float) -> None:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


class Recorder:
    """Test double of a Submit: records what would be started instead of calling run_deployment."""

    def __init__(self, fail: set[str] = frozenset()):
        self.calls: list[tuple[Due, dict]] = []
        self.fail = set(fail)

    def __call__(self, due: Due, params: dict) -> str:
        if due.name in self.fail:
            raise RuntimeError("API unreachable")
        self.calls.append((due, params))
        return f"run-{len(self.calls)}"

    @property
    def names(self) -> list[str]:
        return [d.name for d, _ in self.calls]
