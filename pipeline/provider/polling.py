"""When to poll: learn how long jobs take, and poll at the times that notice a job's end soonest
for a given number of polls.

The provider reports each finished job's `predict_time`; the planner keeps the latest of them
and, from time to time, computes a poll schedule over that distribution: the poll times
(seconds after the create) that minimise the expected delay between a job's end and our
noticing it, with at most `polls_per_job` polls per job on average. It is the classic
inspection-schedule problem, solved exactly over a grid of quantiles by dynamic programming,
with a bisection on the price of one poll. Jobs that outlive the schedule are polled every
`step`, backing off as they grow late.

How many polls: as few as reach a mean notice delay of `delay_fraction` of the mean latency
(1.5 % by default), and never more than `polls_per_job`; so the budget follows the learned
spread: a narrow one needs about 3 polls, a 30 % one all 10.

The distribution is the learned ends themselves once there are `_EMPIRICAL` of them. Before
that, a handful of ends would make a poor one: they are the soonest ends of the jobs started
together (the slower ones are still running), their last is no bound on the next job, and every
job that outlives it is polled at the short `step`. So until then it is a lognormal: before any
end, `expected_latency_s` with a wide spread (the prior, so that a first guess three times off
still has polls near the true ends); then fitted by maximum likelihood to the ends seen, the
prior as a few pseudo-ends, and the ages of the jobs still running counted as lower bounds of
their latencies (a censored fit), its spread widened by the doubt of a small sample. All values
are wall seconds.
"""

from __future__ import annotations

import bisect
import functools
import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable
from itertools import accumulate, pairwise

__all__ = ["PollPlanner", "censored_fit", "mean_delay", "poll_schedule"]

_EMPIRICAL = 64  # ends seen before the schedule follows them, not a fitted lognormal
# the spread assumed before any end is seen: wide, so a first guess three times off still
# has polls near the true ends (a narrow prior polls the whole first wave at the wrong time)
_PRIOR_SPREAD = 0.6
_MODEL_POINTS = 64  # quantiles of a lognormal the schedule is planned over
_WIDEN = 0.5  # a fit's spread is widened by this over the square root of its ends
_PRIOR_WEIGHT = 2  # pseudo-ends the prior counts for in a fit
_GRID = 96  # quantile points the schedule may poll at
_TAIL_QUANTILE = 0.995
_EM_ROUNDS = 25
_PRIOR_BUDGET = 0.5  # of the poll budget, planned before any job has ended


def poll_schedule(
    samples: list[float], polls_per_job: float, target_delay: float | None = None
) -> list[float]:
    """Poll times (ascending) over sorted `samples` minimising the mean delay from a job's end
    to the poll that notices it, with at most `polls_per_job` polls per job on average; with
    `target_delay`, the fewest polls whose mean delay is within it (if the budget allows).
    The same question gets the answer it got (a run's first plan, from the prior alone, is the
    same for every run of a config: a Ray worker's, a resumed run's)."""
    return list(_schedule(tuple(samples), polls_per_job, target_delay))


@functools.lru_cache(maxsize=16)
def _schedule(
    samples: tuple[float, ...], polls_per_job: float, target_delay: float | None
) -> tuple[float, ...]:
    return tuple(_solve_schedule(list(samples), polls_per_job, target_delay))


def _solve_schedule(
    samples: list[float], polls_per_job: float, target_delay: float | None
) -> list[float]:
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

    def solve(price: float) -> tuple[list[float], float, float]:
        """The best schedule when a poll costs `price` seconds of delay, its polls per job and
        its mean delay."""
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
        return [grid[j] for j in chosen], polls, best[m - 1] - price * polls

    high = max(grid) * 4 + 1e-9  # above max(grid) a single last poll is best
    if target_delay is not None:
        # the fewest polls (the highest price) whose mean delay is within the target, judged on
        # ends between the samples: the plan polls at sample values, so on the samples
        # themselves it would see no delay at its polls and stop with too few of them
        between = [(a + b) / 2 for a, b in pairwise(samples)] or samples
        low, found = 0.0, None
        for _ in range(16):
            mid = (low + high) / 2
            times, polls, _ = solve(mid)
            if mean_delay(times, between) <= target_delay:
                low, found = mid, (times, polls)
            else:
                high = mid
        if found is not None and found[1] <= polls_per_job:
            return found[0]
        high = max(grid) * 4 + 1e-9
    schedule, polls, _ = solve(0.0)
    if polls <= polls_per_job:
        return schedule
    low = 0.0
    schedule, _, _ = solve(high)
    for _ in range(16):  # to 1/65536 of the range: finer than any clock here
        mid = (low + high) / 2
        times, polls, _ = solve(mid)
        if polls <= polls_per_job:
            schedule, high = times, mid
        else:
            low = mid
    return schedule


