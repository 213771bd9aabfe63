"""The ``trtflow`` command: validate, convert, status, and the local stack (up, down, deploy, watch).

Errors are rendered as "error: <problem>" + "fix: <what to do>" in plain words; a traceback only
with ``-v``. Messages are printed with rich markup escaped, so ``pip install 'trtflow[gpu]'`` keeps
its ``[gpu]``.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.stack import DEFAULT_PORT, running_stack, trtflow_home
from tasks.errors import TrtflowError

app = typer.Typer(help="trtflow: ONNX models in a bucket -> validated, calibrated, accuracy-checked TensorRT engines.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
# soft_wrap: messages stay one line each when piped or captured, so they can be grepped and copied.
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def default_bucket() -> str:
    """TRTFLOW_BUCKET, else the running local stack's bucket, else the one `trtflow up` would create."""
    if os.environ.get("TRTFLOW_BUCKET"):
        return os.environ["TRTFLOW_BUCKET"]
    info = running_stack()
    return info.bucket if info else str(trtflow_home() / "bucket")


# ---- errors ------------------------------------------------------------------------------------
def _spec_key_hint(message: str) -> Optional[str]:
    """'Did you mean …?' for each "<path>: unknown key" in a spec error (difflib on ModelSpec's fields)."""
    from pydantic import BaseModel

    from tasks.spec import ModelSpec

    hints = []
    for path in re.findall(r"([\w.]+): unknown key", message):
        parts, model = path.split("."), ModelSpec
        for part in parts[:-1]:  # walk to the model that holds the unknown key
            ann = getattr(model, "model_fields", {}).get(part)
            ann = getattr(ann, "annotation", None)
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                break
            model = ann
        close = difflib.get_close_matches(parts[-1], list(getattr(model, "model_fields", {})), n=1)
        if close:
            hints.append(f"{path}: did you mean {'.'.join(parts[:-1] + close)!r}?")
    return " ".join(hints) or None


def explain(err: BaseException) -> Tuple[str, Optional[str]]:
    """(problem, fix) in plain words for any error a command can meet."""
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    cause = err
    while cause is not None:  # storage wraps botocore's errors; find the credentials one
        if isinstance(cause, (NoCredentialsError, PartialCredentialsError)):
            return ("no AWS credentials were found for S3.",
                    "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or write ~/.aws/credentials; "
                    "on EC2 attach an instance role with infra/iam-policy.json.")
        cause = cause.__cause__ or cause.__context__
    if isinstance(err, TrtflowError):
        hint = _spec_key_hint(err.message)
        return err.message, " ".join(x for x in (hint, err.fix) if x) or None
    if (type(err).__name__ in ("ConnectError", "ConnectTimeout") or isinstance(err, ConnectionRefusedError)
            or str(err).startswith("Failed to reach API")):
        # httpx's, from Prefect's client: the server went away mid-run (seen when a zoo run's
        # temporary servers were killed); the traceback would only say "connection refused"
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value() or "the temporary Prefect server this command started"
        return (f"lost the Prefect API at {url} ({type(err).__name__}: {err}): the server stopped or is unreachable.",
                "Check that the server runs (trtflow up, or `prefect server start`) and PREFECT_API_URL points at it, "
                "then run the command again; nothing half-published is kept.")
    return f"{type(err).__name__}: {err}", "Run again with -v for the traceback, and report it if it is a bug."


def fail(err: BaseException, verbose: bool = False) -> None:
    """Print the problem and its fix (the traceback too with -v) and exit 1."""
    if verbose:
        err_console.print_exception()
    problem, fix = explain(err)
    err_console.print(f"[bold red]error:[/] {escape(problem)}")
    if fix:
        err_console.print(f"[bold yellow]fix:[/] {escape(fix)}")
    raise typer.Exit(1)


def usage_error(problem: str, fix: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(problem)}")
    err_console.print(f"[bold yellow]fix:[/] {escape(fix)}")
    raise typer.Exit(2)


