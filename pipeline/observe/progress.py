"""How far a run has got, as one typed snapshot: rows by state, images, cost, rate, ETA, and
what each key is doing. The runner takes one every tick (for the terminal display, the
`progress` lines and the metrics) and one at the end; it reads the journal's counts, the
run's counters and the key lanes, and sends nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from pipeline.core import OPEN, RunStats
from pipeline.journal import Journal

__all__ = [
    "KeyState",
    "RunView",
    "Snapshot",
    "WorkerState",
    "format_duration",
    "progress_line",
    "take_snapshot",
]

_OPEN = tuple(s.value for s in OPEN)


@dataclass(frozen=True, slots=True)
class KeyState:
    name: str
    in_flight: int
    state: str  # working, idle, paused (429), retired


@dataclass(frozen=True, slots=True)
class WorkerState:
    """One Ray worker of a distributed run (`--workers`)."""

    name: str  # worker-1, ...
    host: str
    keys: int
    in_flight: int
    finished: int  # jobs it saw end, over all its lives
    restarts: int  # times it was replaced after dying
    state: str  # starting, working, done, replacing


class RunView(Protocol):
    """What drives the keys, as the progress sees it: this process's lanes, or the workers
    of a distributed run."""

    def keys(self) -> tuple[KeyState, ...]: ...

    def workers(self) -> tuple[WorkerState, ...]: ...


@dataclass(frozen=True, slots=True)
class Snapshot:
    elapsed_s: float
    rows: int  # journaled so far (the whole manifest once `ingest_complete`)
    ingest_complete: bool
    by_status: dict[str, int]
    in_flight: int
    images: int
    cost_usd: float
    finished_this_run: int
    keys: tuple[KeyState, ...]
    workers: tuple[WorkerState, ...] = ()

    @property
    def rate_per_min(self) -> float:
        return self.finished_this_run / self.elapsed_s * 60 if self.elapsed_s > 0 else 0.0

    @property
    def open_rows(self) -> int:
        return sum(self.by_status.get(s, 0) for s in _OPEN)

    @property
    def eta_s(self) -> float | None:
        """Seconds left at this run's rate, for the rows journaled so far (None: no rate yet)."""
        rate = self.rate_per_min / 60
        return self.open_rows / rate if rate > 0 else None


def take_snapshot(
    journal: Journal,
    stats: RunStats,
    keys: tuple[KeyState, ...],
    workers: tuple[WorkerState, ...],
    started: float,
) -> Snapshot:
    """The run as it stands, with each key's and each worker's state as given."""
    totals = journal.reports.totals()
    return Snapshot(
        elapsed_s=time.monotonic() - started,
        rows=int(totals["rows"]),
        ingest_complete=journal.get_meta("ingest_complete") == "1",
        by_status=journal.reports.counts(),
        in_flight=sum(k.in_flight for k in keys),
        images=int(totals["images"]),
        cost_usd=float(totals["cost_usd"]),
        finished_this_run=stats.finished,
        keys=keys,
        workers=workers,
    )


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(snap: Snapshot) -> str:
    """The snapshot as one plain line (stderr when it is not a terminal, and run.log)."""
    b = snap.by_status
    rows = f"{snap.rows:,}" + ("" if snap.ingest_complete else "+ (still reading)")
    keys = "; ".join(f"{k.name} {k.in_flight} in flight, {k.state}" for k in snap.keys)
    workers = "; ".join(
        f"{w.name} on {w.host} {w.keys} keys {w.in_flight} in flight {w.finished:,} done"
        f" {w.restarts} restarts, {w.state}"
        for w in snap.workers
    )
    return (
        f"progress rows={rows} succeeded={b.get('succeeded', 0):,} "
        f"failed={b.get('failed', 0):,} rejected={b.get('rejected', 0):,} "
        f"in_flight={snap.in_flight:,} waiting={snap.open_rows - snap.in_flight:,} "
        f"images={snap.images:,} cost=${snap.cost_usd:,.2f} rate={snap.rate_per_min:,.1f}/min "
        f"eta={format_duration(snap.eta_s)} elapsed={format_duration(snap.elapsed_s)}"
        + (f" keys: {keys}" if keys else "")
        + (f" workers: {workers}" if workers else "")
    )
