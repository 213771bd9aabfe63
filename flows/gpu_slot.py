"""One TensorRT build per GPU at a time, across every worker and host.

Each physical GPU gets a Prefect global concurrency limit ``gpu-<id>`` with one slot. The
build-engine flow (flows/build.py) holds that slot around its GPU subprocess, so two workers that
happen to point at the same GPU (a mis-set ``CUDA_VISIBLE_DEVICES``, a second worker started by
hand) queue instead of building side by side and running each other out of memory. Workers'
``--limit 1`` bounds runs per worker; this bounds builds per GPU, which is what the hardware cares
about.

Prefect (3.9) enforces a global limit only if it exists, so :func:`ensure_gpu_limit` creates it
(race-safe: the name is unique on the server) and the slot is taken with ``strict=True``, so a
limit deleted underneath us fails loudly instead of silently allowing overlap. The slot is a
lease: if the flow process dies, the server frees it when the lease runs out.
"""
from __future__ import annotations

import logging
import os
import re
import socket
from contextlib import contextmanager
from typing import Iterator, Optional

from tasks.errors import InfraError

LIMIT_PREFIX = "gpu-"
_BANNED = re.compile(r"[/%&<>\s]")


def _logger():
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("trtflow.gpu_slot")


def default_gpu_id(gpu_uuid: str = "") -> str:
    """The id of the GPU this process builds on.

    The GPU's UUID (from ``probe_gpu``) is globally unique, so it is preferred; without one, the
    host name plus the first entry of ``CUDA_VISIBLE_DEVICES`` (TensorRT builds on device 0 of the
    visible set) names the GPU on this host.
    """
    if gpu_uuid:
        return gpu_uuid
    visible = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip() or "0"
    return f"{socket.gethostname()}-cuda{visible}"


def gpu_limit_name(gpu_id: str) -> str:
    """``gpu-<id>``, with characters Prefect does not allow in names replaced by ``_``."""
    if not gpu_id:
        raise ValueError("gpu_id must not be empty")
    gid = gpu_id[len(LIMIT_PREFIX):] if gpu_id.lower().startswith(LIMIT_PREFIX) else gpu_id
    return LIMIT_PREFIX + _BANNED.sub("_", gid)


def ensure_gpu_limit(name: str, slots: int = 1) -> None:
    """Create the global concurrency limit ``name`` with ``slots`` slots unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
        except ObjectAlreadyExists:
            pass  # another worker created it between our read and create: same result


@contextmanager
def gpu_slot(gpu_id: str, timeout_seconds: Optional[float] = None, lease_duration: float = 300) -> Iterator[str]:
    """Hold the one build slot of GPU ``gpu_id`` for the duration of the ``with`` block.

    Args:
        gpu_id: the GPU's UUID or host-and-index (see :func:`default_gpu_id`).
        timeout_seconds: give up waiting after this long (None waits as long as it takes).
        lease_duration: seconds the server keeps the slot if this process stops renewing it (dies).

    Yields:
        The name of the concurrency limit held.

    Raises:
        InfraError: the slot was not free within ``timeout_seconds`` (another build holds the GPU).
    """
    from prefect.concurrency.sync import concurrency

    name = gpu_limit_name(gpu_id)
    ensure_gpu_limit(name)
    log = _logger()
    log.info("Waiting for GPU slot %s", name)
    entered = False
    try:
        with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True,
                         lease_duration=lease_duration):
            entered = True
            log.info("Holding GPU slot %s", name)
            yield name
    except TimeoutError:
        if entered:
            raise  # raised by the build itself, not by the wait for the slot
        raise InfraError(f"GPU {gpu_id} stayed busy for {timeout_seconds:.0f} s (concurrency limit {name!r}).",
                         fix="Wait for the running build to finish, or see the limit's holder in the Prefect UI "
                             "under Concurrency.") from None
    finally:
        if entered:
            log.info("Released GPU slot %s", name)