def censored_fit(exact: list[float], above: list[float]) -> statistics.NormalDist:
    """The normal distribution most likely to give the values `exact` and values known only to
    exceed those in `above` (right-censored), by expectation-maximisation: the first ends of a
    run are its soonest jobs; the jobs still running say how much longer the others take."""
    values = exact + above
    mean = statistics.fmean(values)
    sd = max(statistics.pstdev(values), 1e-3)
    unit = statistics.NormalDist()
    total = len(values)
    for _ in range(_EM_ROUNDS):
        first, second = sum(exact), sum(x * x for x in exact)
        for bound in above:
            z = (bound - mean) / sd
            tail = max(1e-12, 1 - unit.cdf(z))
            hazard = unit.pdf(z) / tail  # E[x | x > bound] = mean + sd * hazard
            first += mean + sd * hazard
            second += mean * mean + sd * sd + sd * (bound + mean) * hazard
        mean = first / total
        sd = math.sqrt(max(second / total - mean * mean, 1e-6))
    return statistics.NormalDist(mean, sd)


def mean_delay(schedule: list[float], samples: list[float]) -> float:
    """The mean wait from each sample's end to the first poll at or after it (ends after the
    last poll count from there: the tail is polled apart)."""
    if not schedule or not samples:
        return math.inf
    total = 0.0
    for end in samples:
        index = bisect.bisect_left(schedule, end)
        total += schedule[index] - end if index < len(schedule) else 0.0
    return total / len(samples)


class PollPlanner:
    def __init__(
        self,
        *,
        expected_latency: float,
        target_delay: float,
        min_interval: float,
        max_interval: float,
        polls_per_job: float = 10.0,
        delay_fraction: float | None = 0.015,
        memory: int = 512,
        running: Callable[[], Iterable[float]] | None = None,
    ) -> None:
        self._expected = expected_latency
        self._fraction = delay_fraction  # the mean notice delay aimed at, of the mean latency
        # the ages of the jobs in flight: lower bounds on their latencies (a censored fit)
        self.running = running
        self._step = min(max(2 * target_delay, min_interval), max_interval)
        self._min = min_interval
        self._max = max_interval
        self._budget = polls_per_job
        self._recent: deque[float] = deque(maxlen=memory)
        self._sorted: list[float] = []
        self._schedule: list[float] = []
        self._seen = 0
        self._next_plan = 1
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
        target = None
        if self._fraction is not None and samples:
            target = self._fraction * statistics.fmean(samples)
        # 0.6 of a poll of the budget is kept for jobs beyond the schedule and for retries;
        # before any end, the wide prior gets part of it: the first wave's late ends, and the
        # replans as ends come, spend the rest
        budget = max(1.0, self._budget - 0.6)
        if not self._sorted:
            budget = max(1.0, budget * _PRIOR_BUDGET)
        self._schedule = [max(self._min, t) for t in poll_schedule(samples, budget, target)]

    def _fit(self) -> statistics.NormalDist | None:
        """The distribution of log latencies while too few ends are known to follow them
        (None once enough are): the prior, and the ends seen and the ages of the jobs still
        running, fitted together (see `censored_fit`)."""
        n = len(self._sorted)
        if n >= _EMPIRICAL:
            return None
        sigma = math.sqrt(math.log(1 + _PRIOR_SPREAD**2))
        prior = statistics.NormalDist(math.log(self._expected) - sigma**2 / 2, sigma)
        ages = [a for a in (self.running() if self.running else ()) if a > 0]
        if n == 0 and not ages:
            return prior
        # the prior as pseudo-ends at its quantiles, so that few ends cannot fit a point
        pseudo = [prior.inv_cdf((i + 0.5) / _PRIOR_WEIGHT) for i in range(_PRIOR_WEIGHT)]
        exact = [math.log(x) for x in self._sorted] + pseudo
        fit = censored_fit(exact, [math.log(a) for a in ages])
        return statistics.NormalDist(fit.mean, fit.stdev * (1 + _WIDEN / math.sqrt(n + 1)))

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