# ---- validate ----------------------------------------------------------------------------------
@app.command()
def validate(model: str = typer.Argument(..., help="an .onnx file, <bucket>/models/<name>[.onnx] or s3://…"),
             target: Optional[str] = typer.Option(None, help="TensorRT version whose parser limits apply (default: "
                                                  "the bucket's GPU workers', else TRTFLOW_TARGET_TRT, else 8.6)"),
             verbose: bool = typer.Option(False, "-v", "--verbose", help="show tracebacks")) -> None:
    """Check a model (and its trtflow.yaml) without converting it."""
    from tasks.package import fetch_package, open_model
    from tasks.spec import SPEC_FILENAME, load_spec
    from tasks.validate import validate_model

    try:
        path, storage = Path(model), None
        if path.is_file() and path.suffix == ".onnx" and "models" not in path.resolve().parts:
            model_path, root = path, path.parent  # a loose file: its folder is the package
        else:
            storage, pkg = open_model(model)
            local = fetch_package(storage, pkg, Path(tempfile.mkdtemp(prefix="trtflow-validate-")))
            model_path, root = local.model_path, local.root
        spec = load_spec(root / SPEC_FILENAME if (root / SPEC_FILENAME).exists() else None)
        report = validate_model(model_path, spec, root, caps=_validation_target(target, storage).policy())
    except Exception as err:  # noqa: BLE001 - every failure is shown as problem + fix
        fail(err, verbose)
        return
    for line in report.summary_lines():
        console.print(line, markup=False)
    raise typer.Exit(0 if report.ok else 1)


def _validation_target(version: Optional[str], storage):
    """What convert-model would judge by: --target, else the bucket's GPU workers, else the setting."""
    from flows.workers import Target, target_for_validation

    if version:
        return Target(version, f"--target {version}")
    return target_for_validation(storage)


# ---- convert -----------------------------------------------------------------------------------
def _check_options(precision: Optional[List[str]], strategy: Optional[str]) -> List[str]:
    from flows.params import SPEC_STRATEGIES as STRATEGIES
    from tasks.spec import Precision

    allowed = [p.value for p in Precision]
    wrong = [p for p in precision or [] if p.lower() not in allowed]
    if wrong:
        usage_error(f"--precision {', '.join(wrong)} is not a precision trtflow builds.",
                    f"Use one or more of: {', '.join(allowed)} (e.g. -p fp16 -p fp32).")
    if strategy and strategy not in STRATEGIES:
        usage_error(f"--strategy {strategy} is not a strategy.", f"Use one of: {', '.join(STRATEGIES)}.")
    return [p.lower() for p in precision or []]


def quiet_prefect(verbose: bool) -> None:
    """Before Prefect is imported: no telemetry, Prefect's own logs only with -v."""
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    if not verbose:
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "CRITICAL"
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL"] = "CRITICAL"
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL"] = "CRITICAL"
        os.environ["PREFECT_SERVER_LOGGING_LEVEL"] = "ERROR"
        os.environ["PREFECT_LOGGING_SERVER_LEVEL"] = "ERROR"


@app.command()
def convert(model: str = typer.Argument(..., help="<bucket>/models/<name>[.onnx], s3://bucket/models/<name>.onnx"),
            precision: Optional[List[str]] = typer.Option(None, "--precision", "-p",
                                                          help="fp32, fp16 or int8; repeat for a fallback order"),
            strategy: Optional[str] = typer.Option(None, help="fallback (stop at first pass), all, or best (fastest passing is latest)"),
            force: bool = typer.Option(False, help="rebuild even if this engine exists"),
            output_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
            verbose: bool = typer.Option(False, "-v", "--verbose", help="Prefect's logs and tracebacks")) -> None:
    """Convert one model now, in this process (against the local stack's server if `trtflow up` runs)."""
    precisions = _check_options(precision, strategy)
    from tasks.package import open_model

    try:
        open_model(model)  # a missing model or bucket is reported before any server starts
    except Exception as err:  # noqa: BLE001
        fail(err, verbose)
    quiet_prefect(verbose)
    stack = running_stack()
    if stack and not os.environ.get("PREFECT_API_URL"):
        os.environ["PREFECT_API_URL"] = stack.api_url  # the flow run shows up in the local UI
    from flows.params import ConvertRequest
    from flows.progress import run_with_progress

    try:
        request = ConvertRequest(model_uri=model, precisions=precisions, strategy=strategy or "spec", force=force)
        summary = run_with_progress(request, console=err_console, show=not output_json)
    except Exception as err:  # noqa: BLE001 - the flow already wrote the status record; show the reason
        fail(err, verbose)
        return
    if output_json:
        console.print_json(json.dumps(summary, default=str))
        return
    console.print(f"[bold green]{escape(summary['status'])}[/] {escape(summary['model'])} "
                  f"(model {summary['model_sha'][:12]})")
    for p, key in (summary.get("engines") or {}).items():
        console.print(f"  {escape(p)}: {escape(key)}")
    if summary.get("latest"):
        console.print(f"  latest -> {escape(summary['latest']['engine'])} ({escape(summary['latest']['precision'])})")


