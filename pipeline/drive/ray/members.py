"""The Ray workers as the driver knows them: each one's handle, keys, figures and the jobs it
holds; and the orders (limits, cancels) the driver sends them all."""

from __future__ import annotations

import asyncio
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog

from pipeline.core import ApiKey, RunConfig, WanbatchError, save_thumb
from pipeline.drive.ray.remote import Figures
from pipeline.journal import Entry
from pipeline.observe import KeyState, WorkerState

_log = structlog.get_logger("pipeline.drive.ray.cluster")


__all__ = ["Member", "Roster", "WorkerLost"]

_FORWARDED = ("AWS_", "GOOGLE_", "AZURE_", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "SSL_CERT_")


class WorkerLost(WanbatchError):
    """A worker died more often than it may be replaced, or failed outright."""


def forwarded_env() -> dict[str, str]:
    """The driver's settings that workers need, so a worker on any node reaches the same
    store, provider and proxy (sent to the workers through Ray, never logged)."""
    return {
        name: value for name, value in os.environ.items() if name.upper().startswith(_FORWARDED)
    }


def absolute(config: RunConfig) -> RunConfig:
    """The config with the run folder and a folder store made absolute: a worker's working
    folder is not the driver's."""
    store = config.assets.store
    if "://" not in store:
        store = str(Path(store).absolute())
    return config.model_copy(
        update={
            "output": config.output.model_copy(update={"dir": config.output.dir.absolute()}),
            "assets": config.assets.model_copy(update={"store": store}),
        }
    )


async def save_thumbs(folder: Path, thumbs: list[tuple[str, bytes]]) -> None:
    def save() -> None:
        for name, data in thumbs:
            try:
                save_thumb(folder, name, data)
            except OSError as exc:  # the report shows no thumbnail; the image is stored
                _log.warning("thumbnail_not_written", name=name, error=str(exc))
                return

    await anyio.to_thread.run_sync(save)


def relog(worker: str, method: str, event: dict[str, Any]) -> None:
    text = str(event.pop("event", ""))
    event.pop("timestamp", None)
    event.pop("level", None)
    log = _log.bind(worker=worker)
    level = method if method in ("debug", "info", "warning", "error", "critical") else "error"
    getattr(log, level)(text, **event)


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


@dataclass
class Member:
    """One worker's place in the run, over its lives (a replacement takes the same place)."""

    index: int
    keys: list[ApiKey]
    actor: Any = None
    handed: dict[int, Entry] = field(default_factory=dict)  # jobs it holds, by row
    restarts: int = 0
    state: str = "starting"
    figures: Figures | None = None
    counted: dict[str, int] = field(default_factory=dict)  # counters merged, this life
    finished: int = 0  # jobs it saw end, over all its lives
    cpu_before: float = 0.0  # CPU seconds of its earlier lives
    peak_rss_mb: float = 0.0  # the most any of its lives held
    stored: tuple[int, int, int] = (0, 0, 0)  # downloads merged, this life
    acked: int = 0
    last_post: asyncio.Event | None = None  # the last of its updates given to the journal
    jobs: list[tuple[str, Entry | None]] = field(default_factory=list)
    reserved: list[tuple[int, bool]] = field(default_factory=list)  # answers to send
    wake: anyio.Event = field(default_factory=anyio.Event)
    sent: tuple[object, ...] = ()  # the last orders' acked batch and flags: resent on change

    @property
    def name(self) -> str:
        return f"worker-{self.index}"


class Roster:
    """The driver's view of its Ray workers: who they are, what they hold and report, and the
    stops ordered to them all (a time limit, an abandon, a cancel of the jobs in flight)."""

    def __init__(self, key_sets: list[list[ApiKey]]) -> None:
        self.members = [Member(i + 1, keys) for i, keys in enumerate(key_sets)]
        _log.info(
            "workers_planned",
            workers={m.name: [k.name for k in m.keys] for m in self.members},
        )
        self._abandon = False
        self._cancel = False
        self._deadline = math.inf
        self._returns = anyio.Event()

    def keys(self) -> tuple[KeyState, ...]:
        states: list[KeyState] = []
        for m in self.members:
            if m.figures is not None and m.state == "working":
                states += m.figures.keys
            else:
                states += [KeyState(k.name, 0, m.state) for k in m.keys]
        return tuple(states)

    def workers(self) -> tuple[WorkerState, ...]:
        return tuple(
            WorkerState(
                m.name,
                m.figures.host if m.figures is not None else "",
                len(m.keys),
                sum(k.in_flight for k in m.figures.keys) if m.figures is not None else 0,
                m.finished,
                m.restarts,
                m.state,
            )
            for m in self.members
        )

    def figures(self) -> list[dict[str, Any]]:
        """Per worker, for summary.json."""
        return [
            {
                "worker": m.name,
                "keys": [k.name for k in m.keys],
                "host": m.figures.host if m.figures is not None else None,
                "pid": m.figures.pid if m.figures is not None else None,
                "restarts": m.restarts,
                "jobs_finished": m.finished,
                "cpu_s": round(m.cpu_before + (m.figures.cpu_s if m.figures else 0.0), 3),
                "peak_rss_mb": round(m.peak_rss_mb, 1),
            }
            for m in self.members
        ]

    def limit(self, seconds: float) -> None:
        """Jobs in flight get `seconds` more; then the workers stop and cancel them."""
        self._deadline = min(self._deadline, time.monotonic() + seconds)
        self._wake_all()

    def cancel(self) -> None:
        """Stop now: the workers cancel their jobs in flight at the provider."""
        self._abandon = True
        self._wake_all()

    async def cancel_in_flight(self) -> None:
        """budget.cancel_in_flight: every worker cancels its jobs in flight."""
        self._cancel = True
        self._wake_all()

    def _wake_all(self) -> None:
        for m in self.members:
            m.wake.set()

    def stops(self) -> tuple[bool, bool]:
        """Whether the workers abandon their jobs (the time limit passed, or stopped now), and
        whether they cancel their jobs in flight."""
        if time.monotonic() >= self._deadline:
            self._abandon = True
        return self._abandon, self._cancel

    def held_elsewhere(self, member: Member) -> bool:
        return any(other is not member and other.handed for other in self.members)

    def returned(self) -> None:
        """A job came back to the dispatcher, or a worker ended: waiting asks look again."""
        self._returns.set()
        self._returns = anyio.Event()

    async def returns(self) -> None:
        """Until a job comes back, or a worker ends."""
        await self._returns.wait()

    def open_elsewhere(self, member: Member) -> bool:
        """Whether a key of another worker was serving and not paused at its last report."""
        return any(
            key.state == "working"
            for other in self.members
            if other is not member and other.state == "working" and other.figures is not None
            for key in other.figures.keys
        )
