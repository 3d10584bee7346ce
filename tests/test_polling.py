"""The poll planner: what it learns from jobs' ends, and that its schedule notices ends soon
within its budget of polls per job."""

from __future__ import annotations

import bisect
import heapq
import math
import random

import pytest

from pipeline.provider import PollPlanner
from pipeline.provider.polling import poll_schedule


def _lognormal(count: int, mean: float, spread: float, seed: int) -> list[float]:
    """Job latencies in the order they end; sort them for a schedule's samples."""
    rng = random.Random(seed)
    sigma = math.sqrt(math.log(1 + spread**2))
    mu = math.log(mean) - sigma**2 / 2
    return [rng.lognormvariate(mu, sigma) for _ in range(count)]


def _cost(schedule: list[float], ends: list[float]) -> tuple[float, float]:
    """Polls per job and mean delay from a job's end to the poll that sees it."""
    polls = delay = 0.0
    for end in ends:
        index = bisect.bisect_left(schedule, end)
        assert index < len(schedule), "the schedule stops before a job it learned from ended"
        polls += index + 1
        delay += schedule[index] - end
    return polls / len(ends), delay / len(ends)


def _even(ends: list[float], budget: float) -> tuple[float, float]:
    """The best evenly spaced schedule from the first end to the last within the budget."""
    best = (math.inf, math.inf)
    for count in range(1, 64):
        step = (ends[-1] - ends[0]) / count
        polls, delay = _cost([ends[0] + step * (i + 1) for i in range(count)], ends)
        if polls <= budget:
            best = (polls, delay)
    return best


@pytest.mark.parametrize("budget", [1.5, 2.0, 2.8])
def test_the_schedule_keeps_its_budget_and_notices_ends_sooner_than_even_polls(
    budget: float,
) -> None:
    ends = sorted(_lognormal(512, 0.5, 0.05, seed=1))
    schedule = poll_schedule(ends, budget)
    assert schedule == sorted(schedule) and ends[0] <= schedule[0]
    polls, delay = _cost(schedule, ends)
    assert polls <= budget + 1e-9
    _, even_delay = _even(ends, budget)
    assert delay < 0.8 * even_delay
    # more polls buy a sooner notice
    if budget > 1.5:
        assert delay < _cost(poll_schedule(ends, budget - 0.5), ends)[1]


