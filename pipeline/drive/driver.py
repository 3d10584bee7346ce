"""One slot of one key: take a job, create it, journal its id, poll it to its end, repeat.

A key has `max_concurrent` workers, so a key's slot is held from the create request until the
job's terminal status (or until a job that may exist on the provider is given time to end).
A job's end and its cost are the provider's word, read from a terminal poll: a callback, a
cancel's answer or a timeout only lead to a poll. A job cancelled at its timeout is polled for
`polling.cancel_grace_s` more; one still running then stays journaled `created` (its end and
cost unconfirmed) and the next run polls it.
The rules of invariant 5 live here: 400 final, 401 retires the key, 429 waits, 5xx and
transport errors back off, and a create whose answer was lost is counted as ambiguous.

A 429 pauses the key (see `limits`). While another key is serving and not paused, a job that
has not been created yet does not wait out the pause: it goes back to the dispatcher for that
key, and the slot rests until the pause ends. So a throttled key never holds jobs that the
others could run.
"""

from __future__ import annotations

from dataclasses import replace

import anyio
import structlog

from pipeline.core import (
    TRANSIENT_ERROR_CODES,
    JobOutcome,
    Status,
)
from pipeline.drive.creates import Creates
from pipeline.drive.lanes import KeyLane
from pipeline.drive.polls import Polls
from pipeline.drive.slot import Created, GiveWay, JobLog, KeyRefused, Left, NotSent, Withheld
from pipeline.drive.sweeps import Sweeps
from pipeline.journal import (
    Entry,
)

_log = structlog.get_logger("pipeline.drive.driver")
_MAX_RATE_LIMIT_WAITS = 50


__all__ = ["KeyDriver"]


class KeyDriver(Creates, Polls, Sweeps):
    """Drives the keys of one process: each slot takes a job, creates it, polls it to its
    end and books it, then takes the next."""

    async def run_lane(self, lane: KeyLane, slots: int) -> None:
        """The key's slots until each has ended, and its listing's reads meanwhile."""
        async with anyio.create_task_group() as lane_tasks:
            lane_tasks.start_soon(self.sweep, lane)
            async with anyio.create_task_group() as slot_tasks:
                for _ in range(slots):
                    slot_tasks.start_soon(self.run_slot, lane)
            lane_tasks.cancel_scope.cancel()

    async def run_slot(self, lane: KeyLane) -> None:
        """Serve jobs on this key until there are none, or the key is retired."""
        lane.serving += 1
        try:
            while not lane.retired:
                entry = await self.dispatcher.next_job(lane.key.name)
                if entry is None:
                    return
                try:
                    await self.run_job(lane, entry)
                except KeyRefused as refused:
                    self.dispatcher.give_back(refused.entry)
                    lane.retired = True
                    self.dispatcher.retire(lane.key.name)
                    return
                except GiveWay as way:
                    self.dispatcher.give_back(way.entry)
                    await self.dispatcher.rest(way.wait)
        finally:
            lane.serving -= 1

    async def run_job(self, lane: KeyLane, entry: Entry) -> None:
        log = JobLog(entry, lane)
        attempts = entry.attempts
        outcome: JobOutcome | None = None
        adopted: Created | None = None
        if entry.status is Status.CREATED and entry.prediction_id:
            if entry.key_name != lane.key.name:
                # its key is gone: only that key can see the job end; it stays for a later run
                log.bound().warning(
                    "orphaned", prediction_id=entry.prediction_id, owner=entry.key_name
                )
                return
            self.stats.reattached += 1
            lane.cap.started()  # it runs at the provider: it counts against the cap
            log.bound().info("reattach", prediction_id=entry.prediction_id)
            polled = await self._poll(lane, entry, entry.prediction_id, self.clock.now(), attempts)
            if isinstance(polled, Left):
                return
            outcome = polled
        elif entry.status is Status.CREATING:
            # a crash came between sending a create and journaling its answer
            await self._ambiguous(entry, log)
            resumed = await self._resumed_lost(lane, entry, log)
            if isinstance(resumed, Withheld):
                return
            adopted = resumed
            if adopted is None and self.settings.ambiguous_creates == "fail":
                await self._finish(entry, self._ambiguous_outcome())
                return
        while True:
            if outcome is None:
                # the job a crash left unanswered, found at the provider; else a create
                created = adopted or await self._create(lane, entry, attempts, log)
                adopted = None
                if isinstance(created, Withheld):
                    return
                if isinstance(created, NotSent):
                    self.dispatcher.give_back(entry)
                    return
                if isinstance(created, JobOutcome):
                    await self._finish(entry, created)
                    return
                attempts = created.attempts
                hooked = self.callbacks is not None  # a callback or the listing may wake it
                polled = await self._poll(
                    lane,
                    entry,
                    created.prediction_id,
                    created.sent,
                    attempts,
                    hooked=hooked,
                    journaled=created.journaled,
                )
                if isinstance(polled, Left):
                    return
                outcome = polled
            if not (
                outcome.error_code in TRANSIENT_ERROR_CODES
                and attempts < self.settings.policy.max_attempts
            ):
                await self._finish(entry, outcome)
                return
            # the provider says to try again; a failed job costs nothing
            self.stats.job_retries += 1
            log.bound().info(
                "job_retry",
                prediction_id=outcome.prediction_id,
                error_code=outcome.error_code,
                attempt=attempts,
            )
            entry = replace(entry, status=Status.CREATED, attempts=attempts)
            outcome = None
