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

from collections.abc import Callable, Sequence
from dataclasses import replace

import anyio

from pipeline.core import TRANSIENT_ERROR_CODES, Clock, JobOutcome, RunStats, Status, SystemClock
from pipeline.drive.creates import Creator
from pipeline.drive.dispatcher import JobSource
from pipeline.drive.flight import InFlight
from pipeline.drive.lanes import KeyLane
from pipeline.drive.listings import Listings
from pipeline.drive.outcomes import Outcomes
from pipeline.drive.polls import Poller
from pipeline.drive.settings import DriverSettings, Webhook
from pipeline.drive.steps import Created, GiveWay, JobLog, KeyRefused, Left, NotSent, Withheld
from pipeline.drive.sweeps import Sweeper
from pipeline.intake import Uploads
from pipeline.journal import Commits, Entry
from pipeline.outputs import Downloader
from pipeline.provider import Callbacks, EachlabsClient, PollPlanner

__all__ = ["KeyDriver"]


class KeyDriver:
    """Drives the keys of one process: each slot takes a job, has the creator create it, the
    poller poll it to its end and its outcome be journaled, then takes the next. Its parts share
    the registry of jobs in flight (`flight`) and the listing's reads."""

    def __init__(
        self,
        settings: DriverSettings,
        client: EachlabsClient,
        journal: Commits,
        dispatcher: JobSource,
        planner: PollPlanner,
        stats: RunStats,
        lanes: Sequence[KeyLane],
        *,
        flight: InFlight | None = None,
        webhook: Webhook | None = None,
        listing: Callbacks | None = None,
        downloader: Downloader | None = None,
        uploads: Uploads | None = None,
        clock: Clock | None = None,
        open_elsewhere: Callable[[], bool] | None = None,
    ) -> None:
        """`listing`: the hints of the executions listing's sweeps (polling mode);
        `open_elsewhere`: on a Ray worker, whether a key of another worker can take a job now.
        Durations and deadlines are on `clock` (monotonic: a step of the wall clock moves
        none of them); wall time only for what is journaled and shown."""
        clock = clock or SystemClock()
        self._settings = settings
        self._dispatcher = dispatcher
        self._stats = stats
        self._lanes = lanes
        self._clock = clock
        self.flight = flight or InFlight(clock)
        # what wakes a job before its poll: callbacks, or the executions listing (`sweep`)
        self._hints = webhook.callbacks if webhook is not None else listing
        listings = Listings(client, stats)
        self.outcomes = Outcomes(
            settings,
            journal,
            dispatcher,
            planner,
            stats,
            self.flight,
            clock,
            hints=self._hints,
            downloader=downloader,
        )
        self.poller = Poller(
            settings,
            client,
            journal,
            planner,
            stats,
            self.flight,
            self.outcomes,
            clock,
            hints=self._hints,
        )
        self.sweeper = Sweeper(settings, listings, self.flight, planner, lanes, clock, self._hints)
        self.creator = Creator(
            settings,
            client,
            journal,
            dispatcher,
            stats,
            listings,
            self.flight,
            planner,
            lanes,
            clock,
            webhook=webhook,
            uploads=uploads,
            open_elsewhere=open_elsewhere,
        )

    @property
    def downloader(self) -> Downloader | None:
        return self.outcomes.downloader

    async def cancel_in_flight(self, confirm_within: float | None = None) -> None:
        """Cancel every job in flight, and every one to come (see `Poller.cancel_in_flight`)."""
        await self.poller.cancel_in_flight(confirm_within)

    async def run_lane(self, lane: KeyLane, slots: int) -> None:
        """The key's slots until each has ended, and its listing's reads meanwhile."""
        async with anyio.create_task_group() as lane_tasks:
            lane_tasks.start_soon(self.sweeper.sweep, lane)
            async with anyio.create_task_group() as slot_tasks:
                for _ in range(slots):
                    slot_tasks.start_soon(self.run_slot, lane)
            lane_tasks.cancel_scope.cancel()

    async def run_slot(self, lane: KeyLane) -> None:
        """Serve jobs on this key until there are none, or the key is retired."""
        lane.serving += 1
        try:
            while not lane.retired:
                entry = await self._dispatcher.next_job(lane.key.name)
                if entry is None:
                    return
                try:
                    await self.run_job(lane, entry)
                except KeyRefused as refused:
                    self._dispatcher.give_back(refused.entry)
                    lane.retire()
                    self._dispatcher.retire(lane.key.name)
                    return
                except GiveWay as way:
                    self._dispatcher.give_back(way.entry)
                    await self._dispatcher.rest(way.wait)
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
            self._stats.reattached += 1
            lane.cap.started()  # it runs at the provider: it counts against the cap
            log.bound().info("reattach", prediction_id=entry.prediction_id)
            polled = await self.poller.poll(
                lane, entry, entry.prediction_id, self._clock.now(), attempts
            )
            if isinstance(polled, Left):
                return
            outcome = polled
        elif entry.status is Status.CREATING:
            # a crash came between sending a create and journaling its answer
            await self.creator.ambiguous(entry, log)
            resumed = await self.creator.resumed_lost(lane, entry, log)
            if isinstance(resumed, Withheld):
                return
            adopted = resumed
            if adopted is None and self._settings.ambiguous_creates == "fail":
                await self.outcomes.finish(entry, self.creator.ambiguous_outcome())
                return
        while True:
            if outcome is None:
                # the job a crash left unanswered, found at the provider; else a create
                created = adopted or await self.creator.create(lane, entry, attempts, log)
                adopted = None
                if isinstance(created, Withheld):
                    return
                if isinstance(created, NotSent):
                    self._dispatcher.give_back(entry)
                    return
                if isinstance(created, JobOutcome):
                    await self.outcomes.finish(entry, created)
                    return
                attempts = created.attempts
                hooked = self._hints is not None  # a callback or the listing may wake it
                polled = await self.poller.poll(
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
                and attempts < self._settings.policy.max_attempts
            ):
                await self.outcomes.finish(entry, outcome)
                return
            # the provider says to try again; a failed job costs nothing
            self._stats.job_retries += 1
            log.bound().info(
                "job_retry",
                prediction_id=outcome.prediction_id,
                error_code=outcome.error_code,
                attempt=attempts,
            )
            entry = replace(entry, status=Status.CREATED, attempts=attempts)
            outcome = None
