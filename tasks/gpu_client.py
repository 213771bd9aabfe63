"""Runs tasks/gpu in its own interpreter: ``$TRT_PYTHON -m tasks.gpu <verb> request.json response.json``.

The flow never imports tensorrt. Each GPU step is a subprocess in its own process group, which
gives crash isolation (a segfault or CUDA error kills only that process), a hard timeout (the whole
group is killed) and clean GPU memory per build. Its stdout and stderr are kept as ``build.log``.

The child's life is tied to its caller's: it gets ``PR_SET_PDEATHSIG`` = SIGKILL (a SIGKILLed flow
process takes it along), and any exception while waiting (Prefect's cancellation/termination
signal, SIGTERM, Ctrl-C) kills its whole group and waits for it before propagating. It inherits the
fds of :func:`passed_to_gpu_children` (flows/gpu_slot.py's per-GPU lock), so that lock is held until
the child itself is gone. Its environment is the allow-list of tasks/secrets.py (no credentials),
and the log tail and errors it returns are scrubbed of secrets.

Protocol: the request is a JSON object (see tasks/gpu/__main__.py for each verb's fields); the
response is ``{"ok": true, ...}`` or ``{"ok": false, "error": {"kind": "model"|"infra", "message",
"fix", "details"}}``.
"""
from __future__ import annotations

import contextvars
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

from tasks.errors import InfraError, ModelError, TrtflowError
from tasks.fixes import fix_for_build_failure
from tasks.gpu.compat import PHASE_PREFIX, Caps, caps_for_version
from tasks.limits import die_with_parent
from tasks.secrets import gpu_child_env, scrub

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# A build may run for minutes (ResNet-50 INT8 calibrated: 182 s on an H200) with TensorRT silent:
# the parent says how long and in which phase at least this often.
HEARTBEAT_S = 20.0
logger = logging.getLogger("trtflow.gpu_client")


def trt_python() -> str:
    """The interpreter that can import tensorrt: setting ``TRT_PYTHON``, default this interpreter."""
    return os.environ.get("TRT_PYTHON") or sys.executable


@dataclass(frozen=True)
class GpuEnv:
    """What a GPU worker offers; part of every engine's cache key and manifest."""

    tensorrt: str
    gpu: str
    compute_capability: str  # "9.0"
    driver: str
    cuda_runtime: str
    python: str
    interpreter: str
    gpu_uuid: str = ""
    memory_total_mib: int = 0
    caps: dict = field(default_factory=dict, compare=False, hash=False)  # see tasks/gpu/compat.py

    @property
    def sm(self) -> str:
        return "sm_" + self.compute_capability.replace(".", "")

    @property
    def target(self) -> str:
        """``sm_90-trt8.6.0``: the engine-compatibility part of bucket keys."""
        return f"{self.sm}-trt{self.tensorrt}"

    def policy(self) -> Caps:
        """This worker's TensorRT policy (tasks/gpu/compat.py): its probed caps, else its version's."""
        if self.caps:
            return Caps.from_dict({"version": self.tensorrt, **self.caps})
        return caps_for_version(self.tensorrt)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sm"] = self.sm
        d["target"] = self.target
        return d


@dataclass(frozen=True)
class GpuCall:
    """One finished subprocess call."""

    response: dict
    log_path: Path
    seconds: float


_INHERITED_FDS: contextvars.ContextVar = contextvars.ContextVar("trtflow_gpu_inherited_fds", default=())


