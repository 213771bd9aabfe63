"""The ``trtflow`` command: validate, convert, status (and up/down, from flows/stack.py)."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from tasks.errors import TrtflowError

app = typer.Typer(help="trtflow: ONNX models in a bucket -> validated, calibrated, accuracy-checked TensorRT engines.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()
err_console = Console(stderr=True)


def default_bucket() -> str:
    """TRTFLOW_BUCKET, else the embedded local bucket that `trtflow up` creates."""
    return os.environ.get("TRTFLOW_BUCKET") or str(Path(os.environ.get("TRTFLOW_HOME", ".trtflow")) / "bucket")


def _fail(err: BaseException) -> None:
    if isinstance(err, TrtflowError):
        err_console.print(f"[bold red]error:[/] {err.message}")
        if err.fix:
            err_console.print(f"[bold yellow]fix:[/] {err.fix}")
    else:
        err_console.print(f"[bold red]error:[/] {type(err).__name__}: {err}")
    raise typer.Exit(1)


@app.command()
def validate(model: str = typer.Argument(..., help="an .onnx file, <bucket>/models/<name>[.onnx] or s3://…"),
             target: str = typer.Option("8.6", help="TensorRT version whose parser limits apply")) -> None:
    """Check a model (and its trtflow.yaml) without converting it."""
    from tasks.package import fetch_package, open_model
    from tasks.spec import SPEC_FILENAME, load_spec
    from tasks.validate import validate_model

    try:
        path = Path(model)
        if path.is_file() and path.suffix == ".onnx" and "models" not in path.resolve().parts:
            model_path, root = path, path.parent  # a loose file: its folder is the package
        else:
            storage, pkg = open_model(model)
            local = fetch_package(storage, pkg, Path(tempfile.mkdtemp(prefix="trtflow-validate-")))
            model_path, root = local.model_path, local.root
        spec = load_spec(root / SPEC_FILENAME if (root / SPEC_FILENAME).exists() else None)
        report = validate_model(model_path, spec, root, target=target)
    except TrtflowError as err:
        _fail(err)
        return
    for line in report.summary_lines():
        console.print(line, markup=False, highlight=False)
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def convert(model: str = typer.Argument(..., help="<bucket>/models/<name>[.onnx], s3://bucket/models/<name>.onnx"),
            precision: Optional[List[str]] = typer.Option(None, "--precision", "-p",
                                                          help="fp32, fp16 or int8; repeat for a fallback order"),
            strategy: Optional[str] = typer.Option(None, help="fallback (stop at first pass) or all"),
            force: bool = typer.Option(False, help="rebuild even if this engine exists"),
            output_json: bool = typer.Option(False, "--json", help="print the summary as JSON")) -> None:
    """Run the convert-model flow on one model now (in this process, no server needed)."""
    from flows.convert import convert_model
    from flows.params import ConvertRequest

    try:
        request = ConvertRequest(model_uri=model, precisions=precision or None, strategy=strategy, force=force)
        summary = convert_model(request)
    except Exception as err:  # the flow already wrote the status record; show the reason
        _fail(err)
        return
    if output_json:
        console.print_json(json.dumps(summary, default=str))
        return
    console.print(f"[bold green]{summary['status']}[/] {summary['model']} (model {summary['model_sha'][:12]})")
    for p, key in (summary.get("engines") or {}).items():
        console.print(f"  {p}: {key}")
    if summary.get("latest"):
        console.print(f"  latest -> {summary['latest']['engine']} ({summary['latest']['precision']})")


@app.command()
def status(bucket: Optional[str] = typer.Argument(None, help="bucket URI or folder (default: TRTFLOW_BUCKET)")) -> None:
    """What the bucket holds: models, their latest engines, failures."""
    from tasks.package import latest_key, list_packages
    from tasks.publish import list_statuses
    from tasks.storage import open_storage

    try:
        storage = open_storage(bucket or default_bucket())
        packages = list_packages(storage)
        statuses = list_statuses(storage)
    except TrtflowError as err:
        _fail(err)
        return
    latest_by_name = {p.name: storage.read_json(latest_key(p.name)) for p in packages}
    table = Table(title=f"trtflow models in {storage.uri}")
    for col in ("model", "files", "latest engine", "precision", "target", "last status"):
        table.add_column(col)
    by_name = {}
    for s in statuses:
        if s.get("name") not in by_name or s.get("updated_at", "") > by_name[s["name"]].get("updated_at", ""):
            by_name[s.get("name")] = s
    for p in packages:
        latest = latest_by_name.get(p.name) or {}
        st = by_name.get(p.name) or {}
        table.add_row(p.name, str(len(p.files)), latest.get("engine", "—"), latest.get("precision", "—"),
                      latest.get("default", "—"), st.get("status", "—"))
    console.print(table)
    failures = [s for s in by_name.values() if s.get("status") == "failed"]
    for s in failures:
        e = s.get("error") or {}
        console.print(f"[red]failed[/] {s['name']} at {s.get('stage')}: {e.get('message')}", highlight=False)
        if e.get("fix"):
            console.print(f"   fix: {e['fix']}", highlight=False)


try:  # `trtflow up/down` live with the stack code
    from flows import stack as _stack

    _stack.register(app)
except ImportError:  # pragma: no cover - only while flows/stack.py is absent
    pass


if __name__ == "__main__":
    app()
