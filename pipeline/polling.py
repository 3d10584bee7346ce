"""When to poll: learn how long jobs take, poll first near the expected end, then tightly.

The provider reports each finished job's `predict_time`; the planner keeps the latest of them
and polls a job first at a low quantile of that distribution, then every `2 x target_delay`
(so a job's end is noticed `target_delay` late on average), backing off for jobs that run far
longer than the learned distribution says. Before enough jobs have ended it assumes
`expected_latency_s` with a 20 % spread. All values are wall seconds.
"""

from __future__ import annotations

import bisect
from collections import deque

__all__ = ["PollPlanner"]

_MIN_SAMPLES = 8
_FIRST_QUANTILE = 0.05
_LATE_QUANTILE = 0.99


class PollPlanner:
    def __init__(
        self,
        *,
        expected_latency: float,
        target_delay: float,
        min_interval: float,
        max_interval: float,
        memory: int = 512,
    ) -> None:
        self._expected = expected_latency
        self._step = min(max(2 * target_delay, min_interval), max_interval)
        self._min = min_interval
        self._max = max_interval
        self._recent: deque[float] = deque(maxlen=memory)
        self._sorted: list[float] = []

    def observe(self, latency: float) -> None:
        """A job took `latency` seconds on the provider."""
        if latency <= 0:
            return
        if len(self._recent) == self._recent.maxlen:
            old = self._recent[0]
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._recent.append(latency)
        bisect.insort(self._sorted, latency)

    def quantile(self, q: float) -> float:
        if len(self._sorted) < _MIN_SAMPLES:
            # a prior: 20 % spread around the configured expectation
            return self._expected * (0.7 + 0.6 * q)
        index = min(len(self._sorted) - 1, max(0, round(q * (len(self._sorted) - 1))))
        return self._sorted[index]

    def first_delay(self) -> float:
        """Seconds after the create's answer to poll first."""
        return max(self._min, self.quantile(_FIRST_QUANTILE) - self._step / 2)

    def next_delay(self, elapsed: float) -> float:
        """Seconds to wait before the next poll, `elapsed` seconds after the create."""
        late = self.quantile(_LATE_QUANTILE)
        if elapsed <= late:
            return self._step
        # beyond what the learned distribution expects: back off, up to max_interval
        return min(self._max, max(self._step, (elapsed - late) / 2))
