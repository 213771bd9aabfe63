"""The Prefect UI of a real trtflow stack, driven by Debian's Chromium (headless, via selenium and
chromedriver): find convert-model, open its custom-run form, fill model_uri, submit, and see the
run in the API with that parameter.

Installs nothing: `apt-get install -y chromium chromium-driver` (the Makefile's browser-deps) does.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import boto3
import pytest

from tests import models
from tests.e2e.conftest import wait_for

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (apt-get install -y chromium "
                                                           "chromium-driver, or `make browser-deps` as root)"),
    pytest.mark.skipif(shutil.which("chromedriver") is None,
                       reason="chromedriver is missing (apt-get install -y chromium-driver)"),
]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000"]


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[test]')")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})  # kept on failure
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        opts.add_argument(flag)
    # The Debian driver, given explicitly: selenium must not try to download one.
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver"), log_output=str(tmp_path / "chromedriver.log")),
                              options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def quiet_watcher(e2e_client):
    """Pause watch-bucket (and let polls in flight finish) while the browser works.

    This test is about the form. On 2 cores, polls every few seconds keep the server's SQLite busy,
    and Prefect answers a write that meets "database is locked" with a retryable 503, which
    Prefect's Python client retries but the UI shows as "Oops. Something went wrong."
    """
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    dep = e2e_client.read_deployment_by_name("watch-bucket/watch-bucket")
    e2e_client.pause_deployment(dep.id)

    def settled():
        runs = e2e_client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
        return not [r for r in runs if r.state and (r.state.is_running() or r.state.is_pending())]
    try:
        wait_for(settled, 60, "watch-bucket polls in flight to finish")
        yield
    finally:
        e2e_client.resume_deployment(dep.id)


def _ui_runs(client, model_uri: str):
    """convert-model runs whose request names ``model_uri``."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["convert-model"])))
    return [r for r in runs if r.parameters.get("request", {}).get("model_uri") == model_uri]


def _open_run_found_through_the_api(browser, client, ui_url: str, model_uri: str):
    """The id of the convert-model run for ``model_uri`` (its page opened), or None if there is none."""
    created = _ui_runs(client, model_uri)
    if not created:
        return None
    browser.get(f"{ui_url}/runs/flow-run/{created[0].id}")
    return str(created[0].id)


def _dump_browser_logs(driver, path: Path) -> None:
    """Console messages and the UI's API calls that were not plain GETs or failed, for diagnosis."""
    lines = [f"console {e['level']}: {e['message']}" for e in driver.get_log("browser")]
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent" and msg["params"]["request"]["method"] != "GET":
            req = msg["params"]["request"]
            lines.append(f"request {req['method']} {req['url']} {req.get('postData', '')[:2000]}")
        elif msg["method"] == "Network.responseReceived" and msg["params"]["response"]["status"] >= 400:
            lines.append(f"response {msg['params']['response']['status']} {msg['params']['response']['url']}")
    path.write_text("\n".join(lines))


