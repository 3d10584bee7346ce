"""Where the provider's clock stands against ours, learned from the run's own answered creates,
and what that proves about a window of its executions listing.

The listing's `created_at` is on the provider's clock, which may be any distance from ours. A
create of ours sent at `s` and answered at `a` (our monotonic clock) whose entry says `c` was
made between the two, so the offset `c - t` of the provider's clock over ours lies in
`[c - a, c - s]`; every such create narrows the interval, and no step of our wall clock moves
it. A lost create sent at `s` and given up at `f` made its job, if any, at a provider time in
`[s + lo, f + hi]`. The listing is taken to show jobs in the order the provider made them, a
while after (its lag): once it shows an entry made after `f + hi` (plus the time a provider may
take to make a job after its answer was lost), it holds every job made before, and a window
with no job of the row's in it proves that nothing was made.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable

from pipeline.provider.listing import Execution

__all__ = ["ProviderClock"]

_KEPT = 4096  # answered creates kept to learn from until the listing shows them


class ProviderClock:
    """The interval the provider's clock's offset over ours is known to lie in."""

    def __init__(self) -> None:
        self.low = -math.inf
        self.high = math.inf
        self._answered: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def learned(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def answered(self, prediction_id: str, sent: float, answered: float) -> None:
        """A create of ours, sent and answered at these instants (our monotonic clock)."""
        self._answered[prediction_id] = (sent, answered)
        while len(self._answered) > _KEPT:
            self._answered.popitem(last=False)

    def seen(self, entries: Iterable[Execution]) -> None:
        """Learn from the listing's entries of our answered creates."""
        for entry in entries:
            times = self._answered.pop(entry.prediction_id, None)
            if times is None or entry.created_at is None:
                continue
            low, high = entry.created_at - times[1], entry.created_at - times[0]
            if max(low, self.low) > min(high, self.high):
                # the provider's clock stepped: only what it says now holds
                self.low, self.high = low, high
            else:
                self.low, self.high = max(low, self.low), min(high, self.high)

    def earliest(self, sent: float) -> float:
        """The earliest provider time a job sent at `sent` (ours) can have been made."""
        return sent + self.low

    def latest(self, given_up: float) -> float:
        """The latest provider time a job whose create was given up at `given_up` (ours, the
        provider's time to make a job included) can have been made."""
        return given_up + self.high

    def covers(self, entries: Iterable[Execution], given_up: float) -> bool:
        """Whether the listing, showing `entries`, has caught up past a create given up at
        `given_up`: it shows a job made after the latest instant that create's job could be."""
        if not self.learned:
            return False
        latest = self.latest(given_up)
        return any(e.created_at is not None and e.created_at > latest for e in entries)