# ---- status ------------------------------------------------------------------------------------
def _status_rows(storage) -> List[dict]:
    from tasks.package import latest_key, list_packages
    from tasks.publish import list_statuses

    by_name: dict = {}
    for s in list_statuses(storage):
        if s.get("name") not in by_name or s.get("updated_at", "") > by_name[s["name"]].get("updated_at", ""):
            by_name[s.get("name")] = s
    rows = []
    for p in list_packages(storage):
        latest = storage.read_json(latest_key(p.name)) or {}
        st = _with_dead_owner_crashed(by_name.get(p.name) or {})
        err = st.get("error") or {}
        rows.append({"model": p.name, "files": len(p.files), "latest_engine": latest.get("engine"),
                     "precision": latest.get("precision"), "target": latest.get("default"),
                     "status": st.get("status"), "stage": st.get("stage"),
                     "reason": st.get("reason") or st.get("message") or err.get("message"), "fix": err.get("fix")})
    return rows


def _with_dead_owner_crashed(record: dict) -> dict:
    """A running/waiting record whose conversion process (on this host) is gone reads as crashed."""
    import socket

    from flows.supervise import Proc, is_alive
    from tasks.publish import OWNED_STATUSES

    owner = record.get("owner") or {}
    if record.get("status") not in OWNED_STATUSES or owner.get("host") != socket.gethostname() or \
            not owner.get("pid") or is_alive(Proc("convert", int(owner["pid"]), float(owner.get("create_time", 0)),
                                                  [], "")):
        return record
    return dict(record, status="crashed",
                message=f"its conversion process (pid {owner['pid']}) is gone without recording an end (killed?); "
                        "convert it again")


@app.command()
def status(bucket: Optional[str] = typer.Argument(None, help="bucket URI or folder (default: TRTFLOW_BUCKET, "
                                                              "else the local stack's)"),
           output_json: bool = typer.Option(False, "--json", help="print the rows as JSON"),
           verbose: bool = typer.Option(False, "-v", "--verbose", help="show tracebacks")) -> None:
    """What the bucket holds: models, their latest engines, how their last conversion ended. Exit 1 if one failed."""
    from tasks.storage import open_storage

    uri = bucket or default_bucket()
    local = uri[len("file://"):] if uri.startswith("file://") else (uri if "://" not in uri else None)
    if local is not None and not Path(local).is_dir():  # reading must never create the bucket folder
        usage_error(f"there is no bucket folder at {local}.",
                    "Start the local stack with `trtflow up` (or `make run`), or name a bucket: "
                    "trtflow status s3://BUCKET.")
    try:
        storage = open_storage(uri)
        rows = _status_rows(storage)
    except Exception as err:  # noqa: BLE001
        fail(err, verbose)
        return
    failed = [r for r in rows if r["status"] == "failed"]
    if output_json:
        console.print_json(json.dumps({"bucket": storage.uri, "models": rows}))
    else:
        _print_status_table(storage.uri, rows)
    raise typer.Exit(1 if failed else 0)