def test_the_planner_starts_from_the_expectation_then_follows_what_it_learns() -> None:
    planner = PollPlanner(
        expected_latency=1.0, target_delay=0.01, min_interval=0.005, max_interval=2.0
    )
    # before any job has ended: a wide spread around the configured expectation, so the
    # first poll comes well before it and the schedule reaches well past it
    first_guess = planner.first_delay()
    assert 0.1 <= first_guess < 0.8
    assert planner.quantile(0.9) > 1.5
    learned = _lognormal(64, 0.5, 0.05, seed=2)
    for end in learned:
        planner.observe(end)
    learned.sort()
    planner.observe(0.0)  # a job without a predict_time teaches nothing
    # the first poll comes just before the bulk of the ends, the next ones through it
    first = planner.first_delay()
    assert learned[0] <= first <= learned[len(learned) // 2]
    assert first < planner.next_delay(first) + first <= learned[-1] + 1e-9
    assert planner.quantile(0.5) == pytest.approx(learned[31], abs=learned[33] - learned[30])
    # a job that outlives every learned end: polled every step (twice the target delay),
    # then backing off as it grows late, never waiting more than max_interval
    assert planner.next_delay(learned[-1] + 0.001) == pytest.approx(0.02)
    assert 0.02 < planner.next_delay(learned[-1] + 1.0) < 2.0
    assert planner.next_delay(100.0) == 2.0


def test_the_planner_forgets_old_ends_and_follows_a_change() -> None:
    planner = PollPlanner(
        expected_latency=0.5, target_delay=0.01, min_interval=0.005, max_interval=2.0, memory=64
    )
    for end in _lognormal(64, 0.5, 0.05, seed=3):
        planner.observe(end)
    assert planner.first_delay() < 0.6
    # the provider slows down to 2 s jobs: once the memory has turned over, so has the plan
    for end in _lognormal(256, 2.0, 0.05, seed=4):
        planner.observe(end)
    assert 1.6 < planner.first_delay() < 2.1
    assert planner.quantile(0.0) > 1.5


def _run(planner: PollPlanner, jobs: int, slots: int, latencies: list[float]) -> float:
    """Polls per job of `jobs` jobs on `slots` slots (all starting at once, each slot taking
    the next job when it sees its last one end), in simulated time."""
    events: list[tuple[float, int, float, float, int]] = []  # poll time, slot, start, end, polls
    pending = iter(latencies[:jobs])

    def start(now: float, slot: int) -> None:
        latency = next(pending, None)
        if latency is not None:
            heapq.heappush(events, (now + planner.first_delay(), slot, now, now + latency, 1))

    for slot in range(slots):
        start(0.0, slot)
    polls = 0
    while events:
        now, slot, started, end, count = heapq.heappop(events)
        if now >= end:
            polls += count
            planner.observe(end - started)
            start(now, slot)
        else:
            poll = now + planner.next_delay(now - started)
            heapq.heappush(events, (poll, slot, started, end, count + 1))
    return polls / jobs


@pytest.mark.parametrize(("jobs", "mean"), [(31, 10.0), (200, 10.0), (200, 5.0)])
def test_a_small_run_keeps_its_polls_budget(jobs: int, mean: float) -> None:
    # the first ends of 20 jobs started together are the soonest of them: a schedule fitted to
    # those alone would find the rest late and poll them at the short tail step; the ages of
    # the jobs still running say they are later
    per_job = [
        _simulate(_planner(10.0), jobs, 20, _lognormal(jobs, mean, 0.3, seed))[0]
        for seed in range(10)
    ]
    assert sum(per_job) / len(per_job) <= 10.0


def _simulate(
    planner: PollPlanner, jobs: int, slots: int, latencies: list[float]
) -> tuple[float, list[float], float]:
    """`jobs` jobs on `slots` slots in simulated time (each slot takes the next job when it
    sees its last end): polls per job, the times ends were noticed (in order), and the mean
    delay of a notice after its end. The planner sees the ages of the jobs in flight."""
    events: list[tuple[float, int, float, float, int]] = []  # poll time, slot, start, end, polls
    pending = iter(latencies[:jobs])
    clock = [0.0]
    planner.running = lambda: [clock[0] - e[2] for e in events]

    def start(now: float, slot: int) -> None:
        latency = next(pending, None)
        if latency is not None:
            heapq.heappush(events, (now + planner.first_delay(), slot, now, now + latency, 1))

    for slot in range(slots):
        start(0.0, slot)
    polls, delay, noticed = 0, 0.0, []
    while events:
        now, slot, started, end, count = heapq.heappop(events)
        clock[0] = now
        if now >= end:
            polls += count
            delay += now - end
            noticed.append(now)
            planner.observe(end - started)
            start(now, slot)
        else:
            poll = now + planner.next_delay(now - started)
            heapq.heappush(events, (poll, slot, started, end, count + 1))
    return polls / jobs, noticed, delay / jobs


def _planner(expected: float) -> PollPlanner:
    return PollPlanner(
        expected_latency=expected, target_delay=0.15, min_interval=0.1, max_interval=30.0
    )


@pytest.mark.parametrize(
    ("spread", "most_polls", "most_delay"), [(0.05, 4.0, 0.02), (0.3, 10.0, 0.035)]
)
def test_the_poll_budget_follows_the_spread(
    spread: float, most_polls: float, most_delay: float
) -> None:
    # by default: as few polls as notice an end within 2.5 % of the mean latency, at most 10;
    # a narrow spread needs few, and the budget is not spent for nothing
    polls, _, delay = _simulate(_planner(10.0), 2000, 10, _lognormal(2000, 10.0, spread, 5))
    assert polls <= most_polls
    assert delay <= most_delay * 10.0


@pytest.mark.parametrize("guess", [10.0 / 3, 30.0])
def test_a_wrong_first_guess_is_unlearned_within_30_ends(guess: float) -> None:
    """With `expected_latency_s` a third of the truth, or three times it, the rate of ends is
    90 % of the steady rate by the 30th end."""
    latencies = _lognormal(300, 10.0, 0.3, seed=11)
    _, right, _ = _simulate(_planner(10.0), 300, 10, latencies)
    _, wrong, _ = _simulate(_planner(guess), 300, 10, latencies)
    steady = 200 / (right[250] - right[50])  # ends per second once settled
    # the rate over the 20 ends after the 30th, against the steady one
    reached = 20 / (wrong[50] - wrong[30])
    assert reached >= 0.9 * steady
