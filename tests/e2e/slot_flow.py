"""A flow that holds a GPU slot and records when it was inside (used by test_gpu_concurrency).

Run as ``python -m tests.e2e.slot_flow <gpu_id> <me> <other> <out_dir>``; PREFECT_API_URL names the
server. Marker files let the two runs watch each other:

- ``<me>.waiting``  written just before asking for the slot
- ``<me>.inside``   written once the slot is held
- ``<me>.done``     written after leaving, beside ``<me>.json`` holding the inside interval
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from prefect import flow

from flows.gpu_slot import gpu_slot

OBSERVE_S = 3.0   # how long a holder watches a waiting peer for a (wrong) entry
GIVE_UP_S = 90.0  # overall bound, so a broken run cannot hang the test


@flow(name="hold-gpu-slot")
def hold_gpu(gpu_id: str, me: str, other: str, out_dir: str) -> dict:
    out = Path(out_dir)
    (out / f"{me}.waiting").touch()
    with gpu_slot(gpu_id, timeout_seconds=GIVE_UP_S):
        start = time.time()
        (out / f"{me}.inside").touch()
        # Stay inside until the peer is inside too (overlap happened), the peer has finished, or the
        # peer has been waiting for OBSERVE_S while we hold the slot (it was kept out).
        give_up = time.monotonic() + GIVE_UP_S
        peer_waiting_since = None
        while time.monotonic() < give_up:
            if (out / f"{other}.inside").exists() or (out / f"{other}.done").exists():
                break
            if (out / f"{other}.waiting").exists():
                peer_waiting_since = peer_waiting_since or time.monotonic()
                if time.monotonic() - peer_waiting_since >= OBSERVE_S:
                    break
            time.sleep(0.05)  # polling marker files, not timing anything
        end = time.time()
    record = {"gpu_id": gpu_id, "start": start, "end": end}
    (out / f"{me}.json").write_text(json.dumps(record))
    (out / f"{me}.done").touch()
    return record


if __name__ == "__main__":
    hold_gpu(*sys.argv[1:5])
