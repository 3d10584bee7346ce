"""A create whose answer was lost, settled on the provider's evidence, never on its absence: the
provider has no idempotency key, so such a create may have made (and billed) a job we cannot
see, and today its executions listing is the whole organisation's (other keys, other
applications, other runs).

Proof that a job is the row's: every create is sent with a seed (drawn and journaled before the
first send when the row's input has none, and kept for the row's later creates), so the input a
job's `GET` shows names the row; a job of another run, key or application, or of an identical
row, never matches. A job claimed by one row is held (`claimed`) before any other lookup can
see it, and released if that lookup fails before it is done.

Proof that nothing was made: the listing is read from the earliest provider instant the job
can have been made (the provider's clock learned from the run's own answered creates,
`ProviderClock`), and it must already show a job made after the latest such instant: the
listing has caught up past the send. Until then the row waits and is looked up again, for
`retries.lost_create_patience_s`; then it is `unresolved` (below). A run that stops meanwhile
leaves it `creating` (`LEFT`), counted as possibly billed, for the next run to look up.
Without a listing, or where the `GET` shows no input, nothing can be proven: the create is
`unresolved`, created again under `retries.ambiguous_creates` and flagged as a possible
duplicate charge. Executions that carry a seed this run drew and that no row claims are kept
as orphans (proven ours) for the summary.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from pipeline.core import SEED_RANGE, ApiError, Clock, NotFound, RunStats
from pipeline.drive.dispatcher import JobSource
from pipeline.drive.flight import InFlight
from pipeline.drive.lanes import KeyLane
from pipeline.drive.listings import Listings
from pipeline.drive.settings import DriverSettings
from pipeline.journal import Commits, Entry
from pipeline.provider import EachlabsClient, Execution

__all__ = ["LEFT", "LostCreates", "Settled", "same_input"]

LEFT = "left"  # no proof either way before the run ends: left `creating` for the next run
_log = structlog.get_logger("pipeline.drive.adopt")
_PAGES = 20  # a window holding more executions than these pages is left unresolved
_DRAWN = 100_000  # the latest seeds drawn, kept to know a job of ours among the listing's
_GOT = 4096  # inputs read with a GET, kept so a waiting lookup does not read them again


@dataclass(frozen=True, slots=True)
class Settled:
    """How a lost create was settled (one of RESOLUTIONS), and the job adopted, if any."""

    resolution: str
    prediction_id: str | None = None


class LostCreates:
    """Looking a lost create up in the listing; the seeds that name the rows' jobs."""

    def __init__(
        self,
        settings: DriverSettings,
        client: EachlabsClient,
        journal: Commits,
        dispatcher: JobSource,
        stats: RunStats,
        listings: Listings,
        flight: InFlight,
        lanes: Sequence[KeyLane],
        clock: Clock,
        *,
        presigned: bool = False,
    ) -> None:
        self._settings = settings
        self._client = client
        self._journal = journal
        self._dispatcher = dispatcher
        self._stats = stats
        self._listings = listings
        self._flight = flight
        self._lanes = lanes
        self._clock = clock
        self._presigned = presigned  # inputs uploaded: their URLs are signed for each create
        self.claimed: set[str] = set()  # the jobs claimed by a row
        self.drawn: OrderedDict[int, None] = OrderedDict()  # the latest seeds drawn
        # the inputs read of unknown jobs
        self._got: OrderedDict[str, dict[str, Any] | None] = OrderedDict()

    def seed_for(self, entry: Entry) -> int | None:
        """The seed of a row whose input has none: the one journaled for it, or one drawn now
        (journaled before its create is sent, and kept for its creates after); None when the
        row brings its own."""
        if "seed" in entry.inputs:
            return None
        seed = entry.sent_seed
        if seed is None:
            seed = secrets.randbelow(SEED_RANGE[1] + 1)
        self.drawn[seed] = None
        if len(self.drawn) > _DRAWN:
            self.drawn.popitem(last=False)
        return seed

    async def settle(
        self, lane: KeyLane, entry: Entry, inputs: dict[str, Any], sent: float, given_up: float
    ) -> Settled:
        """How the create of `entry` with `inputs`, sent at `sent` and given up at `given_up`
        (the driver's clock), is settled; looked up again while the listing cannot tell yet."""
        if not self._settings.resolve_lost or self._listings.missing:
            return Settled("unresolved")
        given_up += self._settings.lost_settle  # a provider may still make it a moment later
        deadline = given_up + self._settings.lost_patience
        await anyio.sleep(max(0.0, given_up - self._clock.now()))
        failures = 0
        while True:
            try:
                settled = await self._look_up(lane, entry, inputs, sent, given_up)
            except NotFound:  # said once by the listings
                return Settled("unresolved")
            except ApiError as exc:
                failures += 1
                if not exc.retryable or failures >= self._settings.policy.max_attempts:
                    _log.info("lost_create_unresolved", key=lane.key.name, error=str(exc))
                    return Settled("unresolved")
                settled = None
            if settled is not None:
                return settled
            if self._dispatcher.halted:
                # the run stops: it stays `creating`, counted as possibly billed, and the next
                # run looks it up again
                return Settled(LEFT)
            if self._clock.now() >= deadline:
                # no proof came (no later job in the listing): flagged, never silently
                _log.warning("lost_create_unproven", key=lane.key.name, row=entry.row_number)
                return Settled("unresolved")
            self._stats.lost_create_waits += 1
            await anyio.sleep(max(self._settings.lost_settle, self._settings.sweep_floor))

    async def _look_up(
        self, lane: KeyLane, entry: Entry, inputs: dict[str, Any], sent: float, given_up: float
    ) -> Settled | None:
        """The lost create settled from one read of the listing, or None while it cannot tell
        (the provider's clock not learned yet, or the listing not caught up)."""
        clock = self._listings.timeline
        margin = self._settings.clock_skew  # the listing's times are rounded, and may jitter
        # before the provider's clock is learned: its newest entries (a job matched there is
        # proven all the same; only "nothing was made" needs the clock)
        since = clock.earliest(sent) - margin if clock.learned else None
        found, whole = await self._listings.read(lane, (), since, pages=_PAGES)
        window = found
        if clock.learned:
            latest = clock.latest(given_up) + margin
            window = [e for e in found if e.created_at is None or e.created_at <= latest]
        settled = await self._match(lane, entry, inputs, await self._unknown(window))
        if settled is not None:
            return settled
        if since is None or not clock.learned:
            return None
        if not whole:
            return Settled("unresolved")  # more of the window than can be read
        return Settled("recreated") if clock.covers(found, given_up + margin) else None

    async def _unknown(self, window: list[Execution]) -> list[Execution]:
        """The window's executions that are no row's job."""
        mine = {pid for lane in self._lanes for pid in lane.answered}
        mine |= set(self._flight) | self.claimed
        rest = [e for e in window if e.prediction_id not in mine]
        known = await self._journal.known([e.prediction_id for e in rest])
        return [e for e in rest if e.prediction_id not in known]

    async def _match(
        self, lane: KeyLane, entry: Entry, inputs: dict[str, Any], unknown: list[Execution]
    ) -> Settled | None:
        """The row's job among `unknown`, claimed at once; `unresolved` when a `GET` shows no
        input (nothing can be proven then); None when none of them is the row's."""
        blind = False
        presigned = self._presigned
        claim: Execution | None = None
        try:
            for execution in reversed(unknown):  # oldest first: the row's first job is claimed
                pid = execution.prediction_id
                theirs = await self._input_of(lane, pid)
                if theirs is None:
                    blind = True
                elif pid in self.claimed:
                    continue
                elif claim is None and same_input(theirs, inputs, presigned=presigned):
                    claim = execution
                    self.claimed.add(pid)  # no await between the check and the claim
                    self._stats.orphan_candidates.pop(pid, None)
                elif theirs.get("seed") in self.drawn:
                    self._orphan(lane, execution)  # ours (a seed we drew), and no row's
        except BaseException:
            if claim is not None:  # a later read failed: the lookup is made again, unclaimed
                self.claimed.discard(claim.prediction_id)
            raise
        if claim is not None:
            return Settled("adopted", claim.prediction_id)
        return Settled("unresolved") if blind else None

    async def _input_of(self, lane: KeyLane, prediction_id: str) -> dict[str, Any] | None:
        """The input a job was created with, as its `GET` shows it (read once); {} for a job
        the key cannot read (not the organisation's: not ours); None when the `GET` has none."""
        if prediction_id in self._got:
            return self._got[prediction_id]
        try:
            theirs = await self._client.created_with(lane.key, prediction_id)
        except NotFound:
            theirs = {}
        self._got[prediction_id] = theirs
        if len(self._got) > _GOT:
            self._got.popitem(last=False)
        return theirs

    def _orphan(self, lane: KeyLane, e: Execution) -> None:
        """A job made with a seed this run drew that no row claims: billed to us, for nobody."""
        self._stats.orphan_candidates[e.prediction_id] = {
            "prediction_id": e.prediction_id,
            "key": lane.key.name,
            "status": e.status,
            "cost_usd": e.cost_usd,
            "created_at": e.created_at,
        }


def same_input(theirs: dict[str, Any], ours: dict[str, Any], *, presigned: bool) -> bool:
    """Whether a job was created with this input: each field we send, as we send it (an
    uploaded input's URL is signed afresh for each create: compared without its query); a
    field the provider adds of its own (a default) is not ours to compare."""
    return all(
        k in theirs and _bare(theirs[k], presigned) == _bare(v, presigned) for k, v in ours.items()
    )


def _bare(value: Any, presigned: bool) -> Any:
    if presigned and isinstance(value, str) and value.startswith(("http://", "https://")):
        return value.split("?", 1)[0]
    return value
