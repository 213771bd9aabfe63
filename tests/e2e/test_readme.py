"""The README, followed from a fresh clone as a new user would: every `make`/`trtflow` command in its
first two bash blocks runs here, and a new command there fails this test until it is covered.

The clone reuses this checkout's .venv (a symlink, its install stamp kept newer than the clone's
pyproject.toml so make does not reinstall). The GPU stage is the onnxruntime test double, as in
test_local_drop.py: with it the good model publishes; the corrupt one fails at validation.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests import models
from tests.doubles import make_trt_python_double
from tests.e2e.conftest import free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]


def readme_commands() -> list:
    """The `make …` and `trtflow …` lines of the README's first two bash blocks, comments stripped."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)[:2]
    lines = [ln.split("#")[0].strip() for block in blocks for ln in block.splitlines()]
    return [ln for ln in lines if ln.startswith(("make ", "trtflow ", "cp "))]


# What each README line does here: the shell line to run (None: run by CI itself, .ci/run), and its exit code.
COVERED = {
    "make run": ("make run", 0),
    "make test": (None, 0),
    "make down": ("make down", 0),
    "cp resnet50.onnx ~/.trtflow/bucket/models/": ("cp resnet50.onnx ~/.trtflow/bucket/models/", 0),
    "trtflow validate ~/.trtflow/bucket/models/resnet50.onnx": (None, 0),
    "trtflow convert ~/.trtflow/bucket/models/resnet50.onnx -p fp16 -p fp32": (None, 0),
    "trtflow status": (None, 1),           # 1: the corrupt model failed, as it should
    "trtflow status --json": (None, 1),
    "trtflow watch": (None, 0),
    "trtflow down": (None, 0),
}


def _sh(line: str, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def clone(tmp_path) -> Path:
    dest = tmp_path / "trtflow"
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    (dest / ".venv").symlink_to(REPO / ".venv")
    os.utime(dest / "pyproject.toml", (0, 0))  # older than .venv/.installed: make keeps the venv as is
    return dest


@pytest.fixture
def user_env(tmp_path) -> dict:
    home = tmp_path / "user"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRTFLOW_", "PREFECT_API_URL", "AWS_"))}
    env.update(HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1",
               TRT_PYTHON=str(make_trt_python_double(tmp_path / "double")), TRTFLOW_GPUS="0",
               PATH=f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}")
    return env


def test_every_readme_command_is_covered():
    assert set(readme_commands()) == set(COVERED), "README commands changed: cover them in COVERED and below"


def _no_traceback(result: subprocess.CompletedProcess, what: str) -> str:
    out = result.stdout + result.stderr
    assert "Traceback" not in out, f"{what}:\n{out}"
    return out


def test_follow_the_readme_from_a_fresh_clone(clone, user_env, tmp_path):
    home = Path(user_env["HOME"])
    port = free_port()
    run = _sh(f'make run UP_ARGS="--port {port} --watch-interval 2 --settle-seconds 1"', clone, user_env, 300)
    out = _no_traceback(run, "make run")
    assert run.returncode == 0, out
    drop = Path(re.search(r"Drop models into: (\S+)", out).group(1))
    assert drop == home / ".trtflow" / "bucket" / "models"
    assert ".venv/bin/trtflow" in out and "source .venv/bin/activate" in out and f":{port}" in out
    try:
        _drop_and_check(clone, user_env, tmp_path, drop)
    finally:
        down = _sh("make down", clone, user_env, 120)
    assert down.returncode == 0 and "server (pid" in _no_traceback(down, "make down")
    again = _sh("trtflow down", tmp_path, user_env, 60)
    assert again.returncode == 0 and "nothing was running" in _no_traceback(again, "trtflow down")


def _drop_and_check(clone: Path, env: dict, tmp_path: Path, drop: Path) -> None:
    elsewhere = tmp_path / "elsewhere"  # the README's commands work from any folder
    elsewhere.mkdir()
    models.save(models.small_cnn(), elsewhere / "resnet50.onnx")  # a small CNN stands in for ResNet-50
    cp = _sh(COVERED["cp resnet50.onnx ~/.trtflow/bucket/models/"][0], elsewhere, env)
    assert cp.returncode == 0, cp.stderr
    (drop / "corrupt.onnx").write_bytes(b"\x08\x07this is not a protobuf")

    def statuses():
        r = _sh("trtflow status --json", elsewhere, env, 60)
        rows = {m["model"]: m["status"] for m in json.loads(r.stdout)["models"]} if r.stdout.strip() else {}
        return rows if rows.get("resnet50") == "published" and rows.get("corrupt") == "failed" else None

    wait_for(statuses, 300, "resnet50 published and corrupt failed (trtflow status --json)", every_s=2)
    for line in readme_commands():
        shell, rc = COVERED[line]
        if shell is not None or line.startswith("make ") or line == "trtflow down":
            continue  # make run / cp ran above, make down / trtflow down run last; make test is CI itself
        result = _sh(line, elsewhere, env, 300)
        _no_traceback(result, line)
        assert result.returncode == rc, (line, result.stdout, result.stderr)
        if line == "trtflow status":
            assert "published" in result.stdout and "failed corrupt" in result.stdout, result.stdout
