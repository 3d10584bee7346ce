"""observe."""

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
