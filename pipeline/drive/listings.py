"""The executions listing as the driver's parts read it: the sweeps (ends to wake jobs) and the
lost-create lookups (proof of a job, or of none) share one reader, so the provider's clock it
learns, its absence (404) and its reach (the organisation's) are known once for both."""

from __future__ import annotations

import structlog

from pipeline.core import NotFound, RunStats
from pipeline.drive.lanes import KeyLane
from pipeline.provider import EachlabsClient, Execution, ProviderClock

__all__ = ["Listings"]

_log = structlog.get_logger("pipeline.drive.listings")


class Listings:
    """One process's reads of its keys' executions listings."""

    def __init__(self, client: EachlabsClient, stats: RunStats) -> None:
        self._client = client
        self._stats = stats
        # the provider's clock as the listing shows it, learned from our answered creates
        self.timeline = ProviderClock()
        self.missing = False  # the provider answered its executions listing 404
        self.organisation_wide = False  # a key's listing showed another key's job

    def shows_every_key(self) -> None:
        """A key's listing showed another key's job: from now one key's reads serve all."""
        if not self.organisation_wide:
            self.organisation_wide = True
            _log.info("listing_organisation_wide", hint="one key's reads serve every key")

    async def read(
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
        `timeline`. NotFound when the provider has no listing: said once, and `missing` set,
        for the sweeps and the lost creates alike."""
        try:
            listed = await self._client.executions(lane.key, statuses, since, pages=pages)
        except NotFound:
            if not self.missing:
                self.missing = True
                _log.warning(
                    "listing_unavailable",
                    key=lane.key.name,
                    hint="the provider has no executions listing: each job is polled on the "
                    "schedule, and a lost create is created again and flagged "
                    "possible_duplicate_charge (polling.listing: false says so)",
                )
            raise
        self._stats.listings += listed.pages
        if listed.malformed:
            self._stats.listing_malformed += listed.malformed
        self.timeline.seen(listed.entries)
        return listed.entries, listed.whole
