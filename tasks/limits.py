"""Limits for heavy CPU stages, and array files read without trusting their headers.

A heavy CPU stage (reference outputs, ORT benchmark, calibration, quantisation) runs
:func:`run_limited`: a child interpreter with ``RLIMIT_AS`` at ``limits.cpu_memory_mib`` and a wall
clock of ``limits.cpu_stage_timeout_s``. A model with a ``Loop`` of 10^12 iterations or an opt batch
of 10^6 then fails that one conversion with a ModelError naming the spec key to raise, instead of
hanging or starving the worker. A fresh interpreter (exec, not a bare fork) because the parent holds
Prefect's threads and sockets, whose forked copies are undefined behaviour.

Children die with their parent (:func:`die_with_parent`, Linux ``PR_SET_PDEATHSIG``): a SIGKILLed
conversion leaves no stage running on. Python 3.9-clean and free of Prefect (tasks/gpu_client uses it).
"""
from __future__ import annotations

import ctypes
import io
import os
import pickle
import resource
import signal
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np

from tasks.errors import InfraError, ModelError, TrtflowError

NPY_MAGIC = b"\x93NUMPY"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PICKLED_FIX = "Save with np.save of a numeric array (np.savez for several); arrays must not be pickled objects."
# Resolved at import, in the parent: between fork and exec (where die_with_parent runs) a dlopen
# could deadlock on a lock another thread held at fork time.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
_MEMORY_WORDS = ("bad_alloc", "Failed to allocate", "MemoryError", "Cannot allocate memory", "out of memory")


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """In a just-forked child: ask the kernel to send ``sig`` when the parent goes (Linux only).

    PDEATHSIG fires when the parent THREAD that forked the child exits, so callers start children
    from the thread that also waits for them. If the parent is already gone (it died between fork
    and here), exit at once: the signal would never come.
    """
    if _PRCTL is None:
        return
    _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def _memory_error(stage: str, limits: Any, err: str) -> ModelError:
    return ModelError(f"{stage} ran out of its {limits.cpu_memory_mib} MiB memory limit ({err.strip()[:300]}).",
                      fix="Raise limits.cpu_memory_mib in trtflow.yaml, or lower the batch size / opt shape "
                          "(profiles, build.default_opt_batch) or eval.max_samples.")


# The child is a fresh interpreter (not multiprocessing's spawn, which re-runs the parent's main
# script: a user's script without a __main__ guard would start its conversion again). stdin carries
# the parent's sys.path, then the pickled job; the answer comes back on the fd named in argv.
_CHILD_CODE = ("import pickle, sys; sys.path[:0] = pickle.load(sys.stdin.buffer); "
               "from tasks.limits import _child_main; _child_main(int(sys.argv[1]))")


def _child_main(result_fd: int) -> None:
    from multiprocessing.connection import Connection

    conn = Connection(result_fd, readable=False)
    memory_mib, fn, args, kwargs = pickle.load(sys.stdin.buffer)
    limit = int(memory_mib) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        payload = ("ok", fn(*args, **kwargs))
    except MemoryError as err:
        payload = ("memory", f"{type(err).__name__}: {err}")
    except TrtflowError as err:
        payload = ("trtflow", err.to_dict())
    except Exception as err:  # noqa: BLE001 - carried to the parent, which decides what it means
        text = f"{type(err).__name__}: {err}"
        payload = ("memory", text) if any(w in text for w in _MEMORY_WORDS) else ("error", text)
    try:
        conn.send(payload)
    except (pickle.PicklingError, TypeError, AttributeError) as err:
        conn.send(("error", f"the stage's result could not be sent back: {err}"))
    conn.close()


def _start_limited_child(job: tuple) -> Tuple[subprocess.Popen, Any]:
    from multiprocessing.connection import Connection

    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    try:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD_CODE, str(write_fd)], stdin=subprocess.PIPE,
                                pass_fds=(write_fd,), preexec_fn=lambda: die_with_parent(parent))
    except OSError as err:
        os.close(read_fd)
        raise InfraError(f"cannot start a child interpreter for a CPU stage: {err}", fix="See the worker's log.")
    finally:
        os.close(write_fd)
    try:
        proc.stdin.write(pickle.dumps(list(sys.path)) + pickle.dumps(job))
        proc.stdin.close()
    except BrokenPipeError:
        pass  # the child died at once: its missing answer says so below
    return proc, Connection(read_fd, writable=False)


