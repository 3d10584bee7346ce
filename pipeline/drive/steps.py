"""What the key driver's parts hand each other between a job's steps: the answers a create or
a poll can end in, what one job's polls have seen, and the job's logger."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from pipeline.core import ApiError, JobOutcome, Status
from pipeline.drive.lanes import KeyLane
from pipeline.journal import Entry
from pipeline.provider import Prediction, Waiter

_log = structlog.get_logger("pipeline.drive.driver")

__all__ = [
    "Created",
    "Deferred",
    "Ended",
    "GiveWay",
    "JobLog",
    "KeyRefused",
    "Left",
    "NotSent",
    "Track",
    "Withheld",
    "failed_outcome",
]


class JobLog:
    """A job's logger, bound on first use: binding one for every job costs CPU on every job,
    and most jobs log nothing."""

    __slots__ = ("_bound", "_entry", "_key")

    def __init__(self, entry: Entry, lane: KeyLane) -> None:
        self._entry = entry
        self._key = lane.key.name
        self._bound: structlog.typing.FilteringBoundLogger | None = None

    def bound(self) -> structlog.typing.FilteringBoundLogger:
        if self._bound is None:
            e = self._entry
            self._bound = _log.bind(job_id=e.job_id, row=e.row_number, key=self._key)
        return self._bound


class KeyRefused(Exception):
    """The key was refused; `entry` is the job as the journal now holds it."""

    def __init__(self, entry: Entry) -> None:
        super().__init__(entry.job_id)
        self.entry = entry


class GiveWay(Exception):
    """The key is paused and another can take the job: `entry` is the job as the journal now
    holds it, `wait` the pause left."""

    def __init__(self, entry: Entry, wait: float) -> None:
        super().__init__(entry.job_id)
        self.entry = entry
        self.wait = wait


@dataclass(frozen=True, slots=True)
class Created:
    """A create the provider answered: the job's id, the attempt, when the create was sent (on
    the driver's clock: the provider's latency counts from about then), and the event set once
    the id is durable in the journal (it is waited for before the job's first poll)."""

    prediction_id: str
    attempts: int
    sent: float
    journaled: asyncio.Event


@dataclass(frozen=True, slots=True)
class NotSent:
    """The run was stopped before the create went out: the row is kept for the resume."""


@dataclass(frozen=True, slots=True)
class Withheld:
    """A create again (its answer was lost) would pass the budget: the row waits, pending, for
    a later run, and its reservation stays spent (the lost create may be billed)."""


@dataclass(frozen=True, slots=True)
class Ended:
    """A poll saw the job end (success, error or cancelled)."""

    answer: Prediction


@dataclass(frozen=True, slots=True)
class Left:
    """A job left running at the provider with its end unconfirmed (cancelled, and still
    running past the grace): it stays journaled `created`, and the next run polls it."""


@dataclass(frozen=True, slots=True)
class Deferred:
    """Poll again after `wait` seconds (an error's backoff), or on the schedule when None
    (the job still runs)."""

    wait: float | None = None


def failed_outcome(error: ApiError, message: str) -> JobOutcome:
    return JobOutcome(
        Status.FAILED, error_type=error.error_type, error_message=message, finished_at=time.time()
    )


class Track:
    """What one job's polls have seen: errors in a row, and its callback's hint (webhook mode):
    a hint no poll has confirmed yet, or one a poll contradicted (the job is then polled on
    the schedule)."""

    __slots__ = ("contradicted", "failures", "hinted", "waiter")

    def __init__(self, waiter: Waiter | None) -> None:
        self.waiter = waiter
        self.failures = 0
        self.hinted = False
        self.contradicted = False

    def failed(self) -> int:
        """A poll failed: the failures in a row now."""
        self.failures += 1
        return self.failures

    def answered(self) -> None:
        """A poll was answered: the failures in a row end."""
        self.failures = 0

    def woken(self) -> None:
        if self.waiter is not None:
            self.hinted = self.hinted or self.waiter.hinted
            self.waiter.rearm()

    def running(self) -> None:
        """A poll said the job still runs: a hint before it was wrong."""
        if self.hinted and self.waiter is not None:
            self.contradicted, self.hinted = True, False
