"""One TensorRT build per GPU at a time, and a dead build never blocks the next one.

The exclusion is a host-local ``fcntl.flock`` on ``<lock dir>/gpu-<id>.lock`` (lock dir: setting
``TRTFLOW_GPU_LOCK_DIR``, default ``$TMPDIR/trtflow-gpu-locks``). The build-engine flow takes it
around its GPU subprocesses and passes the locked fd to each child (tasks.gpu_client
``passed_to_gpu_children``), so the lock is held by the flow process AND its GPU child: the kernel
frees it the instant the last of them is gone -- never while an orphan still builds, never later
than that. A physical GPU lives on one host, so a host-local lock covers every worker that can reach
it (two workers that point at the same GPU through a mis-set ``CUDA_VISIBLE_DEVICES``).

Why not only Prefect's global concurrency limit (what this module held before): its slot is a
lease the server frees only when it expires (60 s at the least, 300 s by default), so a SIGKILLed
holder blocked the next build for minutes; and it was released while an orphaned child built on.
The limit ``gpu-<id>`` is still taken once the flock is held, for visibility (the Prefect UI's
Concurrency page shows which run holds which GPU), with a 60 s lease and a short wait: if a dead
run's lease still holds it, the build goes ahead on the flock and says so in its log.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from tasks.errors import InfraError
from tasks.gpu_client import passed_to_gpu_children

LIMIT_PREFIX = "gpu-"
LOCK_DIR_SETTING = "TRTFLOW_GPU_LOCK_DIR"
VISIBILITY_LEASE_S = 60  # the least Prefect's server accepts
VISIBILITY_WAIT_S = 2.0  # a live holder of the Prefect slot would also hold the flock: only dead ones wait here
LOCK_POLL_S = 0.2  # how often a waiting build retries the flock (a blocking flock could not time out)
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


def gpu_lock_path(gpu_id: str) -> Path:
    """``<lock dir>/gpu-<id>.lock``: the one lock file of GPU ``gpu_id`` on this host."""
    folder = Path(os.environ.get(LOCK_DIR_SETTING) or Path(tempfile.gettempdir()) / "trtflow-gpu-locks")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{gpu_limit_name(gpu_id)}.lock"


def _lock_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def gpu_flock(gpu_id: str, timeout_seconds: Optional[float] = None) -> Iterator[Path]:
    """Hold GPU ``gpu_id``'s host lock; GPU children started inside inherit it (see module docstring).

    Raises:
        InfraError: not free within ``timeout_seconds``.
    """
    path = gpu_lock_path(gpu_id)
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise InfraError(f"GPU {gpu_id} stayed busy for {timeout_seconds:.0f} s (lock {path}, held by "
                                     f"{_lock_holder(path)}).",
                                     fix="Wait for the running build to finish; the lock frees itself the moment "
                                         "its holder and its GPU child are gone.") from None
                time.sleep(LOCK_POLL_S)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        with passed_to_gpu_children(fd):
            yield path
    finally:
        os.close(fd)  # releases the flock unless a GPU child still holds the inherited fd


@contextmanager
def _visible_in_prefect(name: str, gpu_id: str, log) -> Iterator[None]:
    """Occupy the Prefect limit ``name`` for the UI, but never wait on a dead run's lease."""
    from prefect.concurrency.sync import concurrency

    try:
        ensure_gpu_limit(name)
        cm = concurrency(name, occupy=1, timeout_seconds=VISIBILITY_WAIT_S, strict=True,
                         lease_duration=VISIBILITY_LEASE_S)
        cm.__enter__()
    except TimeoutError:
        log.warning("Prefect limit %s is still held by a run that is gone (its lease runs out within %d s); "
                    "building on GPU %s under its host lock", name, VISIBILITY_LEASE_S, gpu_id)
        yield
        return
    try:
        yield
    except BaseException as err:
        cm.__exit__(type(err), err, err.__traceback__)
        raise
    else:
        cm.__exit__(None, None, None)


@contextmanager
def gpu_slot(gpu_id: str, timeout_seconds: Optional[float] = None) -> Iterator[str]:
    """Hold the one build slot of GPU ``gpu_id`` for the duration of the ``with`` block.

    Args:
        gpu_id: the GPU's UUID or host-and-index (see :func:`default_gpu_id`).
        timeout_seconds: give up waiting after this long (None waits as long as it takes).

    Yields:
        The name of the GPU's Prefect concurrency limit (shown in the UI while held).

    Raises:
        InfraError: the slot was not free within ``timeout_seconds`` (another build holds the GPU).
    """
    name = gpu_limit_name(gpu_id)
    log = _logger()
    log.info("Waiting for GPU slot %s", name)
    with gpu_flock(gpu_id, timeout_seconds):
        with _visible_in_prefect(name, gpu_id, log):
            log.info("Holding GPU slot %s", name)
            try:
                yield name
            finally:
                log.info("Released GPU slot %s", name)
