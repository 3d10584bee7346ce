"""The perfect client that scripts/bench.py measures runs against: no client that keeps the
provider's limits has a shorter span on the same creates, and its span is the limits' own."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.core import SandboxSettings
from pipeline.sandbox.ideal import (
    Creates,
    Limits,
    perfect_schedule,
    perfect_span,
    run_creates,
    share_of_perfect,
    steady_share,
)
from pipeline.sandbox.state import ORG_MATE, SandboxState, key_hash


def _feasible(
    at: float, key: int, starts: list[tuple[float, int, float]], limits: Limits, account: list[int]
) -> bool:
    """Whether a create on `key` at `at` keeps the limits, counted the plain way: creates of
    the key in the window (at - window, at], and the account's jobs running at `at`."""
    in_window = sum(1 for t, k, _ in starts if k == key and t + limits.window_s > at)
    running = sum(1 for t, k, end in starts if account[k] == account[key] and t <= at < end)
    return in_window < limits.creates_per_window and running < limits.max_concurrent


def _some_client(
    latencies: list[float],
    keys: int,
    limits: Limits,
    account: list[int],
    choices: list[int],
    lags: list[float],
) -> float:
    """The span of a client that keeps the limits but chooses its keys as it likes and sends
    each create some time after it could: any such schedule, in create order."""
    starts: list[tuple[float, int, float]] = []
    now = 0.0
    for i, latency in enumerate(latencies):
        key = choices[i % len(choices)] % keys
        at = now + lags[i % len(lags)]
        while not _feasible(at, key, starts, limits, account):
            # the next instant anything changes: a job's end, or a create leaving the window
            events = [end for _, _, end in starts if end > at]
            events += [
                t + limits.window_s for t, k, _ in starts if k == key and t + limits.window_s > at
            ]
            at = min(events)
        starts.append((at, key, at + latency))
        now = at
    return max(end for _, _, end in starts) - starts[0][0]


@given(
    latencies=st.lists(st.floats(0.01, 5.0), min_size=1, max_size=60),
    keys=st.integers(1, 3),
    per_window=st.integers(1, 8),
    cap=st.integers(1, 4),
    shared=st.booleans(),
    choices=st.lists(st.integers(0, 2), min_size=1, max_size=10),
    lags=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=10),
)
def test_no_client_within_the_limits_is_faster_than_the_perfect_one(
    latencies: list[float],
    keys: int,
    per_window: int,
    cap: int,
    shared: bool,
    choices: list[int],
    lags: list[float],
) -> None:
    limits = Limits(per_window, 3.0, cap)
    groups = [keys] if shared else [1] * keys
    account = [0] * keys if shared else list(range(keys))
    perfect = perfect_span(latencies, keys, limits, groups)
    other = _some_client(latencies, keys, limits, account, choices, lags)
    assert perfect <= other + 1e-9
    # and the perfect client is such a client: it chooses well and never lags
    assert perfect >= max(latencies) - 1e-9


def test_the_perfect_span_is_the_limits_own() -> None:
    # slots bind: one slot runs the jobs one after another
    assert perfect_span([1.0, 2.0, 3.0], 1, Limits(100, 60.0, 1)) == pytest.approx(6.0)
    # the window binds: 250 instant jobs at 100 a minute go at 0, 60 and 120 s
    assert perfect_span([0.001] * 250, 1, Limits(100, 60.0, 1000)) == pytest.approx(120.001)
    # both: ten at a time, a thousandth of a second each, until the window is full
    assert perfect_span([0.001] * 250, 1, Limits(100, 60.0, 10)) == pytest.approx(120.005)
    # two keys of one account share its cap; of two groups, they do not
    assert perfect_span([1.0] * 4, 2, Limits(100, 60.0, 1), [2]) == pytest.approx(4.0)
    assert perfect_span([1.0] * 4, 2, Limits(100, 60.0, 1)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="hold 3 keys, not 2"):
        perfect_span([1.0], 2, Limits(100, 60.0, 1), [3])


def test_a_run_is_read_from_the_sandbox_ledger_and_measured_against_the_perfect_client() -> None:
    clock = [0.0]
    state = SandboxState(
        SandboxSettings(keys=("k",), max_concurrent=1, latency_mean_s=2.0, latency_spread=0.3),
        clock=lambda: clock[0],
    )
    jobs = []
    for i in range(3):  # a client that sends each create 0.5 s after the slot is free
        jobs.append(state.accept(key_hash("k"), "m", {"prompt": str(i)}, None, "http://x/"))
        clock[0] = jobs[-1].ends_at + 0.5
    creates = run_creates(json.loads(line) for line in state.ledger_lines())
    assert creates.latency_s == pytest.approx([j.ends_at - j.created_at for j in jobs])
    share, perfect = share_of_perfect(creates, 1, Limits(100, 60.0, 1))
    assert perfect == pytest.approx(sum(creates.latency_s))
    assert creates.span_s == pytest.approx(perfect + 1.0)  # two lags of 0.5 s
    assert share == pytest.approx(perfect / (perfect + 1.0))


def test_the_steady_share_is_one_for_the_perfect_client_and_less_for_a_stall() -> None:
    """The steady share reads the middle of a run: the perfect client's own creates score 1.0,
    and a run that stalls between its 10th and 90th percentile creates scores less."""
    limits = Limits(creates_per_window=5, window_s=1.0, max_concurrent=3)
    latencies = [0.5 + 0.1 * (i % 4) for i in range(60)]
    made, _ = perfect_schedule(latencies, 1, limits, ())
    perfect = Creates(tuple(made), tuple(latencies))
    assert steady_share(perfect, 1, limits) == pytest.approx(1.0)
    stalled = Creates(
        tuple(t + (2.0 if i >= 30 else 0.0) for i, t in enumerate(made)), perfect.latency_s
    )
    assert 0.5 < steady_share(stalled, 1, limits) < 1.0
    # another application's creates in the ledger are not the run's
    ledger = [{"event": "created", "t": 1.0, "latency_s": 1.0, "key": ORG_MATE}]
    assert run_creates(ledger).at == ()
