"""A key's executions listing read while its jobs may be ending: one request tells the ends of
all of them, where a poll tells one. Each end the listing shows wakes its job, which a poll
then confirms (the listing is a hint, as a callback is: invariant 3).

A key's listing is read every 1.6 `delay_fraction` of the median latency (at least
`polling.min_interval_s`): an end waits 0.8 of the mean notice delay aimed at for the next
read, and the rest is the read's and the confirming poll's round trips. It is read only while a
job of the key has been running as long as the shortest jobs take. It asks for the ended
executions of our model created since the key's oldest job in flight (less `_SKEW_S` for the
provider's clock), a page of 100, and the next pages while pages come full. A failed read is
tried again at the next turn; a provider without the listing (404) ends the sweeps, and every
job is polled on the schedule.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from pipeline.core import ApiError, NotFound
from pipeline.drive.lanes import KeyLane
from pipeline.drive.slot import DriverBase
from pipeline.provider import ENDED

__all__ = ["Sweeps"]

_log = structlog.get_logger("pipeline.drive.sweeps")
_SKEW_S = 2.0  # how far the provider's clock may be behind ours: its creation times are its own
_PAGE = 100
_PAGES = 5  # pages read in one turn at most; a job on a later one is woken at the next turn


class Sweeps(DriverBase):
    """The listing's reads, one task per key."""

    async def sweep(self, lane: KeyLane) -> None:
        """Read the key's listing until cancelled (when the key's slots have ended)."""
        hints = self.callbacks
        if hints is None or hints.source != "listing":
            return
        while True:
            await asyncio.sleep(self._sweep_every())
            mine = {pid: job.created for pid, job in self.in_flight.items() if job.lane is lane}
            if not mine:
                continue
            now = self.clock.now()
            oldest = min(mine.values())
            if now - oldest < self.planner.quantile(0.01):
                continue  # none of them can have ended yet
            since = time.time() - (now - oldest) - _SKEW_S
            try:
                ended = await self._ended_since(lane, since)
            except NotFound:
                _log.warning(
                    "listing_unavailable",
                    key=lane.key.name,
                    hint="the provider has no executions listing: each job is polled on the "
                    "schedule (polling.listing: false says so)",
                )
                hints.give_up()
                return
            except ApiError as exc:
                _log.info("listing_retry", key=lane.key.name, error=str(exc))
                continue
            for prediction_id in ended & mine.keys():
                hints.hint(prediction_id)

    async def _ended_since(self, lane: KeyLane, since: float) -> set[str]:
        """The ids of the key's executions that have ended, created from `since`."""
        ended: set[str] = set()
        for _ in range(_PAGES):
            found, total = await self.client.executions(
                lane.key, ENDED, since, limit=_PAGE, offset=len(ended)
            )
            self.stats.listings += 1
            ended.update(e.prediction_id for e in found)
            if len(found) < _PAGE or len(ended) >= total:
                break
        return ended

    def _sweep_every(self) -> float:
        settings = self.settings
        return max(settings.sweep_floor, settings.sweep_share * self.planner.quantile(0.5))
