"""What a slot of the key driver holds and hands between its steps: the jobs in flight, the
answers a create or a poll can end in, and the driver's own state."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import structlog

from pipeline.core import (
    ApiError,
    Clock,
    JobOutcome,
    NotFound,
    RunConfig,
    RunStats,
    Status,
    SystemClock,
)
from pipeline.drive.dispatcher import JobSource
from pipeline.drive.lanes import KeyLane
from pipeline.drive.outage import Outage
from pipeline.intake import Uploads
from pipeline.journal import (
    Commits,
    Entry,
)
from pipeline.outputs import Downloader
from pipeline.provider import (
    Callbacks,
    EachlabsClient,
    Execution,
    PollPlanner,
    Prediction,
    ProviderClock,
    RetryPolicy,
    Waiter,
)

_log = structlog.get_logger("pipeline.drive.driver")
_MAX_RATE_LIMIT_WAITS = 50
_SWEEP_SPAN = 1.6  # a key's listing reads, apart, in mean notice delays aimed at


__all__ = [
    "Created",
    "Deferred",
    "DriverBase",
    "DriverSettings",
    "Ended",
    "Flying",
    "GiveWay",
    "JobLog",
    "KeyRefused",
    "Left",
    "NotSent",
    "Track",
    "Webhook",
    "Withheld",
    "failed_outcome",
]


class Flying(NamedTuple):
    """A job being polled: its key, its journal entry, when its create was answered (on the
    worker's monotonic clock) and the attempt it is."""

    lane: KeyLane
    entry: Entry
    created: float
    attempts: int


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

    def woken(self) -> None:
        if self.waiter is not None:
            self.hinted = self.hinted or self.waiter.hinted
            self.waiter.rearm()

    def running(self) -> None:
        """A poll said the job still runs: a hint before it was wrong."""
        if self.hinted and self.waiter is not None:
            self.contradicted, self.hinted = True, False


@dataclass(frozen=True, slots=True)
class DriverSettings:
    """What the key driver takes from the config, every duration on its clock (the sandbox's
    time scale applied)."""

    policy: RetryPolicy
    job_timeout: float
    cancel_grace: float
    confirm_every: float  # how often a cancelled job is polled for its end
    fallback_after: float  # webhook mode: how late a callback may be before a poll
    fallback_interval: float
    price_per_image_usd: float
    creates_per_window: int
    ambiguous_creates: Literal["retry", "fail"]
    timeout_text: str  # the job timeout as the config says it, for messages
    sweep_share: float  # a key's listing is read every this share of the median latency
    sweep_floor: float  # and at most this often
    # a lost create is looked for in its key's listing (polling.listing), this long after its
    # answer was due (wall seconds, scaled); a create's answer comes within `answer_within`
    resolve_lost: bool = False
    lost_settle: float = 0.0
    lost_patience: float = 120.0  # how long a lost create waits for the listing's proof
    outage_after: float = 60.0  # every request failing this long is an outage
    outage_patience: float = 900.0  # probed this long before the run stops sending
    answer_within: float = 30.0
    clock_skew: float = 2.0  # how far the provider's clock may be from ours (wall seconds)

    @classmethod
    def of(cls, config: RunConfig) -> DriverSettings:
        r, p, scaled = config.retries, config.polling, config.scaled
        grace = scaled(p.cancel_grace_s)
        return cls(
            policy=RetryPolicy(
                r.max_attempts,
                scaled(r.backoff_initial_s),
                scaled(r.backoff_max_s),
                scaled(r.retry_after_max_s),
            ),
            job_timeout=scaled(p.job_timeout_s),
            cancel_grace=grace,
            # at most about ten polls in a cancel's grace
            confirm_every=max(scaled(p.min_interval_s), grace / 10),
            fallback_after=scaled(config.webhook.fallback_after_s),
            fallback_interval=scaled(config.webhook.fallback_interval_s),
            price_per_image_usd=config.api.price_per_image_usd,
            creates_per_window=config.limits.creates_per_window,
            ambiguous_creates=r.ambiguous_creates,
            timeout_text=f"{p.job_timeout_s:g} s (polling.job_timeout_s)",
            # the aim is a mean notice delay of delay_fraction of the latency: a read every 1.6
            # of it, so an end waits 0.8 of the aim for the next read on average, and the rest
            # goes to the round trips of the read and of the confirming poll; with
            # delay_fraction null, the poll budget less two (the confirming poll, and a
            # fallback) spread over the slots
            sweep_share=_SWEEP_SPAN * p.delay_fraction
            if p.delay_fraction is not None
            else 1 / (config.limits.max_concurrent * max(1.0, p.polls_per_job - 2)),
            sweep_floor=scaled(p.min_interval_s),
            resolve_lost=p.listing,
            lost_settle=scaled(r.lost_create_settle_s),
            lost_patience=scaled(r.lost_create_patience_s),
            outage_after=scaled(r.outage_after_s),
            outage_patience=scaled(r.outage_patience_s),
            answer_within=config.api.read_timeout_s,
            clock_skew=r.lost_create_skew_s,
        )


@dataclass(frozen=True, slots=True)
class Webhook:
    """Webhook mode: where the provider sends its callbacks, the secret it signs them with,
    and the callbacks received."""

    url: str
    secret: str | None
    callbacks: Callbacks


class DriverBase:
    """What the key driver holds: its parts (client, journal, dispatcher, planner, lanes,
    and the downloader and uploads when kept), its settings, and the jobs in flight. The
    create, poll and booking steps build on it."""

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
        webhook: Webhook | None = None,
        listing: Callbacks | None = None,
        downloader: Downloader | None = None,
        uploads: Uploads | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.lanes = lanes
        self.client = client
        self.journal = journal
        self.dispatcher = dispatcher
        self.planner = planner
        self.stats = stats
        # what wakes a job before its poll: callbacks, or the executions listing (`sweep`)
        self.callbacks = webhook.callbacks if webhook is not None else listing
        self.webhook_url = webhook.url if webhook is not None else None
        # the provider signs its callbacks with it
        self.webhook_secret = webhook.secret if webhook is not None else None
        self._asked: dict[str, bool] = {}  # prediction id -> whether its cancel was answered yes
        self.in_flight: dict[str, Flying] = {}  # prediction id -> its key, row and creation
        # durations and deadlines: monotonic, so a step of the wall clock moves none of them;
        # wall time only for what is journaled and shown
        self.clock: Clock = clock or SystemClock()
        planner.running = self.ages
        self.cancel_all = False  # stopped for good: every job in flight is cancelled
        self.downloader = downloader  # keeps the outputs, when assets.download
        self.uploads = uploads  # signs uploaded inputs, when assets.upload_to
        # on a Ray worker: whether a key of another worker can take a job now
        self.open_elsewhere: Callable[[], bool] | None = None
        self._cost_said = False  # a difference between the provider's cost and ours: said once
        self.no_listing = False  # the provider answered its executions listing 404
        self.org_listing = False  # a key's listing showed another key's job: one read for all
        # lost creates (drive/adopt.py): the provider's clock as the listing shows it, the jobs
        # claimed by a row, the latest seeds drawn, and the inputs read of unknown jobs
        self.timeline = ProviderClock()
        self.claimed: set[str] = set()
        self.drawn: OrderedDict[int, None] = OrderedDict()
        self._got: OrderedDict[str, dict[str, Any] | None] = OrderedDict()
        self.outage = Outage(
            client,
            settings.policy,
            stats,
            after=settings.outage_after,
            patience=settings.outage_patience,
        )

    def _others_open(self, lane: KeyLane) -> bool:
        if any(other is not lane and other.open_for_work() for other in self.lanes):
            return True
        return self.open_elsewhere is not None and self.open_elsewhere()

    async def _listed(
        self,
        lane: KeyLane,
        statuses: tuple[str, ...],
        since: float | None,
        *,
        pages: int,
    ) -> tuple[list[Execution], bool]:
        """The executions of our model in `statuses` (any, when empty) created from `since`
        (the provider's clock; the newest when None), newest first, `pages` pages of 100 at
        most; and whether that was all of them. What it shows of our answered creates teaches
        `timeline`. NotFound when the provider has no listing: said once, and `no_listing`
        set, for the sweeps and the lost creates alike."""
        try:
            listed = await self.client.executions(lane.key, statuses, since, pages=pages)
        except NotFound:
            if not self.no_listing:
                self.no_listing = True
                _log.warning(
                    "listing_unavailable",
                    key=lane.key.name,
                    hint="the provider has no executions listing: each job is polled on the "
                    "schedule, and a lost create is created again and flagged "
                    "possible_duplicate_charge (polling.listing: false says so)",
                )
            raise
        self.stats.listings += listed.pages
        if listed.malformed:
            self.stats.listing_malformed += listed.malformed
        self.timeline.seen(listed.entries)
        return listed.entries, listed.whole

    def ages(self) -> list[float]:
        """Seconds since the create of each job in flight: lower bounds on their latencies."""
        now = self.clock.now()
        return [now - job.created for job in self.in_flight.values()]

    def flying_lanes(self) -> list[KeyLane]:
        """The lane of each job in flight, for the progress view."""
        return [job.lane for job in self.in_flight.values()]
