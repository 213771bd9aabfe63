"""A live per-stage view of one in-process conversion (``trtflow convert``).

Prefect's run loggers already say when each task starts, what it logs (the GPU build's heartbeat
lines included) and how it finished; a logging handler on the ``prefect`` logger turns those
records into rows of a rich table, so nothing in the flow has to report progress twice.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table


@dataclass
class StageRow:
    name: str
    started: float
    finished: Optional[float] = None
    state: str = "running"
    last_line: str = ""


@dataclass
class ConversionProgress:
    """What the view shows: one row per task run, in the order they started."""

    started: float = field(default_factory=time.monotonic)
    flow_started: Optional[float] = None
    rows: Dict[str, StageRow] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, record: logging.LogRecord) -> None:
        name = getattr(record, "task_run_name", None)
        if not name:
            if record.getMessage().startswith("Beginning flow run"):
                self.flow_started = time.monotonic()  # the server is up; stage times count from here
            return
        message = (record.getMessage().strip().splitlines() or [""])[0]
        with self.lock:
            if name not in self.rows:
                # Prefect 3 logs nothing when a task starts; the flow's stages run one after another,
                # so a stage started when the one before it finished.
                begun = max([r.finished or 0.0 for r in self.rows.values()] + [self.flow_started or self.started])
                self.rows[name] = StageRow(name, begun)
            row = self.rows[name]
            if message.startswith("Finished in state"):
                row.finished = time.monotonic()
                row.state = message[len("Finished in state "):].split("(")[0].strip() or "done"
            else:
                row.last_line = message[:100]

    def table(self) -> Table:
        now = time.monotonic()
        t = Table(title=f"converting… {now - self.started:.0f}s", title_justify="left", expand=False)
        for col in ("stage", "state", "elapsed"):
            t.add_column(col, no_wrap=True)
        t.add_column("last message", no_wrap=True, overflow="ellipsis", max_width=36)
        with self.lock:
            rows: List[StageRow] = list(self.rows.values())
        for r in rows:
            colour = {"Completed": "green", "Failed": "red", "running": "cyan"}.get(r.state, "yellow")
            elapsed = (r.finished or now) - r.started
            t.add_row(escape(r.name.rsplit("-", 1)[0]), f"[{colour}]{escape(r.state)}[/]", f"{elapsed:.1f}s",
                      escape(r.last_line))
        return t


class _ProgressHandler(logging.Handler):
    def __init__(self, progress: ConversionProgress):
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.note(record)
        except Exception:  # noqa: BLE001 - the view must never break a conversion
            pass


def run_with_progress(request, console: Console, show: bool = True) -> dict:
    """Run convert_model(request) in this process, showing its stages live on ``console``."""
    from flows.convert import convert_model

    progress = ConversionProgress()
    handler = _ProgressHandler(progress)
    logger = logging.getLogger("prefect")
    logger.addHandler(handler)
    try:
        if not show:
            return convert_model(request)
        try:
            with Live(get_renderable=progress.table, console=console, refresh_per_second=4, transient=False):
                return convert_model(request)
        finally:
            console.print()  # the last frame ends without a newline
    finally:
        logger.removeHandler(handler)
