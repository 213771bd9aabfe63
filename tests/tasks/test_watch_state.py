"""tasks/watch_state.py: the state is written only when a poll changed it (big buckets, steady polls)."""
from __future__ import annotations

from tasks.storage import LocalStorage
from tasks.watch_state import STATE_KEY, PackageState, load_state, save_state


def test_a_steady_poll_writes_no_state(tmp_path, monkeypatch):
    store = LocalStorage(tmp_path)
    state = load_state(store)
    state.packages["a"] = PackageState("v1", 1.0, 1.0)
    assert save_state(store, state) is True
    writes = []
    real = LocalStorage.write_bytes
    monkeypatch.setattr(LocalStorage, "write_bytes", lambda self, key, *a, **k: writes.append(key) or real(self, key, *a, **k))
    again = load_state(store)
    assert again.packages == state.packages
    assert save_state(store, again) is False and writes == []  # nothing changed: nothing uploaded
    again.packages["a"].submitted = "v1"
    assert save_state(store, again) is True and writes == [STATE_KEY]
    assert load_state(store).packages["a"].submitted == "v1"
