"""A key's executions listing read while its jobs may be ending: one request tells the ends of
all of them, where a poll tells one. Each end the listing shows wakes its job, which a poll
then confirms (the listing is a hint, as a callback is: invariant 3).

A key's listing is read every 1.6 `delay_fraction` of the median latency (at least
`polling.min_interval_s`): an end waits 0.8 of the mean notice delay aimed at for the next
read, and the rest is the read's and the confirming poll's round trips. It is read only while a
job of the key has been running as long as the shortest jobs take. It asks for the ended
executions of our model created since the key's oldest job in flight (on the provider's clock
as the listing shows it, less `retries.lost_create_skew_s`), a page of 100, and the next pages while
pages come full. A failed read is
tried again at the next turn; a provider without the listing (404) ends the sweeps, and every
job is polled on the schedule. Today the listing is the organisation's: its other keys' and
applications' jobs are in it: once a key's read shows another key's job, one key's reads (the
first still serving) wake the jobs of every key of the process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog

from pipeline.core import ApiError, Clock, NotFound
from pipeline.drive.flight import InFlight
from pipeline.drive.lanes import KeyLane
from pipeline.drive.listings import Listings
from pipeline.drive.settings import DriverSettings
from pipeline.provider import ENDED, Callbacks, Execution, PollPlanner

__all__ = ["Sweeper"]

_log = structlog.get_logger("pipeline.drive.sweeps")
_PAGES = 5  # pages read in one turn at most; a job on a later one is woken at the next turn


class Sweeper:
    """The listing's reads, one task per key (one read for all where the listing is the
    organisation's); each end it shows is a hint to `hints`."""

    def __init__(
        self,
        settings: DriverSettings,
        listings: Listings,
        flight: InFlight,
        planner: PollPlanner,
        lanes: Sequence[KeyLane],
        clock: Clock,
        hints: Callbacks | None,
    ) -> None:
        self._settings = settings
        self._listings = listings
        self._flight = flight
        self._planner = planner
        self._lanes = lanes
        self._clock = clock
        self._hints = hints

    async def sweep(self, lane: KeyLane) -> None:
        """Read the key's listing until cancelled (when the key's slots have ended)."""
        hints = self._hints
        if hints is None or hints.source != "listing":
            return
        while True:
            await asyncio.sleep(self._sweep_every())
            if self._listings.organisation_wide and lane is not self._sweeper(lane):
                continue  # one key's reads show the ends of every key's jobs
            every_key = self._listings.organisation_wide
            mine = {
                pid: job.created
                for pid, job in self._flight.items()
                if every_key or job.lane is lane
            }
            if not mine:
                continue
            now = self._clock.now()
            oldest = min(mine.values())
            if now - oldest < self._planner.quantile(0.01):
                continue  # none of them can have ended yet
            # the provider's creation times are on its clock: learned from our creates the
            # listing shows (until then, the newest pages, which show them)
            timeline = self._listings.timeline
            since = (
                timeline.earliest(oldest) - self._settings.clock_skew if timeline.learned else None
            )
            try:
                found, _ = await self._listings.read(lane, ENDED, since, pages=_PAGES)
            except NotFound:  # said once by the listings
                hints.give_up()
                return
            except ApiError as exc:
                _log.info("listing_retry", key=lane.key.name, error=str(exc))
                continue
            for execution in found:
                if execution.prediction_id in mine:
                    hints.hint(execution.prediction_id)
            if not every_key and self._shows_others(lane, found):
                self._listings.shows_every_key()

    def _sweeper(self, lane: KeyLane) -> KeyLane:
        """The key whose reads serve every key of this process: the first still serving."""
        return next((k for k in self._lanes if k.serving > 0 and not k.retired), lane)

    def _shows_others(self, lane: KeyLane, found: list[Execution]) -> bool:
        """Whether a key's listing shows a job of another key of ours: the organisation's."""
        for e in found:
            job = self._flight.get(e.prediction_id)
            if job is not None and job.lane is not lane:
                return True
        return False

    def _sweep_every(self) -> float:
        settings = self._settings
        return max(settings.sweep_floor, settings.sweep_share * self._planner.quantile(0.5))
