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

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import anyio
import structlog

from pipeline.core import (
    TRANSIENT_ERROR_CODES,
    ApiError,
    Clock,
    JobOutcome,
    NotFound,
    RateLimited,
    RunConfig,
    RunStats,
    Status,
    SystemClock,
    Unauthorized,
    UnsafePredictionId,
)
from pipeline.drive.dispatcher import JobSource
from pipeline.drive.lanes import KeyLane
from pipeline.intake import Uploads
from pipeline.journal import (
    Commits,
    Entry,
    Finish,
    MarkCreated,
    MarkCreating,
    MarkPending,
    NoteAmbiguous,
    NoteCancel,
)
from pipeline.outputs import Downloader
from pipeline.provider import (
    Callbacks,
    EachlabsClient,
    GatePaused,
    PollPlanner,
    Prediction,
    RetryPolicy,
    Waiter,
)

__all__ = ["KeyLane", "RunStats", "Worker"]

_log = structlog.get_logger("pipeline.drive.driver")
_MAX_RATE_LIMIT_WAITS = 50


class Flying(NamedTuple):
    """A job being polled: its key, its journal entry, when its create was answered (on the
    worker's monotonic clock) and the attempt it is."""

    lane: KeyLane
    entry: Entry
    created: float
    attempts: int


class _JobLog:
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


class _KeyRefused(Exception):
    """The key was refused; `entry` is the job as the journal now holds it."""

    def __init__(self, entry: Entry) -> None:
        super().__init__(entry.job_id)
        self.entry = entry


class _GiveWay(Exception):
    """The key is paused and another can take the job: `entry` is the job as the journal now
    holds it, `wait` the pause left."""

    def __init__(self, entry: Entry, wait: float) -> None:
        super().__init__(entry.job_id)
        self.entry = entry
        self.wait = wait


@dataclass(frozen=True, slots=True)
class Created:
    """A create the provider answered: the job's id, durable in the journal, and the attempt."""

    prediction_id: str
    attempts: int


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


def _failed(error: ApiError, message: str) -> JobOutcome:
    return JobOutcome(
        Status.FAILED, error_type=error.error_type, error_message=message, finished_at=time.time()
    )


class _Track:
    """What one job's polls have seen: errors in a row, and its callback's hint (webhook mode):
    a hint no poll has confirmed yet, or one a poll contradicted (the job is then polled on
    the schedule)."""

    __slots__ = ("contradicted", "failures", "hinted", "waiter")

    def __init__(self, waiter: Waiter | None) -> None:
        self.waiter = waiter
        self.failures = 0
        self.hinted = False
        self.contradicted = False

    def woken(self) -> None:
        if self.waiter is not None:
            self.hinted = self.hinted or self.waiter.hinted
            self.waiter.rearm()

    def running(self) -> None:
        """A poll said the job still runs: a hint before it was wrong."""
        if self.hinted and self.waiter is not None:
            self.contradicted, self.hinted = True, False


