"""The jobs a process has in flight: each created job from its create's answer until a poll sees
it end (or it is left, unconfirmed, for the next run), with the cancels asked for and whether
the run was stopped for good. One registry, shared by the driver's parts: the creator and the
poller add and remove jobs, the sweeps and the lost-create lookups read it, the planner reads
their ages."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from pipeline.core import Clock
from pipeline.drive.lanes import KeyLane
from pipeline.journal import Entry

__all__ = ["Flying", "InFlight"]


class Flying(NamedTuple):
    """A job being polled: its key, its journal entry, when its create was sent (on the
    driver's monotonic clock) and the attempt it is."""

    lane: KeyLane
    entry: Entry
    created: float
    attempts: int


class InFlight:
    """Prediction id -> the job in flight; the cancels asked for, and their answers."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._jobs: dict[str, Flying] = {}
        self._asked: dict[str, bool] = {}  # prediction id -> whether its cancel was answered yes
        self.cancel_all = False  # stopped for good: every job in flight is cancelled

    def fly(self, prediction_id: str, job: Flying) -> None:
        self._jobs[prediction_id] = job

    def land(self, prediction_id: str) -> Flying | None:
        """The job is no longer polled here: ended, left, or its key refused."""
        return self._jobs.pop(prediction_id, None)

    def get(self, prediction_id: str) -> Flying | None:
        return self._jobs.get(prediction_id)

    def __contains__(self, prediction_id: object) -> bool:
        return prediction_id in self._jobs

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[str]:
        return iter(self._jobs)

    def items(self) -> list[tuple[str, Flying]]:
        return list(self._jobs.items())

    def stop_all(self) -> None:
        """The run is stopped for good: every job in flight, and every job to come, is
        cancelled."""
        self.cancel_all = True

    def asked(self, prediction_id: str, accepted: bool) -> None:
        """A cancel was answered for a job not seen to end while it was out."""
        if prediction_id in self._jobs:
            self._asked[prediction_id] = accepted

    def answer(self, prediction_id: str) -> bool | None:
        """Whether the job's cancel was answered yes (None: no cancel was asked); said once."""
        return self._asked.pop(prediction_id, None)

    def ages(self) -> list[float]:
        """Seconds since the create of each job in flight: lower bounds on their latencies."""
        now = self._clock.now()
        return [now - job.created for job in self._jobs.values()]

    def lanes(self) -> list[KeyLane]:
        """The lane of each job in flight, for the progress view."""
        return [job.lane for job in self._jobs.values()]