def _died(stage: str, limits: Any, code: Optional[int]) -> TrtflowError:
    how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
    if code == -signal.SIGKILL:
        return _memory_error(stage, limits, f"killed by {how}, likely the kernel's OOM killer")
    return InfraError(f"{stage} died without a result ({how}).", fix="Retry; if it repeats, see the worker's log.")


def run_limited(stage: str, fn: Callable, *args: Any, limits: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a child interpreter under ``limits`` (a ``tasks.spec.Limits``).

    ``fn`` and its arguments must pickle (module-level function, plain data, paths).

    Raises:
        ModelError: past ``limits.cpu_stage_timeout_s`` or over ``limits.cpu_memory_mib`` (the message
            names the spec key), or a ModelError of ``fn`` itself.
        InfraError: the child died without an answer (killed from outside), or ``fn``'s InfraError.
    """
    proc, receive = _start_limited_child((limits.cpu_memory_mib, fn, args, kwargs))
    try:
        if not receive.poll(limits.cpu_stage_timeout_s):
            raise ModelError(f"{stage} ran past its {limits.cpu_stage_timeout_s} s time limit and was stopped "
                             "(a Loop with a huge trip count, or far too many iterations or samples?).",
                             fix="Raise limits.cpu_stage_timeout_s in trtflow.yaml if the model really needs "
                                 "longer; otherwise lower bench.ort_iterations / eval samples or fix the model.")
        try:
            kind, value = receive.recv()
        except EOFError:
            try:
                code = proc.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            raise _died(stage, limits, code) from None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        receive.close()
    if kind == "ok":
        return value
    if kind == "memory":
        raise _memory_error(stage, limits, value)
    if kind == "trtflow":
        raise TrtflowError.from_dict(value)
    raise InfraError(f"{stage} failed: {value}", fix="See the worker's log; retry if the cause was transient.")


# ---- array files -----------------------------------------------------------------------------
ArraySource = Union[Path, str, bytes]


def _as_file(source: ArraySource):
    return io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else Path(source)


def _refuse_pickle(name: str, err: ValueError) -> ModelError:
    return ModelError(f"{name}: arrays must not be pickled objects; save with np.save of a numeric array ({err}).",
                      fix=PICKLED_FIX)


def _head(source: ArraySource) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source[:6])
    with open(source, "rb") as f:
        return f.read(6)


def load_npy(source: ArraySource, name: str) -> np.ndarray:
    """One .npy array, numeric only (``allow_pickle=False``); a pickled one is a ModelError."""
    try:
        return np.load(_as_file(source), allow_pickle=False)
    except ValueError as err:
        # numpy calls anything without the .npy magic "pickled" too: only a real .npy is an object array.
        if _head(source) == NPY_MAGIC and "pickle" in str(err).lower():
            raise _refuse_pickle(name, err) from None
        raise ModelError(f"{name} is not a readable .npy array: {err}",
                         fix="Write it with numpy.save of a numeric array.") from None


def load_npz(source: ArraySource, name: str, max_member_mib: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Every array of an .npz, refusing a member that would inflate past ``max_member_mib``.

    The zip directory says how large each member inflates (``file_size``) before anything is read,
    so a 4 MB archive holding a 4 GiB member is refused without allocating it.
    """
    if max_member_mib is None:
        from tasks.spec import Limits

        max_member_mib = Limits().max_array_mib
    limit = int(max_member_mib) * 1024 * 1024
    try:
        with zipfile.ZipFile(_as_file(source)) as archive:
            big = [(i.filename, i.file_size) for i in archive.infolist() if i.file_size > limit]
    except zipfile.BadZipFile as err:
        raise ModelError(f"{name} is not a readable .npz archive: {err}",
                         fix="Write it with numpy.savez(path, **{input_name: array}).") from None
    if big:
        member, size = big[0]
        raise ModelError(f"{name}: array {member!r} inflates to {size / 2**20:.0f} MiB, over the "
                         f"{max_member_mib} MiB limit per array; it was not read.",
                         fix="Split the data over several files, or raise limits.max_array_mib in trtflow.yaml.")
    try:
        with np.load(_as_file(source), allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except ValueError as err:
        if "pickle" in str(err).lower():  # an .npz member is always a real .npy: this is an object array
            raise _refuse_pickle(name, err) from None
        raise ModelError(f"{name} is not a readable .npz archive: {err}",
                         fix="Write it with numpy.savez(path, **{input_name: array}).") from None
