"""One slot of one key: take a job, create it, journal its id, poll it to its end, repeat.

A key has `max_concurrent` workers, so a key's slot is held from the create request until the
job's terminal status (or until a job that may exist on the provider is given time to end).
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
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import anyio
import structlog

from pipeline.client import EachlabsClient, Prediction
from pipeline.config import RunConfig
from pipeline.dispatch import Dispatcher
from pipeline.errors import ApiError, NotFound, RateLimited, Unauthorized, UnsafePredictionId
from pipeline.journal import (
    Entry,
    Finish,
    GroupCommit,
    MarkCreated,
    MarkCreating,
    MarkPending,
    NoteAmbiguous,
)
from pipeline.keys import ApiKey
from pipeline.limits import CreateGate, GatePaused, RetryPolicy
from pipeline.models import JobOutcome, Status
from pipeline.polling import PollPlanner
from pipeline.webhook import Callbacks, CallbackStats, Waiter

__all__ = ["KeyLane", "RunStats", "Worker"]

_log = structlog.get_logger("pipeline.worker")
_MAX_RATE_LIMIT_WAITS = 50


@dataclass
class RunStats:
    """Counters of one run, for the summary and the benchmark."""

    creates_sent: int = 0
    rate_limited: int = 0
    retries: int = 0
    ambiguous_creates: int = 0
    polls: int = 0
    reattached: int = 0
    timeouts: int = 0
    finished: int = 0
    retired_keys: list[str] = field(default_factory=list)
    callbacks: CallbackStats | None = None  # webhook mode only


@dataclass
class KeyLane:
    """One API key with its create gate; retired when the provider refuses the key."""

    key: ApiKey
    gate: CreateGate
    retired: bool = False
    serving: int = 0  # slots still asking for jobs

    def open_for_work(self) -> bool:
        """Serving and not paused by a 429: a job given back now can go out on this key."""
        return not self.retired and self.serving > 0 and self.gate.paused_for() == 0


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


class Worker:
    def __init__(
        self,
        config: RunConfig,
        client: EachlabsClient,
        journal: GroupCommit,
        dispatcher: Dispatcher,
        planner: PollPlanner,
        stats: RunStats,
        callbacks: Callbacks | None = None,
        webhook_url: str | None = None,
        lanes: Sequence[KeyLane] = (),
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
        self.price = config.api.price_per_image_usd
        self._timeout_text = f"{config.polling.job_timeout_s:g} s (polling.job_timeout_s)"

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
                    self.dispatcher.retire(lane)
                    return
                except _GiveWay as way:
                    self.dispatcher.give_back(way.entry)
                    await self.dispatcher.rest(way.wait)
        finally:
            lane.serving -= 1

    def _others_open(self, lane: KeyLane) -> bool:
        return any(other is not lane and other.open_for_work() for other in self.lanes)

    async def run_job(self, lane: KeyLane, entry: Entry) -> None:
        log = _JobLog(entry, lane)
        if entry.status is Status.CREATED and entry.prediction_id:
            if entry.key_name == lane.key.name:
                self.stats.reattached += 1
                log.bound().info("reattach", prediction_id=entry.prediction_id)
                await self._poll(lane, entry, entry.prediction_id, time.time(), entry.attempts)
                return
            # its key is gone: the job cannot be seen from another key; it stays for a later run
            log.bound().warning("orphaned", prediction_id=entry.prediction_id, owner=entry.key_name)
            return
        attempts = entry.attempts
        if entry.status is Status.CREATING:
            # a crash came between sending a create and journaling its answer
            await self._ambiguous(entry, log)
            if self.config.retries.ambiguous_creates == "fail":
                await self._finish(entry, self._ambiguous_outcome())
                return
        outcome_or_id = await self._create(lane, entry, attempts, log)
        if outcome_or_id is None:
            self.dispatcher.give_back(entry)  # stopped before it was sent: left for the resume
            return
        if isinstance(outcome_or_id, JobOutcome):
            await self._finish(entry, outcome_or_id)
            return
        prediction_id, attempts = outcome_or_id
        await self._poll(
            lane, entry, prediction_id, time.time(), attempts, hooked=self.webhook_url is not None
        )

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
    ) -> JobOutcome | tuple[str, int] | None:
        """Create the job: its prediction id and attempts, or how it failed, or None when the
        run was stopped before it was sent."""
        failures = 0
        waits = 0
        marked = entry.status is not Status.PENDING  # the journal holds more than `pending`
        while True:
            attempts += 1
            try:
                async with lane.gate.create(give_way=lambda: self._others_open(lane)) as ticket:
                    if self.dispatcher.halted:
                        if marked:
                            await self.journal.write(MarkPending(entry.row_number))
                        return None
                    marked = True
                    await self.journal.write(
                        MarkCreating(entry.row_number, attempts, lane.key.name, time.time())
                    )
                    await lane.gate.settled()
                    self.stats.creates_sent += 1
                    try:
                        prediction_id = await self.client.create(
                            lane.key, entry.inputs, webhook_url=self.webhook_url
                        )
                    except ApiError as exc:
                        error = exc
                    else:
                        # durable before the next create of this key is sent (see limits), so
                        # a crash leaves ambiguous only creates whose answers had not come
                        ticket.answered()
                        await self.journal.write(
                            MarkCreated(entry.row_number, prediction_id, lane.key.name, time.time())
                        )
                        return prediction_id, attempts
            except GatePaused as paused:
                if marked:
                    await self.journal.write(MarkPending(entry.row_number))
                given = replace(entry, status=Status.PENDING, attempts=attempts - 1)
                raise _GiveWay(given, paused.wait) from None
            if isinstance(error, Unauthorized):
                await self.journal.write(MarkPending(entry.row_number))
                log.bound().error("key_refused", error=str(error))
                raise _KeyRefused(replace(entry, status=Status.PENDING)) from error
            if isinstance(error, RateLimited):
                self.stats.rate_limited += 1
                waits += 1
                attempts -= 1  # a 429 created nothing; it does not use up an attempt
                if waits <= _MAX_RATE_LIMIT_WAITS:
                    # the whole key waits; this job waits with it or goes to another key
                    lane.gate.pause(self.policy.rate_limit_wait(error, waits))
                    continue
            elif not error.retryable:
                if error.ambiguous:  # e.g. an answer whose id we will not use: maybe billed
                    await self._ambiguous(entry, log)
                return JobOutcome(
                    Status.FAILED,
                    error_type=error.error_type,
                    error_message=str(error),
                    finished_at=time.time(),
                )
            failures += 1
            if error.ambiguous:
                await self._ambiguous(entry, log)
                if self.config.retries.ambiguous_creates == "fail":
                    return self._ambiguous_outcome()
                # the lost job may hold one of this key's provider slots: keep ours until it ends
                await anyio.sleep(self.planner.quantile(0.9))
            if failures >= self.policy.max_attempts or waits > _MAX_RATE_LIMIT_WAITS:
                return JobOutcome(
                    Status.FAILED,
                    error_type=error.error_type,
                    error_message=f"{error} (after {attempts} attempts)",
                    finished_at=time.time(),
                )
            self.stats.retries += 1
            log.bound().info("create_retry", error=str(error), attempt=attempts)
            await anyio.sleep(self.policy.backoff(failures))

    async def _poll(
        self,
        lane: KeyLane,
        entry: Entry,
        prediction_id: str,
        created: float,
        attempts: int,
        *,
        hooked: bool = False,
    ) -> None:
        """Poll a job to its end; its prediction id is durable already (invariant 1), so a
        crash never loses a paid job. `hooked`: the create carried our webhook URL, so a
        callback may wake the job early."""
        waiter = self.callbacks.expect(prediction_id) if hooked and self.callbacks else None
        try:
            deadline = created + self.job_timeout
            contradicted = False  # a contradicted callback puts the job on the poll schedule
            delay = self._delay(waiter, None, contradicted)
            failures = 0
            hinted = False  # a callback came that no poll answer has confirmed or contradicted yet
            while True:
                now = time.time()
                await self._wait(max(0.0, min(delay, deadline - now)), waiter)
                if waiter is not None:
                    hinted = hinted or waiter.hinted
                    waiter.rearm()
                self.stats.polls += 1
                try:
                    answer = await self.client.get(lane.key, prediction_id)
                except (NotFound, UnsafePredictionId) as exc:
                    await self._finish(
                        entry,
                        JobOutcome(
                            Status.FAILED,
                            prediction_id,
                            error_type=exc.error_type,
                            error_message=str(exc),
                            finished_at=time.time(),
                        ),
                    )
                    return
                except Unauthorized as exc:
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
                    failures += 1
                    delay = self.policy.rate_limit_wait(exc, failures)
                    answer = None
                except ApiError as exc:
                    # a paid job is never given up on a poll error: back off until its deadline
                    failures += 1
                    delay = self.policy.backoff(failures)
                    _log.info("poll_retry", job_id=entry.job_id, error=str(exc))
                    answer = None
                if answer is not None:
                    failures = 0
                    if answer.terminal:
                        if waiter is not None and self.callbacks is not None:
                            self.callbacks.ended(
                                waiter, self._seen_by(waiter, hinted, contradicted)
                            )
                        await self._finish(entry, self._outcome(answer, created))
                        return
                    if hinted and self.callbacks is not None:
                        self.callbacks.stats.unconfirmed += 1
                        contradicted = True
                        hinted = False
                    delay = self._delay(waiter, time.time() - created, contradicted)
                if time.time() >= deadline:
                    self.stats.timeouts += 1
                    await self._finish(
                        entry,
                        JobOutcome(
                            Status.FAILED,
                            prediction_id,
                            error_type="timeout",
                            error_message=f"still processing after {self._timeout_text}",
                            finished_at=time.time(),
                        ),
                    )
                    return
        finally:
            if waiter is not None and self.callbacks is not None:
                self.callbacks.forget(waiter)

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

    def _seen_by(
        self, waiter: Waiter, hinted: bool, contradicted: bool
    ) -> Literal["callback", "fallback", "poll"]:
        if hinted:
            return "callback"
        return "poll" if self._on_schedule(waiter, contradicted) else "fallback"

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

    def _outcome(self, answer: Prediction, created: float) -> JobOutcome:
        now = time.time()
        self.planner.observe(answer.predict_time_s or (now - created))
        if answer.status == "success":
            return JobOutcome(
                Status.SUCCEEDED,
                answer.prediction_id,
                answer.output_urls,
                answer.predict_time_s,
                finished_at=now,
            )
        return JobOutcome(
            Status.FAILED,
            answer.prediction_id,
            (),
            answer.predict_time_s,
            error_type="job_error",
            error_message=answer.message,
            finished_at=now,
        )

    async def _finish(self, entry: Entry, outcome: JobOutcome) -> None:
        self.stats.finished += 1
        # not waited for: a crash before it commits leaves the job `created`, and the resume
        # polls it again and gets the same end
        self.journal.post(Finish(entry.row_number, outcome, self.price))
        self.dispatcher.settle(entry, outcome)