def test_start_a_conversion_from_the_ui_form(e2e_stack, e2e_client, quiet_watcher, browser, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    started = time.monotonic()
    # A model outside the watched models/ prefix, so only the UI starts its conversion.
    bucket = e2e_stack.bucket.removeprefix("s3://").rstrip("/")
    s3 = boto3.client("s3", endpoint_url=os.environ["TRTFLOW_S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.put_object(Bucket=bucket, Key="ui/models/delta.onnx", Body=models.small_cnn(seed=7).SerializeToString())
    model_uri = f"s3://{bucket}/ui/models/delta.onnx"

    wait = WebDriverWait(browser, 60)
    try:
        browser.get(f"{e2e_stack.ui_url}/deployments")
        wait.until(EC.element_to_be_clickable((By.LINK_TEXT, "convert-model"))).click()
        wait.until(EC.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Run']"))).click()
        wait.until(EC.element_to_be_clickable((By.XPATH, "//*[normalize-space()='Custom run']"))).click()
        # The request model renders as a form; model_uri is its one string field.
        field = wait.until(EC.visibility_of_element_located(
            (By.XPATH, "//*[normalize-space()='Model Uri']/following::textarea[1]")))
        field.send_keys(model_uri)
        browser.save_screenshot(str(tmp_path / "custom-run-form.png"))
        # The UI confirms with a toast "<run name> scheduled to start now" linking to the run, or
        # shows "Oops. Something went wrong." when the server answered 503 (SQLite busy, nothing
        # written). Then, like a person, submit again - only after the API confirms no run exists.
        # The UI confirms with a toast "<run name> scheduled to start now", or
        # shows "Oops. Something went wrong." when the server answered 503 (SQLite busy, nothing
        # written). Then, like a person, submit again - only after the API confirms no run exists.
        created_toast = "//*[contains(@class, 'toast-flow-run-create')]"
        oops = "//*[contains(@class, 'p-toast__card')][contains(normalize-space(), 'Oops')]"
        run_id = None
        for attempt in range(1, 4):
            errors_before = len(browser.find_elements(By.XPATH, oops))
            browser.find_element(By.XPATH, "//button[normalize-space()='Submit']").click()

            def outcome(d):
                buttons = d.find_elements(By.XPATH, created_toast)
                if buttons:
                    return buttons[0]
                return "error" if len(d.find_elements(By.XPATH, oops)) > errors_before else False
            seen = wait.until(outcome)
            browser.save_screenshot(str(tmp_path / f"submitted-{attempt}.png"))
            if seen != "error":
                # The toast fades after 5 s; the deployment's Runs tab, where the UI lands, links the run.
                run_name = browser.find_element(
                    By.XPATH, "//*[contains(@class, 'toast-flow-run-create__message--emphasized')]").text.strip()
                try:
                    wait.until(EC.element_to_be_clickable((By.XPATH, f"//a[normalize-space()='{run_name}']"))).click()
                    wait.until(lambda d: "/flow-run/" in d.current_url)
                    run_id = browser.current_url.rstrip("/").split("/flow-run/")[1].split("?")[0]
                except TimeoutException:
                    # the Runs tab did not list it within the wait (seen once in CI on a loaded 2-core
                    # machine): the toast said the run was created, so find it by its request and open it
                    run_id = _open_run_found_through_the_api(browser, e2e_client, e2e_stack.ui_url, model_uri)
                    assert run_id, f"the UI said {run_name!r} was scheduled, but no such run exists"
                break
            _dump_browser_logs(browser, tmp_path / f"browser-attempt{attempt}.log")
            run_id = _open_run_found_through_the_api(browser, e2e_client, e2e_stack.ui_url, model_uri)
            if run_id:  # the error came from another request; the run exists
                break
        assert run_id, "the UI could not create the run in 3 attempts (see browser-attempt*.log)"
        wait.until(EC.presence_of_element_located((By.XPATH, "//*[contains(normalize-space(), 'convert-model')]")))
        browser.save_screenshot(str(tmp_path / "flow-run.png"))
    except Exception:
        browser.save_screenshot(str(tmp_path / "failure.png"))
        _dump_browser_logs(browser, tmp_path / "browser.log")
        raise

    run = e2e_client.read_flow_run(run_id)
    deployment = e2e_client.read_deployment_by_name("convert-model/convert-model")
    assert run.deployment_id == deployment.id
    assert run.parameters["request"]["model_uri"] == model_uri
    assert [str(r.id) for r in _ui_runs(e2e_client, model_uri)] == [run_id]
    # And the GPU worker (the double) takes it and finishes it.
    final = wait_for(lambda: (r := e2e_client.read_flow_run(run_id)).state.is_final() and r, 120,
                     "the UI-started conversion to finish")
    assert final.state.is_completed(), final.state
    print(f"\n[browser] UI form -> run {run_id} completed (submitted on attempt {attempt}); "
          f"{time.monotonic() - started:.1f} s "
          f"(screenshots in {tmp_path})")


# ---- what a user sees: the form, a failure's reason, a run waiting for a GPU worker -------------------------
def _open_custom_run_form(browser, ui_url: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(f"{ui_url}/deployments")
    wait.until(EC.element_to_be_clickable((By.LINK_TEXT, "convert-model"))).click()
    wait.until(EC.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Run']"))).click()
    wait.until(EC.element_to_be_clickable((By.XPATH, "//*[normalize-space()='Custom run']"))).click()
    wait.until(EC.visibility_of_element_located((By.XPATH, "//*[normalize-space()='Model Uri']")))
    return wait


def _page_text(browser) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.TAG_NAME, "body").text


ARTIFACTS = Path(os.environ.get("TRTFLOW_TEST_ARTIFACTS") or Path(__file__).resolve().parents[2] / "build" /
                 "test-artifacts")


def _shot(browser, tmp_path: Path, name: str) -> Path:
    """A screenshot under build/test-artifacts (or TRTFLOW_TEST_ARTIFACTS), kept after the run."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 10_000, f"{path} looks empty"  # a blank page is a few KB
    return path


def test_the_convert_form_is_a_real_form(e2e_stack, quiet_watcher, browser, tmp_path):
    wait = _open_custom_run_form(browser, e2e_stack.ui_url)
    wait.until(lambda d: "Strategy" in _page_text(d) and "Precisions" in _page_text(d))
    text = _page_text(browser)
    shot = _shot(browser, tmp_path, "convert-form.png")
    assert 'Property is type "None"' not in text and "None" not in text.split(), (shot, text)
    for label in ("Model Uri", "Precisions", "Strategy", "Tolerances", "Force"):
        assert label in text, (label, shot)
    assert "spec" in text  # strategy's default: as the model's trtflow.yaml says
    print(f"\n[browser] convert form: {shot}")


def test_a_failed_run_shows_its_reason(e2e_stack, e2e_client, quiet_watcher, browser, tmp_path):
    from prefect.deployments import run_deployment

    bucket = e2e_stack.bucket.removeprefix("s3://").rstrip("/")
    s3 = boto3.client("s3", endpoint_url=os.environ["TRTFLOW_S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.put_object(Bucket=bucket, Key="ui/models/garbled.onnx", Body=b"\x08\x07this is not a protobuf")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: e2e_stack.api_url}):
        run = run_deployment("convert-model/convert-model", timeout=180,
                             parameters={"request": {"model_uri": f"s3://{bucket}/ui/models/garbled.onnx"}})
    assert run.state.is_failed(), run.state
    assert run.deployment_id == e2e_client.read_deployment_by_name("convert-model/convert-model").id
    status_keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="ui/_trtflow/status/garbled/")["Contents"]]
    reason = json.loads(s3.get_object(Bucket=bucket, Key=status_keys[0])["Body"].read())["error"]["message"]
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    try:
        browser.get(f"{e2e_stack.ui_url}/runs/flow-run/{run.id}")
        wait.until(lambda d: "Failed" in _page_text(d) and reason[:40] in _page_text(d))  # the run's logs say why
        run_shot = _shot(browser, tmp_path, "failed-run.png")
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

        artifact = e2e_client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["trtflow-garbled"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))[0]
        assert "failed at" in artifact.data and reason[:40] in artifact.data
        browser.get(f"{e2e_stack.ui_url}/artifacts/artifact/{artifact.id}")
        wait.until(lambda d: "failed at" in _page_text(d))
        artifact_shot = _shot(browser, tmp_path, "failed-run-artifact.png")
    except Exception:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "failed-run-failure.png"))
        (ARTIFACTS / "failed-run-failure.txt").write_text(_page_text(browser))
        raise
    print(f"\n[browser] failed run: {run_shot}, {artifact_shot}")


def test_a_run_waiting_for_a_gpu_worker_says_why(e2e_stack, e2e_client, quiet_watcher, browser, tmp_path):
    """With the gpu pool paused nothing can take the run: its artifact must say it waits for a GPU worker."""
    from selenium.webdriver.support.ui import WebDriverWait

    from prefect.client.schemas.actions import WorkPoolUpdate

    from prefect.states import Cancelled

    bucket = e2e_stack.bucket.removeprefix("s3://").rstrip("/")
    model = models.save(models.small_cnn(), tmp_path / "waiting.onnx")
    s3 = boto3.client("s3", endpoint_url=os.environ["TRTFLOW_S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.put_object(Bucket=bucket, Key="ui/models/waiting.onnx", Body=model.read_bytes())  # a good model
    dep = e2e_client.read_deployment_by_name("convert-model/convert-model")
    e2e_client.update_work_pool("gpu", WorkPoolUpdate(is_paused=True))
    run = e2e_client.create_flow_run_from_deployment(
        dep.id, parameters={"request": {"model_uri": f"s3://{bucket}/ui/models/waiting.onnx"}})
    try:
        browser.get(f"{e2e_stack.ui_url}/runs/flow-run/{run.id}")
        WebDriverWait(browser, 90).until(lambda d: "waiting for a GPU worker" in _page_text(d))
        assert "pool gpu is paused" in _page_text(browser)  # the run's log says why nothing takes it
        from selenium.webdriver.common.by import By

        needle = "contains(., 'waiting for a GPU worker')"  # the innermost element holding the log line
        line = browser.find_element(By.XPATH, f"//*[{needle} and not(*[{needle}])]")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", line)  # into the screenshot
        _shot(browser, tmp_path, "waiting-run.png")
    except Exception:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "waiting-run-failure.png"))
        (ARTIFACTS / "waiting-run-failure.txt").write_text(_page_text(browser))
        raise
    finally:
        e2e_client.set_flow_run_state(run.id, Cancelled(), force=True)
        e2e_client.update_work_pool("gpu", WorkPoolUpdate(is_paused=False))
