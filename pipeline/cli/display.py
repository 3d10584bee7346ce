"""The CLI's view of a run in progress: a live rich display on a terminal, plain `progress`
lines on stderr otherwise (cron, CI, an orchestrator's log), with a start and a finish line.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pipeline.observe import Snapshot, format_duration, progress_line

__all__ = ["LineReporter", "LiveReporter"]


class LineReporter:
    """One line per `interval_s` on stderr: the same figures as run.log's `progress` events."""

    def __init__(self, console: Console, interval_s: float) -> None:
        self._console = console
        self._interval = interval_s
        self._last = 0.0

    def started(self, line: str) -> None:
        self._console.print(f"wanbatch: {line}", highlight=False, markup=False)

    def progress(self, snap: Snapshot) -> None:
        if snap.elapsed_s - self._last >= self._interval * 0.99:
            self._last = snap.elapsed_s
            self._console.print(f"wanbatch: {progress_line(snap)}", highlight=False, markup=False)

    def finished(self, snap: Snapshot, line: str) -> None:
        self._console.print(f"wanbatch: {line}", highlight=False, markup=False)


class LiveReporter:
    """A table that redraws in place: rows by state, images, cost, rate, ETA, each key, and
    each Ray worker of a distributed run."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._live: Live | None = None
        self._title = ""

    def started(self, line: str) -> None:
        self._title = line
        self._live = Live(Text(line), console=self._console, refresh_per_second=4, transient=True)
        self._live.start()

    def progress(self, snap: Snapshot) -> None:
        if self._live is not None:
            self._live.update(self._render(snap))

    def finished(self, snap: Snapshot, line: str) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        self._console.print(Text(line))

    def _render(self, snap: Snapshot) -> Any:
        b = snap.by_status
        figures = Table.grid(padding=(0, 2))
        for _ in range(4):
            figures.add_column()
        reading = "" if snap.ingest_complete else " (still reading)"
        figures.add_row("rows", f"{snap.rows:,}{reading}", "in flight", f"{snap.in_flight:,}")
        figures.add_row(
            "succeeded",
            f"{b.get('succeeded', 0):,}",
            "waiting",
            f"{snap.open_rows - snap.in_flight:,}",
        )
        figures.add_row("failed", f"{b.get('failed', 0):,}", "images", f"{snap.images:,}")
        figures.add_row("rejected", f"{b.get('rejected', 0):,}", "cost", f"${snap.cost_usd:,.2f}")
        figures.add_row(
            "rate", f"{snap.rate_per_min:,.1f} jobs/min", "ETA", format_duration(snap.eta_s)
        )
        keys = Table("key", "in flight", "state", box=None, padding=(0, 2))
        for key in snap.keys:
            style = (
                "yellow"
                if key.state.startswith("paused")
                else "red"
                if key.state == "retired"
                else ""
            )
            keys.add_row(key.name, str(key.in_flight), Text(key.state, style=style))
        if not snap.workers:
            return Group(Text(self._title, style="bold"), figures, keys)
        workers = Table(
            "worker",
            "host",
            "keys",
            "in flight",
            "done",
            "restarts",
            "state",
            box=None,
            padding=(0, 2),
        )
        for w in snap.workers:
            style = "yellow" if w.restarts else ""
            workers.add_row(
                w.name,
                w.host,
                str(w.keys),
                str(w.in_flight),
                f"{w.finished:,}",
                Text(str(w.restarts), style=style),
                w.state,
            )
        return Group(Text(self._title, style="bold"), figures, keys, workers)
