"""Watching a run: progress for a person (through a `Reporter` the caller gives, e.g. the CLI's
live display or plain lines), `progress` events in run.log, and metrics.prom, all from the
same snapshots, taken every tick until the run ends.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import anyio
import structlog

from pipeline.core import ConfigError, MetricsSection, ProgressSection, RunStats
from pipeline.journal import Journal
from pipeline.observe.metrics import RunMetrics
from pipeline.observe.progress import (
    KeyState,
    RunView,
    Snapshot,
    WorkerState,
    progress_line,
    take_snapshot,
)

__all__ = ["Observer", "Reporter"]

_log = structlog.get_logger("pipeline.observe.progress")


class Reporter(Protocol):
    """Where a person sees the run: called from the run's event loop, so quick."""

    def started(self, line: str) -> None: ...

    def progress(self, snap: Snapshot) -> None: ...

    def finished(self, snap: Snapshot, line: str) -> None: ...


@dataclass
class Observer:
    metrics_section: MetricsSection
    progress_section: ProgressSection
    run_dir: Path
    started: float  # time.monotonic() at the run's start
    stats: RunStats
    reporter: Reporter | None = None
    tick_s: float | None = None  # how often `reporter.progress` is called (a terminal: 1 s)
    metrics: RunMetrics = field(init=False)
    view: RunView | None = None  # the run's keys (and workers), once they are driven

    def __post_init__(self) -> None:
        self.metrics = RunMetrics(self.stats)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.prom"

    @contextmanager
    def serving(self) -> Any:
        """metrics.port: the metrics served for scraping while the run goes."""
        m = self.metrics_section
        if m.port is None:
            yield
            return
        try:
            server = self.metrics.serve(m.listen_host, m.port)
        except OSError as exc:
            raise ConfigError(
                f"metrics.port {m.port} on {m.listen_host} cannot be used: {exc.strerror}"
            ) from None
        try:
            yield
        finally:
            server.shutdown()
            server.server_close()

    def start(self, line: str) -> None:
        _log.info("run_started", line=line)
        if self.reporter is not None:
            self.reporter.started(line)

    async def watch(self, journal: Journal, view: RunView) -> None:
        """Until cancelled: a snapshot every tick, for the reporter, run.log and metrics;
        `view`: the keys (and workers) being driven, kept for the last snapshot too."""
        self.view = view
        p, m = self.progress_section.interval_s, self.metrics_section.interval_s
        tick = min(self.tick_s or math.inf, p, m)
        next_line = next_metrics = time.monotonic()
        while True:
            await anyio.sleep(tick)
            snap = await self.snapshot(journal)
            now = time.monotonic()
            if self.reporter is not None:
                self.reporter.progress(snap)
            if now >= next_line + p - tick / 2:
                next_line = now
                _log.info("progress", line=progress_line(snap))
            if now >= next_metrics + m - tick / 2:
                next_metrics = now
                await self._write_metrics()

    async def _write_metrics(self) -> None:
        """metrics.prom; a failure (a full disk) is logged, never the run's end."""
        try:
            await anyio.to_thread.run_sync(self.metrics.write, self.metrics_path)
        except OSError as exc:
            _log.warning("metrics_not_written", error=str(exc))

    async def snapshot(self, journal: Journal, final: bool = False) -> Snapshot:
        """The run now; `final`: at its end, when no job is in flight any more."""
        keys: tuple[KeyState, ...] = ()
        workers: tuple[WorkerState, ...] = ()
        if self.view is not None:
            keys, workers = self.view.keys(), self.view.workers()
        if final:
            keys = tuple(replace(k, in_flight=0) for k in keys)
            workers = tuple(replace(w, in_flight=0) for w in workers)
        snap = await anyio.to_thread.run_sync(
            take_snapshot, journal, self.stats, keys, workers, self.started
        )
        self.metrics.update(snap)
        return snap

    async def finish(self, journal: Journal, line: str) -> Snapshot:
        """The last snapshot: metrics.prom written, the finish line logged and reported."""
        snap = await self.snapshot(journal, final=True)
        await self._write_metrics()
        _log.info("run_finished", line=line, progress=progress_line(snap))
        if self.reporter is not None:
            self.reporter.finished(snap, line)
        return snap