def _print_status_table(uri: str, rows: List[dict]) -> None:
    table = Table(title=f"trtflow models in {escape(uri)}")
    for col in ("model", "files", "latest engine", "precision", "target", "status", "why"):
        table.add_column(col)
    colour = {"failed": "red", "published": "green", "cached": "green", "waiting": "yellow", "running": "cyan",
              "crashed": "red", "cancelled": "yellow"}
    for r in rows:
        st = r["status"] or "—"
        # The failure's message and fix are printed in full below the table, where they do not wrap.
        why = {"failed": f"at {r['stage']} (below)", "waiting": r["reason"], "crashed": r["reason"],
               "cancelled": r["reason"]}.get(r["status"] or "", "")
        table.add_row(*(escape(str(v)) for v in (r["model"], r["files"], r["latest_engine"] or "—",
                                                  r["precision"] or "—", r["target"] or "—")),
                      f"[{colour.get(st, 'white')}]{escape(st)}[/]", escape(why or ""))
    console.print(table)
    for r in rows:
        if r["status"] == "waiting":
            console.print(f"[yellow]waiting[/] {escape(r['model'])}: {escape(str(r['reason']))}")
        if r["status"] == "failed":
            console.print(f"[red]failed[/] {escape(r['model'])} at {escape(str(r['stage']))}: {escape(str(r['reason']))}")
            if r["fix"]:
                console.print(f"   fix: {escape(r['fix'])}")


# ---- the local stack ---------------------------------------------------------------------------
def _gpus(value: Optional[str]) -> Optional[List[str]]:
    if value is None:
        return None
    return [g.strip() for g in value.split(",") if g.strip() and g.strip().lower() != "none"]


@app.command("up")
def up_cmd(
    state_dir: Optional[Path] = typer.Option(None, envvar="TRTFLOW_HOME", help="State folder (default ~/.trtflow)."),
    port: int = typer.Option(DEFAULT_PORT, help="Port of the Prefect server and UI."),
    host: str = typer.Option("127.0.0.1", help="Address the server listens on."),
    bucket: Optional[str] = typer.Option(None, envvar="TRTFLOW_BUCKET",
                                         help="s3://bucket or s3://bucket/prefix, or a folder (default <state>/bucket)."),
    api_url: Optional[str] = typer.Option(None, envvar="PREFECT_API_URL",
                                          help="Use this Prefect server instead of starting one."),
    gpus: Optional[str] = typer.Option(None, envvar="TRTFLOW_GPUS",
                                       help="GPU indices for GPU workers, e.g. 0,1 or none (default: detect)."),
    watch_interval: float = typer.Option(30.0, help="Seconds between bucket polls."),
    settle_seconds: float = typer.Option(30.0, help="A model must be unchanged this long before conversion."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="show tracebacks"),
) -> None:
    """Start Prefect, work pools, deployments, workers and a local bucket on this machine."""
    from flows.stack import StackOptions, up

    # Not quiet_prefect(): the workers inherit this environment, and their logs must stay complete.
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    started = time.monotonic()

    def step(text: str) -> None:  # progress while it starts: a new user sees what is happening
        err_console.print(f"[dim]{time.monotonic() - started:5.1f}s[/] {escape(text)}")

    try:
        info = up(StackOptions(state_dir or trtflow_home(), host, port, bucket, api_url, _gpus(gpus),
                               watch_interval, settle_seconds), progress=step)
    except Exception as err:  # noqa: BLE001
        fail(err, verbose)
        return
    typer.echo(f"Prefect UI:       {info.ui_url}")
    typer.echo(f"Bucket:           {info.bucket}")
    if info.drop_folder:
        typer.echo(f"Drop models into: {info.drop_folder}   (e.g. cp resnet50.onnx {info.drop_folder}/)")
    typer.echo(f"GPU workers:      {', '.join(info.gpus) or 'none'} - {info.gpu_note}")
    typer.echo(f"Logs:             {Path(info.state_dir) / 'logs'}")
    typer.echo("Stop with:        trtflow down")


