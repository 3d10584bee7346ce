"""Watching a run: snapshots of its progress, for a person and for a scraper.

progress.py  a run's snapshot: rows by state, images, cost, rate, ETA, keys and workers
observer.py  the snapshots every tick: the display, `progress` lines, metrics.prom
metrics.py   the Prometheus registry (the counters, the gauges, the histograms)
"""

from __future__ import annotations

from pipeline.observe.observer import Observer, Reporter
from pipeline.observe.progress import (
    KeyState,
    RunView,
    Snapshot,
    WorkerState,
    format_duration,
    progress_line,
)

__all__ = [
    "KeyState",
    "Observer",
    "Reporter",
    "RunView",
    "Snapshot",
    "WorkerState",
    "format_duration",
    "progress_line",
]
