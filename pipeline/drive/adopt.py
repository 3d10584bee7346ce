"""A create whose answer was lost, settled at the provider rather than guessed: the provider has
no idempotency key, so such a create may have made (and billed) a job we cannot see.

The key's executions listing is read over the create's window (from its send to when its answer
was due, widened by `retries.lost_create_skew_s` for the provider's clock), once
`retries.lost_create_settle_s` has passed for the listing to catch up. Every execution there
that is no row's job (not in the journal, not among the key's answered creates) is read with a
`GET`: one created with the row's input is the row's job, adopted as if its answer had come
(`adopted`). Once the provider's `GET` is seen to carry no input, each key's creates go one at a
time (`KeyLane.serial`), and a window is read with the key's creates held: its one unknown
execution is the lost create's (`adopted_by_time`). No unknown execution at all: the create made
nothing, and the row is created again (`recreated`). Anything else, or no listing (404, a failed
read, polling.listing: false), is `unresolved`: the row is created again as before, flagged as a
possible duplicate charge. Executions of our model seen in a window and claimed by no row are
kept as orphan candidates for the summary.
"""

from __future__ import annotations

import time
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from pipeline.core import ApiError, NotFound
from pipeline.drive.lanes import KeyLane
from pipeline.drive.slot import DriverBase
from pipeline.journal import Entry
from pipeline.provider import Execution

__all__ = ["Adoptions", "Settled"]

_log = structlog.get_logger("pipeline.drive.adopt")
_PAGES = 20  # a window holding more of the key's creates than this is left unresolved


@dataclass(frozen=True, slots=True)
class Settled:
    """How a lost create was settled (one of RESOLUTIONS), and the job adopted, if any."""

    resolution: str
    prediction_id: str | None = None


class Adoptions(DriverBase):
    """Looking a lost create up in its key's listing."""

    _blind = False  # a GET showed no input: each key's creates go one at a time from then on

    def _one_at_a_time(self, lane: KeyLane) -> AbstractAsyncContextManager[object]:
        """The key's creates one at a time once the provider's GET is known to show no input,
        so a window read while holding it has no create of the key out."""
        return lane.serial if self._blind else nullcontext()

    async def _settle_lost(
        self, lane: KeyLane, entry: Entry, sent_at: float, due_by: float
    ) -> Settled:
        """How the create of `entry` sent at `sent_at` (wall seconds) whose answer was due
        by `due_by` is settled; `unresolved` when the listing cannot tell."""
        if not self.settings.resolve_lost or self.no_listing:
            return Settled("unresolved")
        settle = due_by + self.settings.lost_settle - time.time()
        if settle > 0:
            await anyio.sleep(settle)
        policy = self.settings.policy
        for attempt in range(1, policy.max_attempts + 1):
            try:
                return await self._look_up(lane, entry, sent_at, due_by)
            except NotFound:  # said once by `_listed`
                break
            except ApiError as exc:
                if not exc.retryable or attempt == policy.max_attempts:
                    _log.info("lost_create_unresolved", key=lane.key.name, error=str(exc))
                    break
                await anyio.sleep(policy.backoff(attempt))
        return Settled("unresolved")

    async def _look_up(self, lane: KeyLane, entry: Entry, sent_at: float, due_by: float) -> Settled:
        skew = self.settings.clock_skew  # the provider's creation times are on its clock
        while True:
            blind = self._blind
            async with self._one_at_a_time(lane):
                window = await self._window(lane, sent_at - skew, due_by + skew)
                if window is None:
                    return Settled("unresolved")
                out = lane.unanswered  # the key's creates out now may be in the window, unknown
                unknown = await self._unknown(lane, window)
            settled = await self._match(lane, entry, unknown, alone=out == 0)
            if blind or not self._blind or settled.resolution != "unresolved":
                return settled
            # the provider was found to show no input just now: once more, the key held

    async def _window(self, lane: KeyLane, since: float, until: float) -> list[Execution] | None:
        """The key's executions of our model created in the window, oldest first; None when
        there are more than `_PAGES` pages of them."""
        found, whole = await self._listed(lane, (), since, until=until, pages=_PAGES)
        return found[::-1] if whole else None

    async def _unknown(self, lane: KeyLane, window: list[Execution]) -> list[Execution]:
        """The window's executions that are no row's job."""
        mine = set(lane.answered) | self.in_flight.keys()
        rest = [e for e in window if e.prediction_id not in mine]
        known = await self.journal.known([e.prediction_id for e in rest])
        return [e for e in rest if e.prediction_id not in known]

    async def _match(
        self, lane: KeyLane, entry: Entry, unknown: list[Execution], *, alone: bool
    ) -> Settled:
        blind: list[Execution] = []
        for execution in unknown:
            inputs = await self.client.created_with(lane.key, execution.prediction_id)
            if inputs is None:
                self._blind = True
                blind.append(execution)
            elif same_input(inputs, entry.inputs, presigned=self.uploads is not None):
                self._unclaimed(lane, unknown, but=execution)
                return Settled("adopted", execution.prediction_id)
        if blind and len(unknown) == 1 and alone:
            return Settled("adopted_by_time", blind[0].prediction_id)
        self._unclaimed(lane, unknown, but=None)
        return Settled("unresolved" if blind else "recreated")

    def _unclaimed(self, lane: KeyLane, unknown: list[Execution], but: Execution | None) -> None:
        """Executions no row claimed yet: orphans unless a row's job by the run's end."""
        for e in unknown:
            if e is not but:
                self.stats.orphan_candidates[e.prediction_id] = {
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
