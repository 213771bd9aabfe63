"""Processes that ``trtflow up`` starts and ``trtflow down`` stops, through psutil.

A process is recorded with its PID *and* its creation time, so a later process that reuses the PID
is never mistaken for ours (psutil compares both). Stopping takes the process and every descendant
(flow runs, GPU builds, uvicorn), SIGTERM first, SIGKILL for what is still there at the deadline.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import psutil


@dataclass
class Proc:
    """One process ``up`` started (the leader of its own session)."""

    role: str
    pid: int
    create_time: float   # psutil's creation time: tells our process from a later one with its PID
    cmd: List[str]
    log: str


def _ours(proc: Proc) -> Optional[psutil.Process]:
    """The live psutil process for ``proc``, or None if it exited or its PID now belongs to another."""
    try:
        p = psutil.Process(proc.pid)
        if abs(p.create_time() - proc.create_time) > 0.01 or p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_alive(proc: Proc) -> bool:
    return _ours(proc) is not None


def spawn(role: str, cmd: List[str], env: dict, log_dir: Path, cwd: Path) -> Proc:
    """Start ``cmd`` with its output in ``log_dir/<role>.log``."""
    log_path = Path(log_dir) / f"{role}.log"
    with open(log_path, "ab") as out:
        # A session of its own: `down` can stop it from anywhere, and a Ctrl-C in the terminal
        # that ran `trtflow up` does not take the stack with it.
        p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    return Proc(role, p.pid, psutil.Process(p.pid).create_time(), cmd, str(log_path))


def descendants(proc: Proc) -> List[psutil.Process]:
    p = _ours(proc)
    if p is None:
        return []
    try:
        return p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_processes(procs: List[Proc], timeout_s: float = 30.0) -> List[str]:
    """SIGTERM each recorded process that is still ours and its descendants; SIGKILL what remains.

    Returns "<role> (pid N)" for each recorded process that was stopped.
    """
    targets: List[psutil.Process] = []
    stopped: List[str] = []
    for proc in reversed(procs):  # workers before the server they report to
        p = _ours(proc)
        if p is None:
            continue
        targets += descendants(proc) + [p]
        stopped.append(f"{proc.role} (pid {proc.pid})")
    for p in targets:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    # wait_procs also reaps those that are our own children (`down` in the process that ran `up`).
    _, alive = psutil.wait_procs(targets, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return stopped


def tail(path: str, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file ("" when it cannot be read)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
