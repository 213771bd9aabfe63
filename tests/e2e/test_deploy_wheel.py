"""A normal (non-editable) `pip install .` can deploy: prefect.yaml travels with the package.

The clean virtualenv gets trtflow from a wheel build of a copy of this checkout; its dependencies come
from the test virtualenv's site-packages through a path (.pth) line, so the test runs offline and
fast. A path line does not run the .pth files in that folder, so the checkout's editable install is
not visible there: what is imported is the wheel's code.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from flows import supervise
from flows.stack import wait_for_api
from tests.e2e.conftest import free_port

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def _copy_checkout(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _clean_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    site = Path(subprocess.run([str(path / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_trtflow_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return site


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    server = supervise.spawn("server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                        "--port", str(port)], env, tmp_path, tmp_path)
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for_api(api_url, 120)
        yield api_url
    finally:
        supervise.stop_processes([server], timeout_s=20)


def test_pip_install_dot_then_trtflow_deploy(tmp_path, prefect_server):
    src = _copy_checkout(tmp_path / "src")
    venv = tmp_path / "venv"
    site = _clean_venv(venv)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-build-isolation", str(src)], check=True, cwd=tmp_path)
    assert (site / "flows" / "cli.py").exists() and not (site / "infra").exists()
    assert (venv / "share" / "trtflow" / "prefect.yaml").exists()
    env = dict(os.environ, TRTFLOW_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PYTHONPATH", None)
    env.pop("TRTFLOW_CODE_DIR", None)
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import flows.deploy as d; print(d.PREFECT_FILE)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout.strip()
    assert where == str(venv / "share" / "trtflow" / "prefect.yaml")
    shutil.rmtree(src)  # nothing may need the checkout any more
    deploy = subprocess.run([str(venv / "bin" / "trtflow"), "deploy", "--bucket", (tmp_path / "bucket").as_uri(),
                             "--api-url", prefect_server], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    assert "Deployments applied" in deploy.stdout and "Traceback" not in deploy.stderr

    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(prefect_server) as client:
        names = {f"{client.read_flow(d.flow_id).name}/{d.name}" for d in client.read_deployments()}
        convert = client.read_deployment_by_name("convert-model/convert-model")
    assert {"watch-bucket/watch-bucket", "convert-model/convert-model", "nightly-rebuild/nightly-rebuild"} <= names
    # Workers run the installed package's code, not a checkout.
    assert str(site) in str(convert.pull_steps), convert.pull_steps
