"""A created job polled to its end: on the planner's schedule or on a callback's hint, with
its timeout, and cancels confirmed by a poll within their grace."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import anyio
import structlog

from pipeline.core import (
    ApiError,
    Clock,
    JobOutcome,
    NotFound,
    RateLimited,
    RunStats,
    Status,
    Unauthorized,
    UnsafePredictionId,
)
from pipeline.drive.flight import Flying, InFlight
from pipeline.drive.lanes import KeyLane
from pipeline.drive.outcomes import Outcomes
from pipeline.drive.settings import DriverSettings
from pipeline.drive.steps import Deferred, Ended, KeyRefused, Left, Track
from pipeline.journal import Commits, Entry, NoteCancel
from pipeline.provider import Callbacks, EachlabsClient, PollPlanner, Waiter

_log = structlog.get_logger("pipeline.drive.driver")


__all__ = ["Poller"]


class Poller:
    """Polling jobs to their end, and cancelling them; each end handed to the outcomes."""

    def __init__(
        self,
        settings: DriverSettings,
        client: EachlabsClient,
        journal: Commits,
        planner: PollPlanner,
        stats: RunStats,
        flight: InFlight,
        outcomes: Outcomes,
        clock: Clock,
        *,
        hints: Callbacks | None = None,
    ) -> None:
        self._settings = settings
        self._client = client
        self._journal = journal
        self._planner = planner
        self._stats = stats
        self._flight = flight
        self._outcomes = outcomes
        self._clock = clock
        self._hints = hints  # callbacks, or the listing's ends: what may wake a job

    async def poll(
        self,
        lane: KeyLane,
        entry: Entry,
        prediction_id: str,
        created: float,
        attempts: int,
        *,
        hooked: bool = False,
        journaled: asyncio.Event | None = None,
    ) -> JobOutcome | Left:
        """Poll a job to its end, and how it ended; its prediction id is durable before the
        first poll (invariant 1: `journaled` is set once it is), so a crash never loses a paid
        job. `created` is when its create was sent: the schedule counts from there. `hooked`:
        a hint may wake the job early (a callback to the webhook URL its create carried, or
        an end its key's executions listing shows). While polled, the job is in `in_flight`."""
        self._flight.fly(prediction_id, Flying(lane, entry, created, attempts))
        if self._flight.cancel_all:  # created as the run was being stopped for good
            await self._cancel_noted(prediction_id, lane, entry.row_number)
        waiter = self._hints.expect(prediction_id) if hooked and self._hints else None
        track = Track(waiter)
        try:
            outcome = await self._poll_to_end(lane, entry, prediction_id, created, track, journaled)
        finally:
            lane.cap.ended()
            if waiter is not None and self._hints is not None:
                self._hints.forget(waiter)
        self._flight.land(prediction_id)  # kept when cancelled: see cancel_in_flight
        return outcome

    async def _poll_to_end(
        self,
        lane: KeyLane,
        entry: Entry,
        prediction_id: str,
        created: float,
        track: Track,
        journaled: asyncio.Event | None,
    ) -> JobOutcome | Left:
        """The polls of one job. Past its deadline the job is cancelled at the provider and
        polled for the cancel's grace: the end a poll sees is the job's (it may have ended
        `success` as the cancel went out); past the grace it is left, unconfirmed."""
        deadline = created + self._settings.job_timeout
        timed_out = False
        delay = self._delay(track.waiter, None, False)
        while True:
            await self._wait(max(0.0, min(delay, deadline - self._clock.now())), track.waiter)
            track.woken()
            if journaled is not None:  # its id is durable before it is polled
                await self._journal.durable(journaled)
                journaled = None
            step = await self._poll_once(lane, entry, prediction_id, track)
            if isinstance(step, Ended):
                return self._outcomes.ended(step.answer, created, track, timed_out)
            if isinstance(step, JobOutcome):
                return step
            if step.wait is not None:
                delay = step.wait
            elif timed_out:
                delay = self._settings.confirm_every
            else:
                delay = self._delay(track.waiter, self._clock.now() - created, track.contradicted)
            if self._clock.now() < deadline:
                continue
            if timed_out:
                return self._outcomes.left(entry, prediction_id)
            timed_out = True
            self._stats.timeouts += 1
            await self._cancel_noted(prediction_id, lane, entry.row_number)
            deadline, delay = self._clock.now() + self._settings.cancel_grace, 0.0

    async def _poll_once(
        self, lane: KeyLane, entry: Entry, prediction_id: str, track: Track
    ) -> Ended | JobOutcome | Deferred:
        """One poll: the job ended, or an outcome without an end (the provider does not know
        the job, or its id is unsafe: a job was created and nobody saw it end, so the row is
        flagged unconfirmed), or when to poll again."""
        self._stats.polls += 1
        try:
            answer = await self._client.get(lane.key, prediction_id)
        except (NotFound, UnsafePredictionId) as exc:
            self._stats.unconfirmed += 1
            return JobOutcome(
                Status.FAILED,
                prediction_id,
                error_type=exc.error_type,
                error_message=f"{exc}; it was created, and its cost is not confirmed",
                finished_at=time.time(),
                cancel_accepted=self._flight.answer(prediction_id),
                unconfirmed=True,
            )
        except Unauthorized as exc:
            job = self._flight.land(prediction_id)
            attempts = job.attempts if job is not None else entry.attempts
            # the job exists under this key only: it waits, journaled, for a later run
            raise KeyRefused(
                replace(
                    entry,
                    status=Status.CREATED,
                    prediction_id=prediction_id,
                    key_name=lane.key.name,
                    attempts=attempts,
                )
            ) from exc
        except RateLimited as exc:
            self._stats.rate_limited += 1
            return Deferred(self._settings.policy.rate_limit_wait(exc, track.failed()))
        except ApiError as exc:
            # a paid job is never given up on a poll error: back off until its deadline
            failures = track.failed()
            _log.info(
                "poll_retry", job_id=entry.job_id, prediction_id=prediction_id, error=str(exc)
            )
            return Deferred(self._settings.policy.backoff(failures))
        track.answered()
        if answer.terminal:
            return Ended(answer)
        if track.hinted and self._hints is not None:
            self._hints.stats.unconfirmed += 1
        track.running()
        return Deferred()

    async def _cancel(self, lane: KeyLane, prediction_id: str) -> bool:
        try:
            accepted = await self._client.cancel(lane.key, prediction_id)
        except ApiError as exc:
            _log.warning("cancel_failed", prediction_id=prediction_id, error=str(exc))
            return False
        self._stats.cancels += 1
        return accepted

    async def cancel_in_flight(self, confirm_within: float | None = None) -> None:
        """The run is stopped for good: cancel at the provider every job in flight, and every
        job that comes in flight from now on (its create was under way). A cancel is a request:
        each job ends on a poll. While the slots still poll (a budget reached) they see it;
        once they are stopped (a second signal), `confirm_within` seconds of polls here finish
        each job a poll sees end, and leave the others journaled for the next run."""
        self._flight.stop_all()
        jobs = self._flight.items()
        async with anyio.create_task_group() as tg:
            for prediction_id, job in jobs:
                tg.start_soon(self._cancel_noted, prediction_id, job.lane, job.entry.row_number)
        _log.warning("cancelled_in_flight", jobs=len(jobs))
        if confirm_within is None or not jobs:
            return
        with anyio.move_on_after(confirm_within):
            async with anyio.create_task_group() as tg:
                for prediction_id, job in jobs:
                    tg.start_soon(self._confirm_end, prediction_id, job)
        left = [p for p, _ in jobs if p in self._flight]
        if left:
            self._stats.unconfirmed += len(left)
            _log.warning("ends_unconfirmed", jobs=len(left), hint="the next run polls them")

    async def _confirm_end(self, prediction_id: str, job: Flying) -> None:
        """Poll a cancelled job (its slot stopped) until a poll sees it end, and finish it."""
        track = Track(None)
        delay = 0.0
        while True:
            await anyio.sleep(delay)
            try:
                step = await self._poll_once(job.lane, job.entry, prediction_id, track)
            except KeyRefused:
                return  # its key is refused: it stays journaled for a run with a key
            if isinstance(step, Ended):
                outcome = self._outcomes.outcome(step.answer, job.created, False)
                break
            if isinstance(step, JobOutcome):
                outcome = step
                break
            delay = step.wait if step.wait is not None else self._settings.confirm_every
        self._flight.land(prediction_id)
        await self._outcomes.finish(job.entry, outcome)

    async def _cancel_noted(self, prediction_id: str, lane: KeyLane, row: int) -> None:
        accepted = await self._cancel(lane, prediction_id)
        self._flight.asked(prediction_id, accepted)  # if not seen to end while it was out
        await self._journal.write(NoteCancel(row, accepted))

    def _delay(self, waiter: Waiter | None, elapsed: float | None, contradicted: bool) -> float:
        """Seconds to the next poll, `elapsed` seconds after the create (None: the first poll):
        the learned poll schedule, or, while callbacks arrive and none was contradicted for
        this job, a fallback poll past the job's expected end."""
        if self._outcomes.on_schedule(waiter, contradicted):
            if elapsed is None:
                return self._planner.first_delay()
            return self._planner.next_delay(elapsed)
        late = self._planner.quantile(0.99) + self._settings.fallback_after - (elapsed or 0.0)
        return late if late > 0 else self._settings.fallback_interval

    async def _wait(self, seconds: float, waiter: Waiter | None) -> None:
        """Sleep `seconds`, or until the waiter's event (a callback) if it comes sooner."""
        if waiter is None:
            await asyncio.sleep(seconds)  # anyio.sleep would look the backend up on every poll
            return
        # the timer sets the same event: cheaper than a cancel scope, once per job and poll
        timer = asyncio.get_running_loop().call_later(seconds, waiter.event.set)
        try:
            await waiter.event.wait()
        finally:
            timer.cancel()