class Worker:
    def __init__(
        self,
        config: RunConfig,
        client: EachlabsClient,
        journal: Commits,
        dispatcher: JobSource,
        planner: PollPlanner,
        stats: RunStats,
        callbacks: Callbacks | None = None,
        webhook_url: str | None = None,
        lanes: Sequence[KeyLane] = (),
        webhook_secret: str | None = None,
    ) -> None:
        self.config = config
        self.lanes = lanes
        self.client = client
        self.journal = journal
        self.dispatcher = dispatcher
        self.planner = planner
        self.stats = stats
        self.callbacks = callbacks
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret  # the provider signs its callbacks with it
        self._fallback_after = config.scaled(config.webhook.fallback_after_s)
        self._fallback_interval = config.scaled(config.webhook.fallback_interval_s)
        r = config.retries
        self.policy = RetryPolicy(
            r.max_attempts,
            config.scaled(r.backoff_initial_s),
            config.scaled(r.backoff_max_s),
            config.scaled(r.retry_after_max_s),
        )
        self.job_timeout = config.scaled(config.polling.job_timeout_s)
        self._cancel_grace = config.scaled(config.polling.cancel_grace_s)
        # at most about ten polls in a cancel's grace
        shortest = config.scaled(config.polling.min_interval_s)
        self._confirm_every = max(shortest, self._cancel_grace / 10)
        self._asked: dict[str, bool] = {}  # prediction id -> whether its cancel was answered yes
        self.price = config.api.price_per_image_usd
        self.in_flight: dict[str, Flying] = {}  # prediction id -> its key, row and creation
        # durations and deadlines: monotonic, so a step of the wall clock moves none of them;
        # wall time only for what is journaled and shown
        self.clock: Clock = SystemClock()
        planner.running = self.ages
        self.cancel_all = False  # stopped for good: every job in flight is cancelled
        self.downloader: Downloader | None = None  # keeps the outputs, when assets.download
        self.uploads: Uploads | None = None  # signs uploaded inputs, when assets.upload_to
        # on a Ray worker: whether a key of another worker can take a job now
        self.open_elsewhere: Callable[[], bool] | None = None
        self._timeout_text = f"{config.polling.job_timeout_s:g} s (polling.job_timeout_s)"
        self._cost_said = False  # a difference between the provider's cost and ours: said once

    def flying_lanes(self) -> list[KeyLane]:
        """The lane of each job in flight, for the progress view."""
        return [job.lane for job in self.in_flight.values()]

    def ages(self) -> list[float]:
        """Seconds since the create of each job in flight: lower bounds on their latencies."""
        now = self.clock.now()
        return [now - job.created for job in self.in_flight.values()]

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
                except _KeyRefused as refused:
                    self.dispatcher.give_back(refused.entry)
                    lane.retired = True
                    self.dispatcher.retire(lane.key.name)
                    return
                except _GiveWay as way:
                    self.dispatcher.give_back(way.entry)
                    await self.dispatcher.rest(way.wait)
        finally:
            lane.serving -= 1

    def _others_open(self, lane: KeyLane) -> bool:
        if any(other is not lane and other.open_for_work() for other in self.lanes):
            return True
        return self.open_elsewhere is not None and self.open_elsewhere()

    async def run_job(self, lane: KeyLane, entry: Entry) -> None:
        log = _JobLog(entry, lane)
        attempts = entry.attempts
        outcome: JobOutcome | None = None
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
            if self.config.retries.ambiguous_creates == "fail":
                await self._finish(entry, self._ambiguous_outcome())
                return
        while True:
            if outcome is None:
                created = await self._create(lane, entry, attempts, log)
                if isinstance(created, Withheld):
                    return
                if isinstance(created, NotSent):
                    self.dispatcher.give_back(entry)
                    return
                if isinstance(created, JobOutcome):
                    await self._finish(entry, created)
                    return
                attempts = created.attempts
                hooked = self.webhook_url is not None
                polled = await self._poll(
                    lane, entry, created.prediction_id, self.clock.now(), attempts, hooked=hooked
                )
                if isinstance(polled, Left):
                    return
                outcome = polled
            if not (
                outcome.error_code in TRANSIENT_ERROR_CODES and attempts < self.policy.max_attempts
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

    async def _ambiguous(self, entry: Entry, log: _JobLog) -> None:
        self.stats.ambiguous_creates += 1
        await self.journal.write(NoteAmbiguous(entry.row_number))
        log.bound().warning("ambiguous_create", policy=self.config.retries.ambiguous_creates)

    def _ambiguous_outcome(self) -> JobOutcome:
        return JobOutcome(
            Status.FAILED,
            error_type="ambiguous_create",
            error_message="the answer to a create was lost: a job may have been created and "
            "billed; not retried (retries.ambiguous_creates: fail)",
            finished_at=time.time(),
        )

    async def _create(
        self, lane: KeyLane, entry: Entry, attempts: int, log: _JobLog
    ) -> Created | JobOutcome | NotSent | Withheld:
        """Create the job: its id, or how it failed (a JobOutcome), or NotSent, or Withheld
        when the budget cannot take another create after a lost answer."""
        failures = 0
        waits = 0
        marked = entry.status is not Status.PENDING  # the journal holds more than `pending`
        while True:
            attempts += 1
            sent = await self._send_create(lane, entry, attempts, marked)
            if not isinstance(sent, ApiError):
                return sent
            marked, error = True, sent
            if isinstance(error, Unauthorized):
                await self.journal.write(MarkPending(entry.row_number))
                log.bound().error("key_refused", error=str(error))
                raise _KeyRefused(replace(entry, status=Status.PENDING)) from error
            if isinstance(error, RateLimited):
                self.stats.rate_limited += 1
                if lane.gate.in_window() < self.config.limits.creates_per_window:
                    # our window is not full: the provider's concurrency cap refused it
                    lane.cap.refused()
                    self.stats.cap_refusals += 1
                waits += 1
                attempts -= 1  # a 429 created nothing; it does not use up an attempt
                if waits <= _MAX_RATE_LIMIT_WAITS:
                    # the whole key waits; this job waits with it or goes to another key
                    lane.gate.pause(self.policy.rate_limit_wait(error, waits))
                    continue
            elif not error.retryable:
                if error.ambiguous:  # e.g. an answer whose id we will not use: maybe billed
                    await self._ambiguous(entry, log)
                return _failed(error, str(error))
            failures += 1
            if error.ambiguous:
                await self._ambiguous(entry, log)
                if self.config.retries.ambiguous_creates == "fail":
                    return self._ambiguous_outcome()
                if not await self.dispatcher.reserve(entry):
                    await self.journal.write(MarkPending(entry.row_number))
                    log.bound().warning("budget_withholds_create", attempt=attempts)
                    return Withheld()
                # the lost job may hold one of this key's provider slots: keep ours until it ends
                await anyio.sleep(self.planner.quantile(0.9))
            if failures >= self.policy.max_attempts or waits > _MAX_RATE_LIMIT_WAITS:
                return _failed(error, f"{error} (after {attempts} attempts)")
            self.stats.retries += 1
            log.bound().info("create_retry", error=str(error), attempt=attempts)
            await anyio.sleep(self.policy.backoff(failures))

    async def _send_create(
        self, lane: KeyLane, entry: Entry, attempts: int, marked: bool
    ) -> Created | ApiError | NotSent:
        """One create through the key's gate: its id (durable before the next create of this
        key is sent), the error, or NotSent when the run was stopped first."""
        try:
            async with (
                lane.cap.sending(),
                lane.gate.create(give_way=lambda: self._others_open(lane)) as ticket,
            ):
                if self.dispatcher.halted:
                    if marked:
                        await self.journal.write(MarkPending(entry.row_number))
                    return NotSent()
                await self.journal.write(
                    MarkCreating(entry.row_number, attempts, lane.key.name, time.time())
                )
                await lane.gate.settled()
                self.stats.creates_sent += 1
                inputs = entry.inputs
                if self.uploads is not None:  # a fresh presigned URL for each create
                    inputs = self.uploads.presigned(inputs)
                try:
                    prediction_id = await self.client.create(
                        lane.key,
                        inputs,
                        webhook_url=self.webhook_url,
                        webhook_secret=self.webhook_secret,
                    )
                except ApiError as exc:
                    return exc
                lane.cap.started()  # running at the provider until its end is seen
                # so a crash leaves ambiguous only creates whose answers had not come
                ticket.answered()
                await self.journal.write(
                    MarkCreated(entry.row_number, prediction_id, lane.key.name, time.time())
                )
                return Created(prediction_id, attempts)
        except GatePaused as paused:
            if marked:
                await self.journal.write(MarkPending(entry.row_number))
            given = replace(entry, status=Status.PENDING, attempts=attempts - 1)
            raise _GiveWay(given, paused.wait) from None

    async def _poll(
        self,
        lane: KeyLane,
        entry: Entry,
        prediction_id: str,
        created: float,
        attempts: int,
        *,
        hooked: bool = False,
    ) -> JobOutcome | Left:
        """Poll a job to its end, and how it ended; its prediction id is durable already
        (invariant 1), so a crash never loses a paid job. `hooked`: the create carried our
        webhook URL, so a callback may wake the job early. While polled, the job is in
        `in_flight`."""
        self.in_flight[prediction_id] = Flying(lane, entry, created, attempts)
        if self.cancel_all:  # created as the run was being stopped for good
            await self._cancel_noted(prediction_id, lane, entry.row_number)
        waiter = self.callbacks.expect(prediction_id) if hooked and self.callbacks else None
        track = _Track(waiter)
        try:
            outcome = await self._poll_to_end(lane, entry, prediction_id, created, track)
        finally:
            lane.cap.ended()
            if waiter is not None and self.callbacks is not None:
                self.callbacks.forget(waiter)
        del self.in_flight[prediction_id]  # kept when cancelled: see cancel_in_flight
        return outcome

    async def _poll_to_end(
        self, lane: KeyLane, entry: Entry, prediction_id: str, created: float, track: _Track
    ) -> JobOutcome | Left:
        """The polls of one job. Past its deadline the job is cancelled at the provider and
        polled for the cancel's grace: the end a poll sees is the job's (it may have ended
        `success` as the cancel went out); past the grace it is left, unconfirmed."""
        deadline = created + self.job_timeout
        timed_out = False
        delay = self._delay(track.waiter, None, False)
        while True:
            await self._wait(max(0.0, min(delay, deadline - self.clock.now())), track.waiter)
            track.woken()
            step = await self._poll_once(lane, entry, prediction_id, track)
            if isinstance(step, Ended):
                return self._ended(step.answer, created, track, timed_out)
            if isinstance(step, JobOutcome):
                return step
            if step.wait is not None:
                delay = step.wait
            elif timed_out:
                delay = self._confirm_every
            else:
                delay = self._delay(track.waiter, self.clock.now() - created, track.contradicted)
            if self.clock.now() < deadline:
                continue
            if timed_out:
                return self._left(entry, prediction_id)
            timed_out = True
            self.stats.timeouts += 1
            await self._cancel_noted(prediction_id, lane, entry.row_number)
            deadline, delay = self.clock.now() + self._cancel_grace, 0.0

    def _ended(
        self, answer: Prediction, created: float, track: _Track, timed_out: bool
    ) -> JobOutcome:
        if self.callbacks is not None and track.waiter is not None:
            self.callbacks.ended(track.waiter, self._seen_by(track.waiter, track))
        outcome = self._outcome(answer, created, timed_out)
        if (took := answer.predict_time_s) is not None:
            self.stats.job_ended(took, self.clock.now() - created - took)
        return outcome

    def _left(self, entry: Entry, prediction_id: str) -> Left:
        self.stats.unconfirmed += 1
        _log.warning(
            "end_unconfirmed",
            job_id=entry.job_id,
            row=entry.row_number,
            prediction_id=prediction_id,
            hint="cancelled, and still running after polling.cancel_grace_s: it stays "
            "journaled and the next run polls it; its cost may be billed",
        )
        return Left()

    async def _poll_once(
        self, lane: KeyLane, entry: Entry, prediction_id: str, track: _Track
    ) -> Ended | JobOutcome | Deferred:
        """One poll: the job ended, or an outcome without an end (the provider does not know
        the job, or its id is unsafe: a job was created and nobody saw it end, so the row is
        flagged unconfirmed), or when to poll again."""
        self.stats.polls += 1
        try:
            answer = await self.client.get(lane.key, prediction_id)
        except (NotFound, UnsafePredictionId) as exc:
            self.stats.unconfirmed += 1
            return JobOutcome(
                Status.FAILED,
                prediction_id,
                error_type=exc.error_type,
                error_message=f"{exc}; it was created, and its cost is not confirmed",
                finished_at=time.time(),
                cancel_accepted=self._asked.pop(prediction_id, None),
                unconfirmed=True,
            )
        except Unauthorized as exc:
            attempts = self.in_flight[prediction_id].attempts
            del self.in_flight[prediction_id]
            # the job exists under this key only: it waits, journaled, for a later run
            raise _KeyRefused(
                replace(
                    entry,
                    status=Status.CREATED,
                    prediction_id=prediction_id,
                    key_name=lane.key.name,
                    attempts=attempts,
                )
            ) from exc
        except RateLimited as exc:
            self.stats.rate_limited += 1
            track.failures += 1
            return Deferred(self.policy.rate_limit_wait(exc, track.failures))
        except ApiError as exc:
            # a paid job is never given up on a poll error: back off until its deadline
            track.failures += 1
            _log.info(
                "poll_retry", job_id=entry.job_id, prediction_id=prediction_id, error=str(exc)
            )
            return Deferred(self.policy.backoff(track.failures))
        track.failures = 0
        if answer.terminal:
            return Ended(answer)
        if track.hinted and self.callbacks is not None:
            self.callbacks.stats.unconfirmed += 1
        track.running()
        return Deferred()

    async def _cancel(self, lane: KeyLane, prediction_id: str) -> bool:
        try:
            accepted = await self.client.cancel(lane.key, prediction_id)
        except ApiError as exc:
            _log.warning("cancel_failed", prediction_id=prediction_id, error=str(exc))
            return False
        self.stats.cancels += 1
        return accepted

    async def cancel_in_flight(self, confirm_within: float | None = None) -> None:
        """The run is stopped for good: cancel at the provider every job in flight, and every
        job that comes in flight from now on (its create was under way). A cancel is a request:
        each job ends on a poll. While the slots still poll (a budget reached) they see it;
        once they are stopped (a second signal), `confirm_within` seconds of polls here finish
        each job a poll sees end, and leave the others journaled for the next run."""
        self.cancel_all = True
        jobs = list(self.in_flight.items())
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
        left = [p for p, _ in jobs if p in self.in_flight]
        if left:
            self.stats.unconfirmed += len(left)
            _log.warning("ends_unconfirmed", jobs=len(left), hint="the next run polls them")

    async def _confirm_end(self, prediction_id: str, job: Flying) -> None:
        """Poll a cancelled job (its slot stopped) until a poll sees it end, and finish it."""
        track = _Track(None)
        delay = 0.0
        while True:
            await anyio.sleep(delay)
            try:
                step = await self._poll_once(job.lane, job.entry, prediction_id, track)
            except _KeyRefused:
                return  # its key is refused: it stays journaled for a run with a key
            if isinstance(step, Ended):
                outcome = self._outcome(step.answer, job.created, False)
                break
            if isinstance(step, JobOutcome):
                outcome = step
                break
            delay = step.wait if step.wait is not None else self._confirm_every
        self.in_flight.pop(prediction_id, None)
        await self._finish(job.entry, outcome)

    async def _cancel_noted(self, prediction_id: str, lane: KeyLane, row: int) -> None:
        accepted = await self._cancel(lane, prediction_id)
        if prediction_id in self.in_flight:  # not seen to end while the cancel was out
            self._asked[prediction_id] = accepted
        await self.journal.write(NoteCancel(row, accepted))

    def _delay(self, waiter: Waiter | None, elapsed: float | None, contradicted: bool) -> float:
        """Seconds to the next poll, `elapsed` seconds after the create (None: the first poll):
        the learned poll schedule, or, while callbacks arrive and none was contradicted for
        this job, a fallback poll past the job's expected end."""
        if self._on_schedule(waiter, contradicted):
            if elapsed is None:
                return self.planner.first_delay()
            return self.planner.next_delay(elapsed)
        late = self.planner.quantile(0.99) + self._fallback_after - (elapsed or 0.0)
        return late if late > 0 else self._fallback_interval

    def _on_schedule(self, waiter: Waiter | None, contradicted: bool) -> bool:
        """Whether this job is polled on the learned schedule rather than waiting for its
        callback: no callback was asked for, one was contradicted, or callbacks stopped."""
        return (
            waiter is None or contradicted or self.callbacks is None or not self.callbacks.arriving
        )

    def _seen_by(self, waiter: Waiter, track: _Track) -> Literal["callback", "fallback", "poll"]:
        if track.hinted:
            return "callback"
        return "poll" if self._on_schedule(waiter, track.contradicted) else "fallback"

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

    def _outcome(self, answer: Prediction, created: float, timed_out: bool) -> JobOutcome:
        """A job's end as a poll saw it, with the provider's cost where it gave one; a cancel
        asked for counts as accepted only when the job ended `cancelled`."""
        now = time.time()
        asked = self._asked.pop(answer.prediction_id, None)
        stopped = answer.status == "cancelled"
        if not (stopped and asked is not None):  # a job we stopped says nothing of latency
            self.planner.observe(answer.predict_time_s or (self.clock.now() - created))
        accepted = None if asked is None else stopped
        if answer.status == "success":
            outcome = JobOutcome(
                Status.SUCCEEDED,
                answer.prediction_id,
                answer.output_urls,
                answer.predict_time_s,
                finished_at=now,
                cancel_accepted=accepted,
                provider_cost_usd=answer.cost_usd,
                ended=answer.status,
            )
        else:
            error_type, message = "cancelled" if stopped else "job_error", answer.message
            if stopped and timed_out:
                error_type = "timeout"
                message = (
                    f"still processing after {self._timeout_text}; cancelled at the provider "
                    "(its cancel was accepted)"
                )
            outcome = JobOutcome(
                Status.FAILED,
                answer.prediction_id,
                (),
                answer.predict_time_s,
                error_type=error_type,
                error_message=message,
                finished_at=now,
                error_code=answer.error_code,
                cancel_accepted=accepted,
                provider_cost_usd=answer.cost_usd,
                ended=answer.status,
            )
        self._compare_cost(outcome)
        return outcome

    def _compare_cost(self, outcome: JobOutcome) -> None:
        """Count a job whose cost at the provider differs from our price times its images;
        the first is logged, so a price change is seen the first night."""
        if outcome.provider_cost_usd is None:
            return
        ours = outcome.priced(self.price)
        if abs(outcome.provider_cost_usd - ours) <= 5e-7:
            return
        self.stats.cost_mismatches += 1
        if not self._cost_said:
            self._cost_said = True
            _log.warning(
                "provider_cost_differs",
                prediction_id=outcome.prediction_id,
                provider_cost_usd=outcome.provider_cost_usd,
                priced_usd=ours,
                price_per_image_usd=self.price,
                hint="results record the provider's cost; check api.price_per_image_usd",
            )

    async def _finish(self, entry: Entry, outcome: JobOutcome) -> None:
        self.stats.finished += 1
        _log.debug(  # one per job: at --log-level debug
            "job_ended",
            job_id=entry.job_id,
            row=entry.row_number,
            prediction_id=outcome.prediction_id,
            status=outcome.status.value,
            error_type=outcome.error_type,
            images=len(outcome.output_urls),
        )
        # not waited for: a crash before it commits leaves the job `created`, and the resume
        # polls it again and gets the same end
        self.journal.post(Finish(entry.row_number, outcome, self.price))
        self.dispatcher.settle(entry, outcome)
        if self.downloader is not None and outcome.status is Status.SUCCEEDED:
            self.downloader.submit(entry.row_number, entry.job_id, outcome.output_urls)
            first = entry.inputs.get("img_url")
            if isinstance(first, str):
                self.downloader.submit_input(first)  # for the report's thumbnail