@app.command("down")
def down_cmd(state_dir: Optional[Path] = typer.Option(None, envvar="TRTFLOW_HOME",
                                                      help="State folder (default ~/.trtflow).")) -> None:
    """Stop exactly the processes `trtflow up` started (from any folder)."""
    from flows.stack import down

    stopped = down(state_dir or trtflow_home())
    typer.echo("Stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command("deploy")
def deploy_cmd(
    bucket: str = typer.Option(..., envvar="TRTFLOW_BUCKET", help="s3://bucket or s3://bucket/prefix the deployments watch."),
    api_url: str = typer.Option(..., envvar="PREFECT_API_URL", help="The Prefect API, e.g. http://host:4200/api."),
    watch_interval: Optional[float] = typer.Option(None, help="Seconds between bucket polls (default 30)."),
    settle_seconds: Optional[float] = typer.Option(None, help="Settle time before conversion (default 30)."),
    nightly_cron: Optional[str] = typer.Option(None, help="Cron (UTC) of nightly-rebuild (default 0 2 * * *)."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="show tracebacks"),
) -> None:
    """Create the work pools and apply trtflow's deployments (prefect.yaml) to a running server."""
    quiet_prefect(verbose)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import PROJECT_ROOT, DeploySettings, apply_deployments, ensure_work_pools
    from flows.stack import wait_for_api

    state = trtflow_home()
    state.mkdir(parents=True, exist_ok=True)
    try:
        wait_for_api(api_url.rstrip("/"), 10)
        with temporary_settings({PREFECT_API_URL: api_url}):
            pools = ensure_work_pools()
            # Workers run the code in TRTFLOW_CODE_DIR (the image's copy, a checkout), else this install's.
            code_dir = Path(os.environ.get("TRTFLOW_CODE_DIR") or PROJECT_ROOT)
            log_path = apply_deployments(DeploySettings(bucket, code_dir, watch_interval, settle_seconds,
                                                        nightly_cron), api_url, state)
    except Exception as err:  # noqa: BLE001
        fail(err, verbose)
        return
    typer.echo(f"Work pools: {pools}. Deployments applied (log: {log_path}).")


@app.command("watch")
def watch_cmd(
    bucket: Optional[str] = typer.Option(None, envvar="TRTFLOW_BUCKET",
                                         help="s3://bucket or s3://bucket/prefix, or a folder (default: the stack's)."),
    settle_seconds: float = typer.Option(30.0, help="A model must be unchanged this long."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="show tracebacks"),
) -> None:
    """Poll the bucket once now (as the watch-bucket deployment does) and start due conversions."""
    stack = running_stack()
    api_url = os.environ.get("PREFECT_API_URL") or (stack.api_url if stack else None)
    if not api_url:
        usage_error("no Prefect server to start conversions on (PREFECT_API_URL is not set and no local stack runs).",
                    "Start one with `trtflow up` (or `make run`), or set PREFECT_API_URL=http://HOST:4200/api.")
    quiet_prefect(verbose)
    os.environ["PREFECT_API_URL"] = api_url
    from flows.watch import watch_bucket
    from tasks.package import MODELS_PREFIX

    uri = bucket or default_bucket()
    try:
        result = watch_bucket(uri, settle_seconds)
    except Exception as err:  # noqa: BLE001
        fail(err, verbose)
        return
    for s in result["started"]:
        typer.echo(f"started {s['name']}: flow run {s['flow_run_id']}")
    if result["waiting"]:
        typer.echo("settling: " + ", ".join(result["waiting"]))
    for name, keys in result["clashes"].items():
        typer.echo(f"not converted {name}: {', '.join(keys)} claim the same name (see `trtflow status`)")
    if not (result["started"] or result["waiting"] or result["clashes"]):  # silence reads as "did it run?"
        models = f"{uri.rstrip('/')}/{MODELS_PREFIX}"
        if result["packages"]:
            typer.echo(f"nothing to start: {result['packages']} model(s) under {models}, each converted or submitted")
        else:
            typer.echo(f"nothing to start: no models under {models}")


if __name__ == "__main__":
    app()
