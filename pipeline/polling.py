"""When to poll: learn how long jobs take, and poll at the times that notice a job's end soonest
for a given number of polls.

The provider reports each finished job's `predict_time`; the planner keeps the latest of them
and, from time to time, computes a poll schedule over that distribution: the poll times
(seconds after the create) that minimise the expected delay between a job's end and our
noticing it, with at most `polls_per_job` polls per job on average. It is the classic
inspection-schedule problem, solved exactly over a grid of quantiles by dynamic programming,
with a bisection on the price of one poll. Jobs that outlive the schedule are polled every
`step`, backing off as they grow late.

The distribution is the learned ends themselves once there are `_EMPIRICAL` of them. Before
that, a handful of ends would make a poor one: they are the soonest ends of the jobs started
together (the slower ones are still running), their last is no bound on the next job, and every
job that outlives it is polled at the short `step`. So until then it is a lognormal: before
`_MIN_SAMPLES` ends, `expected_latency_s` with a 25 % spread (the prior); then fitted to the ends
seen with the prior counted as `_PRIOR_WEIGHT` more, its spread widened by the doubt of a small
sample. All values are wall seconds.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from itertools import accumulate

__all__ = ["PollPlanner", "poll_schedule"]

_MIN_SAMPLES = 8  # ends seen before a lognormal is fitted to them
_EMPIRICAL = 64  # ends seen before the schedule follows them, not a fitted lognormal
_PRIOR_SPREAD = 0.25  # coefficient of variation assumed before any end is seen
_MODEL_POINTS = 64  # quantiles of a lognormal the schedule is planned over
_WIDEN = 1.0  # a fit's spread is widened by this over the square root of its ends
_PRIOR_WEIGHT = 8  # pseudo-ends the prior counts for in a fit: the first ends are the soonest ones
_GRID = 48  # quantile points the schedule may poll at
_TAIL_QUANTILE = 0.995


def poll_schedule(samples: list[float], polls_per_job: float) -> list[float]:
    """Poll times (ascending) over sorted `samples` minimising the mean delay from a job's end
    to the poll that notices it, with at most `polls_per_job` polls per job on average."""
    n = len(samples)
    if n == 0:
        return []
    m = min(_GRID, n)
    grid = sorted({samples[min(n - 1, round((i + 1) * n / m) - 1)] for i in range(m)})
    m = len(grid)
    # each grid point stands for the samples up to it
    counts = [bisect.bisect_right(samples, g) for g in grid]
    weight = [(counts[i] - (counts[i - 1] if i else 0)) / n for i in range(m)]
    mass = list(accumulate(weight))  # P(end <= grid[i])
    moment = list(accumulate(w * g for w, g in zip(weight, grid, strict=True)))

    def solve(price: float) -> tuple[list[float], float]:
        """The best schedule when a poll costs `price` seconds of delay, and its polls per job."""
        # best[j]: the least cost of noticing every end up to grid[j] with a poll at grid[j]
        best = [0.0] * m
        back = [-1] * m
        for j in range(m):
            g = grid[j]
            # first poll at grid[j]: every job is polled, ends up to it wait until it
            cost = price + g * mass[j] - moment[j]
            arg = -1
            for p in range(j):
                caught = mass[j] - mass[p]
                c = best[p] + price * (1 - mass[p]) + g * caught - (moment[j] - moment[p])
                if c < cost:
                    cost, arg = c, p
            best[j], back[j] = cost, arg
        chosen: list[int] = []
        j = m - 1
        while j >= 0:
            chosen.append(j)
            j = back[j]
        chosen.reverse()
        # a poll is paid for every job still running when it comes
        polls = sum(1 - (mass[p] if p >= 0 else 0.0) for p in [-1, *chosen[:-1]])
        return [grid[j] for j in chosen], polls

    schedule, polls = solve(0.0)
    if polls <= polls_per_job:
        return schedule
    low, high = 0.0, max(grid) * 4 + 1e-9  # above max(grid) a single last poll is best
    schedule, _ = solve(high)
    for _ in range(16):  # to 1/65536 of the range: finer than any clock here
        mid = (low + high) / 2
        times, polls = solve(mid)
        if polls <= polls_per_job:
            schedule, high = times, mid
        else:
            low = mid
    return schedule


class PollPlanner:
    def __init__(
        self,
        *,
        expected_latency: float,
        target_delay: float,
        min_interval: float,
        max_interval: float,
        polls_per_job: float = 3.0,
        memory: int = 512,
    ) -> None:
        self._expected = expected_latency
        self._step = min(max(2 * target_delay, min_interval), max_interval)
        self._min = min_interval
        self._max = max_interval
        self._budget = polls_per_job
        self._recent: deque[float] = deque(maxlen=memory)
        self._sorted: list[float] = []
        self._schedule: list[float] = []
        self._seen = 0
        self._next_plan = _MIN_SAMPLES
        self._stale = False
        self._model: statistics.NormalDist | None = None
        self._plan()

    def observe(self, latency: float) -> None:
        """A job took `latency` seconds on the provider."""
        if latency <= 0:
            return
        if len(self._recent) == self._recent.maxlen:
            old = self._recent[0]
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._recent.append(latency)
        bisect.insort(self._sorted, latency)
        self._seen += 1
        if self._seen >= self._next_plan:
            # often while learning, then every half of the memory
            self._next_plan = min(self._seen * 2, self._seen + (self._recent.maxlen or 512) // 2)
            self._stale = True  # planned when next asked for: webhook mode may never ask

    def _plan(self) -> None:
        self._stale = False
        self._model = self._fit()
        if self._model is None:
            samples = self._sorted
        else:
            samples = [self.quantile((i + 0.5) / _MODEL_POINTS) for i in range(_MODEL_POINTS)]
        # one poll of the budget is kept for jobs beyond the schedule and for retries
        self._schedule = [
            max(self._min, t) for t in poll_schedule(samples, max(1.0, self._budget - 0.2))
        ]

    def _fit(self) -> statistics.NormalDist | None:
        """The distribution of log latencies while too few ends are known to follow them
        (None once enough are): fitted to the ends seen, or the prior before that."""
        n = len(self._sorted)
        if n >= _EMPIRICAL:
            return None
        sigma = math.sqrt(math.log(1 + _PRIOR_SPREAD**2))
        prior = statistics.NormalDist(math.log(self._expected) - sigma**2 / 2, sigma)
        if n < _MIN_SAMPLES:
            return prior
        logs = statistics.NormalDist.from_samples(math.log(x) for x in self._sorted)
        # the mixture of the ends seen and the prior, weighted by their counts
        w = n / (n + _PRIOR_WEIGHT)
        mean = w * logs.mean + (1 - w) * prior.mean
        var = w * (logs.variance + (logs.mean - mean) ** 2)
        var += (1 - w) * (prior.variance + (prior.mean - mean) ** 2)
        return statistics.NormalDist(mean, math.sqrt(var) * (1 + _WIDEN / math.sqrt(n)))

    def quantile(self, q: float) -> float:
        if self._stale:
            self._plan()
        if self._model is not None:
            return math.exp(self._model.inv_cdf(min(max(q, 1e-4), 1 - 1e-4)))
        index = min(len(self._sorted) - 1, max(0, round(q * (len(self._sorted) - 1))))
        return self._sorted[index]

    def first_delay(self) -> float:
        """Seconds after the create's answer to poll first."""
        if self._stale:
            self._plan()
        return self._schedule[0] if self._schedule else self._step

    def next_delay(self, elapsed: float) -> float:
        """Seconds to wait before the next poll, `elapsed` seconds after the create."""
        if self._stale:
            self._plan()
        index = bisect.bisect_right(self._schedule, elapsed + 1e-9)
        if index < len(self._schedule):
            return max(self._min, self._schedule[index] - elapsed)
        late = max(self.quantile(_TAIL_QUANTILE), self._schedule[-1] if self._schedule else 0)
        if elapsed <= late + self._step:
            return self._step
        # beyond what the learned distribution expects: back off, up to max_interval
        return min(self._max, max(self._step, (elapsed - late) / 2))