@contextmanager
def passed_to_gpu_children(fd: int) -> Iterator[None]:
    """Every GPU child started inside the ``with`` block inherits ``fd`` (e.g. a held flock)."""
    token = _INHERITED_FDS.set(tuple(_INHERITED_FDS.get()) + (fd,))
    try:
        yield
    finally:
        _INHERITED_FDS.reset(token)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return scrub("\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    except OSError:
        return ""


def _child_env() -> dict:
    env = gpu_child_env()
    env["PYTHONPATH"] = str(PROJECT_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # The H100's /opt/trt/bin/trt-python wrapper replaces PYTHONPATH with its own site folder and
    # appends only TRT_EXTRA_PYTHONPATH, so the project root must travel there too.
    env["TRT_EXTRA_PYTHONPATH"] = str(PROJECT_ROOT) + (
        os.pathsep + env["TRT_EXTRA_PYTHONPATH"] if env.get("TRT_EXTRA_PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


STOP_GRACE_S = 3.0  # SIGTERM, then this long to exit, then SIGKILL


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _end_group(proc: subprocess.Popen, grace_s: float = 0.0) -> None:
    """End the child's whole process group (TensorRT may have started helpers) and reap the child:
    SIGTERM and ``grace_s`` to exit when given, then SIGKILL."""
    if grace_s > 0:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)
    proc.wait()


def _scrub_log(path: Path) -> None:
    """build.log is uploaded beside the engine: no credential may be in it."""
    try:
        text = path.read_text(errors="replace")
        clean = scrub(text)
        if clean != text:
            path.write_text(clean)
    except OSError:
        pass


class _SigtermRaises:
    """While waiting in the main thread with no SIGTERM handler installed (a plain ``python -m``
    run; Prefect's runner installs its own), turn SIGTERM into SystemExit so the ``finally`` that
    ends the child runs."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def _start_child(cmd: list, log, env: dict, workdir: Path, fds: Tuple[int, ...]) -> subprocess.Popen:
    parent = os.getpid()
    # preexec_fn: the only hook that runs in the child between fork and exec, where PDEATHSIG must be
    # set. PDEATHSIG fires when the forking THREAD exits: this thread also waits for the child.
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(workdir),
                            start_new_session=True, pass_fds=fds, preexec_fn=lambda: die_with_parent(parent))


def last_phase(log_path: Path, window: int = 65536) -> str:
    """The newest phase line the GPU child logged (tasks/gpu/build.py report_phase), or 'starting'."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - window))
            text = f.read().decode(errors="replace")
    except OSError:
        return "starting"
    lines = [ln for ln in text.splitlines() if PHASE_PREFIX in ln]
    return lines[-1].split(PHASE_PREFIX, 1)[1].strip() if lines else "starting"


def _wait(proc: subprocess.Popen, verb: str, log_path: Path, timeout_s: float,
          on_progress: Callable[[str], None], heartbeat_s: float) -> int:
    """The child's exit code; a heartbeat (elapsed, phase) every ``heartbeat_s``; the whole group
    killed and a ModelError past ``timeout_s``."""
    start = time.monotonic()
    while True:
        left = timeout_s - (time.monotonic() - start)
        try:
            return proc.wait(timeout=max(0.01, min(heartbeat_s, left)))
        except subprocess.TimeoutExpired:
            elapsed = time.monotonic() - start
            if elapsed < timeout_s:
                on_progress(f"GPU {verb}: {elapsed:.0f} s elapsed, phase: {last_phase(log_path)}")
                continue
        _end_group(proc)  # the whole group: TensorRT's builder may have started helper processes
        _scrub_log(log_path)
        phase = last_phase(log_path)
        matched = fix_for_build_failure(f"killed after {timeout_s:.0f} s")
        raise ModelError(f"GPU step '{verb}' ran past its {timeout_s:.0f} s limit in phase '{phase}' and was killed.",
                         fix=matched.fix, details=[_tail(log_path)])


def run_gpu(verb: str, request: dict, workdir: Path, timeout_s: float, log_name: str = "build.log",
            on_progress: Optional[Callable[[str], None]] = None, heartbeat_s: float = HEARTBEAT_S) -> GpuCall:
    """Run one tasks/gpu verb in a subprocess and return its response; ``on_progress`` (default:
    this module's logger) gets a heartbeat line every ``heartbeat_s`` while it runs.

    Raises:
        ModelError / InfraError as reported by the subprocess; InfraError when it crashes; ModelError
        when it runs past ``timeout_s`` (the spec's build.timeout_s says how to raise it).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    req_path, resp_path, log_path = workdir / f"{verb}.request.json", workdir / f"{verb}.response.json", workdir / log_name
    req_path.write_text(json.dumps(request, indent=2, sort_keys=True))
    resp_path.unlink(missing_ok=True)
    interpreter = trt_python()
    env = _child_env()
    cmd = [interpreter, "-m", "tasks.gpu", verb, str(req_path), str(resp_path)]
    start = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        try:
            proc = _start_child(cmd, log, env, workdir, tuple(_INHERITED_FDS.get()))
        except OSError as err:
            raise InfraError(f"cannot start the GPU interpreter {interpreter!r}: {err}.",
                             fix="Set TRT_PYTHON to a Python that has tensorrt and pycuda installed.") from None
        try:
            with _SigtermRaises():
                rc = _wait(proc, verb, log_path, timeout_s, on_progress or logger.info, heartbeat_s)
        except ModelError:
            raise  # past its time limit: _wait ended the group
        except BaseException:
            # Cancelled, terminated or interrupted: the child goes first (the GPU slot's lock with it),
            # then we do.
            _end_group(proc, STOP_GRACE_S)
            _scrub_log(log_path)
            raise
    _scrub_log(log_path)
    seconds = time.monotonic() - start
    response = None
    if resp_path.exists():
        try:
            response = json.loads(resp_path.read_text())
        except ValueError:
            response = None
    if response is None:
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        raise InfraError(f"GPU step '{verb}' crashed ({how}) without a result. Last lines of its log:\n{_tail(log_path)}",
                         fix="See build.log; a CUDA error or out-of-memory usually clears on a retry or another worker.")
    if not response.get("ok"):
        raise TrtflowError.from_dict(scrub(response.get("error") or {"kind": "infra", "message": "no error given"}))
    return GpuCall(response, log_path, seconds)


def probe_gpu(workdir: Path, timeout_s: float = 300) -> GpuEnv:
    """Ask the GPU interpreter what it offers. Fails clearly where tensorrt is not importable."""
    call = run_gpu("probe", {}, workdir, timeout_s, log_name="probe.log")
    env = call.response["env"]
    return GpuEnv(**{k: env[k] for k in GpuEnv.__dataclass_fields__ if k in env})


def gpu_env_from_dict(data: dict) -> Optional[GpuEnv]:
    try:
        return GpuEnv(**{k: data[k] for k in GpuEnv.__dataclass_fields__ if k in data})
    except TypeError:
        return None
