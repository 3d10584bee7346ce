"""A perfect client on a run's own jobs: the physical limit a run's span is measured against.

The sandbox draws each create's latency when it admits it, so the i-th create of a run takes the
i-th latency whichever key sent it and whenever it was sent. A perfect client sends the same
creates in the same order, each the moment one of its keys has room in its sliding window and
its account a free slot, and notices every end at once. Its span, from the first create to the
last end, is the shortest any client could have had on those jobs; a run's own span divided into
it is the share of that limit the run reached (1.0 is perfect).

Each create goes to the key that can send it first, which, keys being alike, starts every job
as early as in-order creates allow; so no client's span on the same creates is shorter.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.sandbox.state import ORG_MATE

__all__ = [
    "Creates",
    "Limits",
    "perfect_schedule",
    "perfect_span",
    "run_creates",
    "share_of_perfect",
    "steady_share",
]

_MIDDLE = (0.1, 0.9)  # the steady share: the creates between these quantiles of the run


@dataclass(frozen=True, slots=True)
class Limits:
    """The provider's limits in wall seconds: creates per sliding window per key, and jobs in
    flight per account (a key is its own account unless `groups` groups keys)."""

    creates_per_window: int
    window_s: float
    max_concurrent: int


@dataclass(frozen=True, slots=True)
class Creates:
    """A run's creates, in the order the provider admitted them: when, and for how long."""

    at: tuple[float, ...]
    latency_s: tuple[float, ...]

    @property
    def span_s(self) -> float:
        """From the first create to the last end."""
        if not self.at:
            return 0.0
        return max(t + lat for t, lat in zip(self.at, self.latency_s, strict=True)) - self.at[0]


def run_creates(ledger: Iterable[Mapping[str, Any]]) -> Creates:
    """The creates of a sandbox ledger (its `created` entries, which carry `latency_s`); not
    those of another application of the organisation (`org_traffic`)."""
    made = sorted(
        (float(e["t"]), float(e["latency_s"]))
        for e in ledger
        if e.get("event") == "created" and e.get("key") != ORG_MATE
    )
    return Creates(tuple(t for t, _ in made), tuple(lat for _, lat in made))


class _Key:
    """One key of the perfect client: its creates still in the window."""

    def __init__(self, account: list[float]) -> None:
        self.window: deque[float] = deque()
        self.account = account  # heap of the end times of the account's jobs in flight

    def earliest(self, after: float, limits: Limits) -> float:
        """The first instant from `after` at which this key may create."""
        while self.window and self.window[0] + limits.window_s <= after:
            self.window.popleft()
        while self.account and self.account[0] <= after:
            heapq.heappop(self.account)
        at = after
        full = len(self.window) - limits.creates_per_window
        if full >= 0:  # room once the oldest creates that fill it leave the window
            at = max(at, self.window[full] + limits.window_s)
        busy = len(self.account) - limits.max_concurrent
        if busy >= 0:  # a slot once enough of the account's jobs have ended
            at = max(at, heapq.nsmallest(busy + 1, self.account)[-1])
        return at


def perfect_span(
    latencies: Sequence[float], keys: int, limits: Limits, groups: Sequence[int] = ()
) -> float:
    """The perfect client's span on these creates (in create order) with `keys` keys;
    `groups` gives the sizes of the groups whose keys share one cap (default: one each)."""
    return perfect_schedule(latencies, keys, limits, groups)[1]


def perfect_schedule(
    latencies: Sequence[float], keys: int, limits: Limits, groups: Sequence[int]
) -> tuple[list[float], float]:
    """The perfect client's create instants, and its span."""
    sizes = list(groups) or [1] * keys
    if sum(sizes) != keys:
        raise ValueError(f"groups {sizes} hold {sum(sizes)} keys, not {keys}")
    members: list[_Key] = []
    for size in sizes:
        shared: list[float] = []
        members += [_Key(shared) for _ in range(size)]
    now = last_end = 0.0
    made = []
    for latency in latencies:
        at, key = min((k.earliest(now, limits), i) for i, k in enumerate(members))
        chosen = members[key]
        chosen.window.append(at)
        heapq.heappush(chosen.account, at + latency)
        now, last_end = at, max(last_end, at + latency)
        made.append(at)
    return made, last_end


def share_of_perfect(
    creates: Creates, keys: int, limits: Limits, groups: Sequence[int] = ()
) -> tuple[float, float]:
    """The share of a perfect client a run reached (its span divided into the perfect one),
    and the perfect span in seconds."""
    perfect = perfect_span(creates.latency_s, keys, limits, groups)
    return (perfect / creates.span_s if creates.span_s > 0 else 1.0), perfect


def steady_share(creates: Creates, keys: int, limits: Limits, groups: Sequence[int] = ()) -> float:
    """The share of a perfect client in the run's steady middle: the time the perfect client
    takes from its 10th to its 90th percentile create, divided by the run's (the ramp up and the
    last jobs, which no client overlaps, left out)."""
    n = len(creates.at)
    first, last = (int(q * (n - 1)) for q in _MIDDLE)
    if last <= first:
        return 1.0
    made, _ = perfect_schedule(creates.latency_s, keys, limits, groups)
    ran = creates.at[last] - creates.at[first]
    return (made[last] - made[first]) / ran if ran > 0 else 1.0
