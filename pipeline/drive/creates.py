"""A job's create: the create gate, the request, and its answer journaled before any poll
(invariant 5: 400 final, 401 retires the key, 429 waits, 5xx backs off, a lost answer is
ambiguous)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import anyio

from pipeline.core import (
    ApiError,
    BalanceShort,
    Clock,
    JobOutcome,
    RateLimited,
    RunStats,
    Status,
    Unauthorized,
)
from pipeline.drive.adopt import LEFT, LostCreates, Settled
from pipeline.drive.dispatcher import JobSource
from pipeline.drive.flight import InFlight
from pipeline.drive.lanes import KeyLane
from pipeline.drive.listings import Listings
from pipeline.drive.outage import Outage
from pipeline.drive.settings import DriverSettings, Webhook
from pipeline.drive.steps import (
    Created,
    GiveWay,
    JobLog,
    KeyRefused,
    NotSent,
    Withheld,
    failed_outcome,
)
from pipeline.intake import Uploads
from pipeline.journal import (
    Commits,
    Entry,
    MarkCreated,
    MarkCreating,
    MarkPending,
    NoteAmbiguous,
    NoteResolution,
)
from pipeline.provider import EachlabsClient, GatePaused, PollPlanner

_MAX_RATE_LIMIT_WAITS = 50


__all__ = ["Creator"]


@dataclass(frozen=True, slots=True)
class Failed:
    """A create that failed: why, when it was sent and given up (the driver's clock), and the
    input it was sent with (its seed drawn, unsigned)."""

    error: ApiError
    sent: float
    given_up: float
    inputs: dict[str, Any]


class Creator:
    """Sending a job's create, and what its answer (or its loss) means."""

    def __init__(
        self,
        settings: DriverSettings,
        client: EachlabsClient,
        journal: Commits,
        dispatcher: JobSource,
        stats: RunStats,
        listings: Listings,
        flight: InFlight,
        planner: PollPlanner,
        lanes: Sequence[KeyLane],
        clock: Clock,
        *,
        webhook: Webhook | None = None,
        uploads: Uploads | None = None,
        open_elsewhere: Callable[[], bool] | None = None,
    ) -> None:
        self._settings = settings
        self._client = client
        self._journal = journal
        self._dispatcher = dispatcher
        self._stats = stats
        self._timeline = listings.timeline
        # a lost create settled on the listing's evidence (adopt.py)
        self._lost = LostCreates(
            settings,
            client,
            journal,
            dispatcher,
            stats,
            listings,
            flight,
            lanes,
            clock,
            presigned=uploads is not None,
        )
        self._planner = planner
        self._lanes = lanes
        self._clock = clock
        self._webhook = webhook
        self._uploads = uploads  # signs uploaded inputs, when assets.upload_to
        # on a Ray worker: whether a key of another worker can take a job now
        self._open_elsewhere = open_elsewhere
        self._outage = Outage(
            client,
            settings.policy,
            stats,
            after=settings.outage_after,
            patience=settings.outage_patience,
        )

    async def create(
        self, lane: KeyLane, entry: Entry, attempts: int, log: JobLog
    ) -> Created | JobOutcome | NotSent | Withheld:
        """Create the job: its id, or how it failed (a JobOutcome), or NotSent, or Withheld
        when the budget cannot take another create after a lost answer."""
        failures = 0
        waits = 0
        marked = entry.status is not Status.PENDING  # the journal holds more than `pending`
        seed = self._lost.seed_for(entry)  # journaled with the first create: it names the job
        while True:
            attempts += 1
            sent = await self._send_create(lane, entry, attempts, marked, seed)
            if not isinstance(sent, Failed):
                return sent
            marked, error = True, sent.error
            if isinstance(error, BalanceShort):  # nothing was made: no create on any key now
                await self._journal.write(MarkPending(entry.row_number))
                self._stats.balance_refusals += 1
                self._dispatcher.stop_creates("balance", f"it refused a create: {error}")
                return NotSent()
            if isinstance(error, Unauthorized):
                await self._journal.write(MarkPending(entry.row_number))
                log.bound().error("key_refused", error=str(error))
                raise KeyRefused(replace(entry, status=Status.PENDING)) from error
            if isinstance(error, RateLimited):
                self._stats.rate_limited += 1
                if lane.gate.in_window() < self._settings.creates_per_window:
                    # our window is not full: the provider's concurrency cap refused it
                    lane.cap.refused()
                    self._stats.cap_refusals += 1
                waits += 1
                attempts -= 1  # a 429 created nothing; it does not use up an attempt
                if waits <= _MAX_RATE_LIMIT_WAITS:
                    # the whole key waits; this job waits with it or goes to another key
                    lane.gate.pause(self._settings.policy.rate_limit_wait(error, waits))
                    continue
            elif not error.retryable:
                if error.ambiguous:  # e.g. an answer whose id we will not use: maybe billed
                    await self.ambiguous(entry, log)
                    await self._journal.write(NoteAmbiguous(entry.row_number))
                return failed_outcome(error, str(error))
            last_try = failures + 1 >= self._settings.policy.max_attempts
            if not error.ambiguous and self._outage.down(error, last_try=last_try):
                # the provider is unreachable: the row is kept unsent, not failed
                await self._journal.write(MarkPending(entry.row_number))
                if not await self._outage.back(lane):
                    self._dispatcher.stop_creates("outage", str(error))
                    return NotSent()
                failures, marked = 0, False
                continue
            failures += 1
            if error.ambiguous:
                await self.ambiguous(entry, log)
                settled = await self._lost.settle(
                    lane, entry, sent.inputs, sent.sent, sent.given_up
                )
                if settled.resolution == LEFT:
                    return Withheld()  # journaled `creating`: the next run looks it up again
                adopted = await self._adopt(lane, entry, settled, attempts, sent.sent, log)
                if adopted is not None:
                    return adopted
                if self._settings.ambiguous_creates == "fail":
                    return self.ambiguous_outcome()
                if not await self._dispatcher.reserve(entry):
                    await self._journal.write(MarkPending(entry.row_number))
                    log.bound().warning("budget_withholds_create", attempt=attempts)
                    return Withheld()
                if settled.resolution == "unresolved":
                    # the lost job may hold one of this key's provider slots: keep ours until
                    # it ends
                    await anyio.sleep(self._planner.quantile(0.9))
            if failures >= self._settings.policy.max_attempts or waits > _MAX_RATE_LIMIT_WAITS:
                return failed_outcome(error, f"{error} (after {attempts} attempts)")
            self._stats.retries += 1
            log.bound().info("create_retry", error=str(error), attempt=attempts)
            await anyio.sleep(self._settings.policy.backoff(failures))

    async def _send_create(
        self, lane: KeyLane, entry: Entry, attempts: int, marked: bool, seed: int | None
    ) -> Created | Failed | NotSent:
        """One create through the key's gate: its id (durable before the next create of this
        key is sent), its error and when it was sent, or NotSent when the run was stopped
        first."""
        try:
            async with lane.gate.create(give_way=lambda: self._others_open(lane), room=lane.cap):
                if self._dispatcher.halted:
                    if marked:
                        await self._journal.write(MarkPending(entry.row_number))
                    return NotSent()
                await self._journal.write(
                    MarkCreating(entry.row_number, attempts, lane.key.name, time.time(), seed)
                )
                self._stats.creates_sent += 1
                inputs = entry.inputs if seed is None else {**entry.inputs, "seed": seed}
                signed = inputs if self._uploads is None else self._uploads.presigned(inputs)
                sent = self._clock.now()  # a lost answer's window starts here
                try:
                    prediction_id = await self._client.create(
                        lane.key,
                        signed,
                        webhook_url=self._webhook.url if self._webhook else None,
                        webhook_secret=self._webhook.secret if self._webhook else None,
                    )
                except ApiError as exc:
                    return Failed(exc, sent, self._clock.now(), inputs)
                lane.answered.append(prediction_id)
                self._timeline.answered(prediction_id, sent, self._clock.now())
                lane.cap.started()  # running at the provider until its end is seen
                # so a crash leaves ambiguous only creates whose answers had not come: the
                # key's next `creating` is made durable after this id (updates keep their
                # order), and before that create is sent
                journaled = self._journal.post(
                    MarkCreated(entry.row_number, prediction_id, lane.key.name, time.time())
                )
                return Created(prediction_id, attempts, sent, journaled)
        except GatePaused as paused:
            if marked:
                await self._journal.write(MarkPending(entry.row_number))
            given = replace(entry, status=Status.PENDING, attempts=attempts - 1)
            raise GiveWay(given, paused.wait) from None

    async def _adopt(
        self,
        lane: KeyLane,
        entry: Entry,
        settled: Settled,
        attempts: int,
        sent: float,
        log: JobLog,
    ) -> Created | None:
        """Book how a lost create was settled; the job it made, when one was found, journaled
        and taken up as if its answer had come."""
        self._stats.add(f"creates_{settled.resolution}")
        notes = (
            NoteAmbiguous(entry.row_number),
            NoteResolution(entry.row_number, settled.resolution),
        )
        pid = settled.prediction_id
        if pid is None:
            await self._journal.write(*notes)
            log.bound().info("lost_create_settled", resolution=settled.resolution)
            return None
        lane.answered.append(pid)
        lane.cap.started()  # it runs at the provider until its end is seen
        journaled = self._journal.post(
            *notes, MarkCreated(entry.row_number, pid, lane.key.name, time.time())
        )
        log.bound().warning("lost_create_adopted", prediction_id=pid, resolution=settled.resolution)
        return Created(pid, attempts, sent, journaled)  # its latency counts from its send

    async def resumed_lost(
        self, lane: KeyLane, entry: Entry, log: JobLog
    ) -> Created | Withheld | None:
        """A row a crash left `creating`, looked up with the key that sent it (the dispatcher
        hands it to that key while the run has it) and the input it journaled: the job found,
        None (created again), or Withheld (no proof yet: left for the next run)."""
        sent_at = entry.sent_at or entry.started_at
        now = self._clock.now()
        # its send on the driver's clock (from the journaled wall time: a step of the wall clock
        # between the crash and now moves it; the window's margin takes small ones)
        sent = now - max(0.0, time.time() - sent_at) if sent_at is not None else now
        if entry.key_name != lane.key.name or sent_at is None:
            settled = Settled("unresolved")  # its key is not this run's: it cannot be looked up
        else:
            # the answer was due by the crash at the latest (the run starts after it)
            given_up = min(sent + self._settings.answer_within, now)
            self._lost.seed_for(entry)  # its seed, journaled: a job made with it is ours
            settled = await self._lost.settle(lane, entry, entry.sent_inputs, sent, given_up)
        if settled.resolution == LEFT:
            return Withheld()  # still `creating`: the next run looks it up again
        return await self._adopt(lane, entry, settled, entry.attempts, sent, log)

    async def ambiguous(self, entry: Entry, log: JobLog) -> None:
        """Count a lost create; the journal counts it with how it is settled (`_adopt`), in
        one write, so a crash while it is looked up leaves it counted once, by the resume."""
        self._stats.ambiguous_creates += 1
        log.bound().warning("ambiguous_create", policy=self._settings.ambiguous_creates)

    def ambiguous_outcome(self) -> JobOutcome:
        return JobOutcome(
            Status.FAILED,
            error_type="ambiguous_create",
            error_message="the answer to a create was lost: a job may have been created and "
            "billed; not retried (retries.ambiguous_creates: fail)",
            finished_at=time.time(),
        )

    def _others_open(self, lane: KeyLane) -> bool:
        if any(other is not lane and other.open_for_work() for other in self._lanes):
            return True
        return self._open_elsewhere is not None and self._open_elsewhere()
