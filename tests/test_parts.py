"""The run's parts held alone, in virtual time: the key driver and its parts (keys held to
their limits, the listing's sweeps, a lost create's settling), the dispatcher, the group commit
and the downloader, each with fakes of its neighbours and the provider behind an
`httpx.MockTransport`. No server, no sleep: an event loop whose clock jumps to its next timer
whenever every task waits (looptime), so a test checks exact instants in milliseconds.
"""

from __future__ import annotations

import asyncio
import bisect
import io
import random
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
import looptime
import pytest
from PIL import Image

from pipeline.core import (
    ApiKey,
    AssetsSection,
    Budget,
    NoUsableKeyError,
    RunStats,
    Status,
    SystemClock,
)
from pipeline.drive.adopt import LostCreates, Settled
from pipeline.drive.dispatcher import Dispatcher
from pipeline.drive.driver import KeyDriver
from pipeline.drive.flight import Flying, InFlight
from pipeline.drive.lanes import KeyLane
from pipeline.drive.listings import Listings
from pipeline.drive.settings import DriverSettings, Webhook
from pipeline.drive.sweeps import Sweeper
from pipeline.journal import (
    Entry,
    FailImage,
    Finish,
    GroupCommit,
    MarkCreated,
    MarkCreating,
    StoreImage,
    Update,
)
from pipeline.outputs.downloads import Downloader, FolderStore
from pipeline.provider import (
    Callbacks,
    CreateGate,
    EachlabsClient,
    InFlightCap,
    PollPlanner,
    RetryPolicy,
    caps_for,
)

T = TypeVar("T")
KEY = ApiKey("unit-key-1")


def virtual(main: Callable[[], Awaitable[T]]) -> T:
    """Run `main` on an event loop in virtual time, starting at 0."""
    loop = looptime.new_event_loop(start=0.0, noop_cycles=10)
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def now() -> float:
    return asyncio.get_running_loop().time()


def entry(row: int, **changes: Any) -> Entry:
    fields: dict[str, Any] = {
        "row_number": row,
        "job_id": f"job-{row}",
        "fingerprint": f"fp-{row}",
        "inputs": {"prompt": "white background", "img_url": f"https://shop.test/{row}.jpg"},
        "record": {"id": f"job-{row}"},
        "status": Status.PENDING,
        "prediction_id": None,
        "key_name": None,
        "attempts": 0,
        "ambiguous": 0,
        "started_at": None,
    }
    fields.update(changes)
    return Entry(**fields)


class Events:
    """One ordered record of what the parts did and what the provider saw, with instants."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str, Any]] = []

    def add(self, kind: str, what: Any) -> None:
        self.seen.append((now(), kind, what))

    def of(self, kind: str) -> list[tuple[float, Any]]:
        return [(at, what) for at, k, what in self.seen if k == kind]


class Commits:
    """The journal's side as the driver sees it: every update durable at once, in order."""

    def __init__(self, events: Events) -> None:
        self.events = events

    async def write(self, *updates: Update) -> None:
        for update in updates:
            self.events.add("journal", update)

    def post(self, *updates: Update) -> asyncio.Event:
        for update in updates:
            self.events.add("journal", update)
        done = asyncio.Event()
        done.set()
        return done

    async def durable(self, done: asyncio.Event) -> None:
        await done.wait()

    async def known(self, ids: list[str]) -> set[str]:
        """No listed job is already a row's (the journal's lookup, for lost creates)."""
        return set()


class Source:
    """The dispatcher's side: a list of jobs, and what came back."""

    halted = False

    def __init__(self, jobs: list[Entry]) -> None:
        self.jobs = list(jobs)
        self.given_back: list[Entry] = []
        self.retired: list[str] = []

    async def next_job(self, key_name: str) -> Entry | None:
        return self.jobs.pop(0) if self.jobs else None

    def give_back(self, entry: Entry) -> None:
        self.given_back.append(entry)

    def retire(self, key_name: str) -> None:
        self.retired.append(key_name)
        raise NoUsableKeyError("every key refused")

    async def rest(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def settle(self, entry: Entry, outcome: Any) -> None:
        return None

    async def reserve(self, entry: Entry) -> bool:
        return True


class Provider:
    """The provider's create, poll and cancel, in its own shapes: each job ends `latency`
    seconds after its create, unless a test scripts the answers otherwise."""

    def __init__(self, events: Events, latency: float = 10.0) -> None:
        self.events = events
        self.latency = latency
        self.ends: dict[str, float] = {}
        self.cancelled: set[str] = set()
        self.creates: list[httpx.Response | Exception] = []  # scripted answers, first ones
        self.never_ends = False
        self.made: dict[str, tuple[str, float]] = {}  # each job's key (its header) and create
        self.cap: int | None = None  # the provider's own cap of jobs in flight, if it has one
        self.storming: set[str] = set()  # keys (their secrets) whose every create meets a 429
        self.refused: dict[str, int] = {}  # 429s, by key
        # storms of `storm_s` that start on a `storm_chance` share of the creates (seeded)
        self.storm_chance, self.storm_s, self._storm_until = 0.0, 1.0, -1.0
        self._dice = random.Random(3)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and path.endswith("/prediction/"):
            self.events.add("create", None)
            if self.creates:
                scripted = self.creates.pop(0)
                if isinstance(scripted, Exception):
                    raise scripted
                return scripted
            secret = request.headers.get("authorization", "").removeprefix("Bearer ")
            if self._storm_until <= now() and self._dice.random() < self.storm_chance:
                self._storm_until = now() + self.storm_s
            storm = 2.0 if secret in self.storming else self._storm_until - now()
            if storm > 0:  # in a storm: try again when it ends
                self.refused[secret] = self.refused.get(secret, 0) + 1
                body = {"status": "error", "message": "Too many requests", "details": "storm"}
                return httpx.Response(429, json=body, headers={"Retry-After": f"{storm:.3f}"})
            running = sorted(end for end in self.ends.values() if end > now())
            if self.cap is not None and len(running) >= self.cap:  # as the sandbox answers it
                body = {"status": "error", "message": "Too many requests", "details": "cap"}
                wait = {"Retry-After": f"{running[0] - now():.3f}"}
                return httpx.Response(429, json=body, headers=wait)
            pid = f"p{len(self.ends) + 1}"
            self.ends[pid] = now() + self.latency
            self.made[pid] = (request.headers.get("authorization", ""), now())
            return httpx.Response(200, json={"predictionID": pid})
        pid = path.rstrip("/").split("/")[-1 if not path.endswith("/cancel") else -2]
        if path.endswith("/cancel"):
            self.events.add("cancel", pid)
            self.cancelled.add(pid)
            return httpx.Response(200, json={"status": "ok"})
        self.events.add("poll", pid)
        if pid in self.cancelled:
            return httpx.Response(200, json={"status": "cancelled"})
        if self.never_ends or now() < self.ends[pid]:
            return httpx.Response(200, json={"status": "processing"})
        body = {
            "status": "success",
            "output": [f"https://cdn.test/{pid}.png"],
            "metrics": {"predict_time": self.latency, "cost": 0.03},
        }
        return httpx.Response(200, json=body)


def most_in_flight(provider: Provider, secrets: set[str] | None = None) -> int:
    """The most jobs (of the keys with these secrets, or of all) running at once at the
    provider, from create to end."""
    made = {pid: (key.removeprefix("Bearer "), at) for pid, (key, at) in provider.made.items()}
    mine = [pid for pid, (k, _) in made.items() if secrets is None or k in secrets]
    edges = sorted([(made[pid][1], 1) for pid in mine] + [(provider.ends[pid], -1) for pid in mine])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def settings(**changes: Any) -> DriverSettings:
    values: dict[str, Any] = {
        "policy": RetryPolicy(3, 1.0, 8.0, 60.0),
        "job_timeout": 600.0,
        "cancel_grace": 30.0,
        "confirm_every": 3.0,
        "fallback_after": 10.0,
        "fallback_interval": 5.0,
        "price_per_image_usd": 0.03,
        "creates_per_window": 100,
        "ambiguous_creates": "retry",
        "timeout_text": "600 s (polling.job_timeout_s)",
        "sweep_share": 0.015,
        "sweep_floor": 0.1,
    }
    values.update(changes)
    return DriverSettings(**values)


async def drive(
    provider: Provider,
    jobs: list[Entry] | Source | Dispatcher,
    concurrent: int = 10,
    lanes: list[KeyLane] | None = None,
    **changes: Any,
) -> tuple[KeyDriver, Any, RunStats]:
    """The jobs driven by `concurrent` slots of each lane (one key's, unless given) until
    none is left; the driver, the source of the jobs and the run's counters."""
    client = EachlabsClient("https://api.test/v1", "wan", transport=provider.transport())
    lanes = lanes or [KeyLane(KEY, CreateGate(100, 60.0), InFlightCap(concurrent, KEY.name))]
    planner = PollPlanner(
        expected_latency=10.0, target_delay=1.0, min_interval=1.0, max_interval=30.0
    )
    source = Source(jobs) if isinstance(jobs, list) else jobs
    stats = RunStats()
    driver = KeyDriver(
        settings(**changes), client, Commits(provider.events), source, planner, stats, lanes
    )
    try:
        async with asyncio.TaskGroup() as slots:
            for lane in lanes:
                for _ in range(concurrent):
                    slots.create_task(driver.run_slot(lane))
    finally:
        await client.aclose()
    return driver, source, stats


def driven(provider: Provider, jobs: list[Entry], concurrent: int, **changes: Any) -> RunStats:
    """The run's counters once `jobs` are driven to their end (see `drive`) in virtual time."""

    async def main() -> RunStats:
        return (await drive(provider, jobs, concurrent, **changes))[2]

    return virtual(main)


def updates(events: Events, kind: type) -> list[tuple[float, Any]]:
    return [(at, u) for at, u in events.of("journal") if isinstance(u, kind)]


# -- the key driver ----------------------------------------------------------------------------


def test_driver_journals_each_step_before_the_next_and_ends_each_job_once() -> None:
    events = Events()
    provider = Provider(events, latency=10.0)

    async def main() -> tuple[RunStats, float]:
        _, _, stats = await drive(provider, [entry(r) for r in range(1, 5)])
        return stats, now()

    stats, ended = virtual(main)
    order = [(k, getattr(w, "row_number", w)) for _, k, w in events.seen if k != "poll"]
    # every create is preceded by its row's `creating`, durable before it is sent
    creating = [w.row_number for _, w in updates(events, MarkCreating)]
    assert sorted(creating) == [1, 2, 3, 4]
    for at, pid in events.of("poll"):
        created_at = [a for a, u in updates(events, MarkCreated) if u.prediction_id == pid]
        assert created_at and created_at[0] <= at  # its id journaled before its first poll
    finishes = updates(events, Finish)
    assert sorted(u.row_number for _, u in finishes) == [1, 2, 3, 4]
    assert all(u.outcome.status is Status.SUCCEEDED for _, u in finishes)
    assert all(u.outcome.provider_cost_usd == pytest.approx(0.03) for _, u in finishes)
    assert all(at >= 10.0 for at, _ in finishes)  # none booked before the provider ended it
    assert stats.creates_sent == 4 and stats.finished == 4 and stats.rate_limited == 0
    assert len(events.of("create")) == 4
    assert ended < 15.0  # four slots in parallel: the run is one latency and its notice
    assert order.index(("journal", 1)) < order.index(("create", None))


def test_driver_waits_out_a_429_on_its_key_before_creating_again() -> None:
    events = Events()
    provider = Provider(events)
    provider.creates.append(httpx.Response(429, headers={"Retry-After": "20"}, json={}))

    stats = driven(provider, [entry(1)], 1)
    creates = [at for at, _ in events.of("create")]
    assert len(creates) == 2 and creates[0] == pytest.approx(0.0, abs=0.01)
    assert creates[1] >= 20.0  # the key paused for the Retry-After the provider asked
    assert stats.rate_limited == 1 and stats.finished == 1


def test_driver_counts_a_lost_create_answer_as_ambiguous_and_creates_again() -> None:
    events = Events()
    provider = Provider(events)
    provider.creates.append(httpx.ReadError("connection reset after the request was sent"))

    stats = driven(provider, [entry(1)], 1)
    assert stats.ambiguous_creates == 1
    assert len(events.of("create")) == 2
    (finish,) = [u for _, u in updates(events, Finish)]
    assert finish.outcome.status is Status.SUCCEEDED


def test_driver_fails_a_refused_input_at_once_and_never_retries_it() -> None:
    events = Events()
    provider = Provider(events)
    provider.creates.append(httpx.Response(400, json={"message": "bad image URL"}))

    stats = driven(provider, [entry(1)], 1)
    assert len(events.of("create")) == 1
    (finish,) = [u for _, u in updates(events, Finish)]
    assert finish.outcome.status is Status.FAILED
    assert finish.outcome.error_type == "invalid_input"
    assert stats.retries == 0


def test_driver_gives_the_job_back_and_retires_a_refused_key() -> None:
    events = Events()
    provider = Provider(events)
    provider.creates.append(httpx.Response(401, json={"message": "unknown key"}))
    source = Source([entry(1)])

    async def main() -> None:
        with pytest.raises(ExceptionGroup) as raised:
            await drive(provider, source, concurrent=1)
        assert raised.group_contains(NoUsableKeyError)

    virtual(main)
    assert len(events.of("create")) == 1
    assert [e.row_number for e in source.given_back] == [1]  # for another key to run
    assert source.retired == [KEY.name]
    assert updates(events, Finish) == []  # the row is not failed


def test_driver_cancels_a_job_at_its_timeout_and_books_the_end_a_poll_confirms() -> None:
    events = Events()
    provider = Provider(events)
    provider.never_ends = True

    stats = driven(provider, [entry(1)], 1, job_timeout=60.0)
    ((cancelled_at, pid),) = events.of("cancel")
    assert cancelled_at >= 60.0
    kinds = [(k, w) for _, k, w in events.seen if k in ("cancel", "poll")]
    assert ("poll", pid) in kinds[kinds.index(("cancel", pid)) :]  # a poll saw the end
    (finish,) = [u for _, u in updates(events, Finish)]
    assert finish.outcome.status is Status.FAILED and finish.outcome.error_type == "timeout"
    assert finish.outcome.cancel_accepted is True
    assert stats.timeouts == 1


def test_keys_hold_their_window_and_a_group_shares_one_in_flight_cap() -> None:
    """Three keys on one driver, 5 creates a minute and 3 jobs in flight each, the first two
    in one group (limits.groups): at the provider, no key ever has more than 5 creates in a
    minute, the group never more than 3 jobs in flight together and the lone key 3 of its
    own, both filled; every job ends once. A key waiting for its window leaves the group's cap
    to the other key: the group makes more creates in its first minute than one key's window
    (key 2 once made none before 190 s). (A gate's wait shorter than a microsecond, 12 x 0.1 s
    less 1.2 s, once kept this loop at one instant for ever.)"""
    events = Events()
    provider = Provider(events, latency=10.0)
    keys = [ApiKey(f"unit-key-{n}") for n in (1, 2, 3)]
    caps = caps_for([[keys[0].name, keys[1].name]], keys, 3)
    lanes = [KeyLane(k, CreateGate(5, 60.0), caps[k.name]) for k in keys]

    async def main() -> RunStats:
        # the run's own dispatcher: a job given back (its key's window full) goes to another
        source = dispatcher([entry(r) for r in range(1, 41)], lanes=len(lanes))
        return (await drive(provider, source, concurrent=3, lanes=lanes))[2]

    stats = virtual(main)
    assert stats.finished == 40 and len(updates(events, Finish)) == 40
    made = {pid: (key.removeprefix("Bearer "), at) for pid, (key, at) in provider.made.items()}
    for key in keys:
        starts = sorted(at for k, at in made.values() if k == key.secret)
        most = max(bisect.bisect_left(starts, t + 60.0) - i for i, t in enumerate(starts))
        assert starts and most <= 5  # every key worked, never over its window
    # a key waiting for its window holds none of its group's cap: the other key uses it
    group = {keys[0].secret, keys[1].secret}
    assert sum(1 for k, at in made.values() if k in group and at < 60.0) > 5

    assert most_in_flight(provider, group) == 3  # the group's one cap, full
    assert most_in_flight(provider, {keys[2].secret}) == 3
    assert most_in_flight(provider) == 6


def test_a_provider_cap_below_ours_is_learned_from_a_few_429s() -> None:
    """The provider runs 6 jobs of a key at once where we are set for 10: its 429s lower the
    key's cap at once, so 120 jobs meet a few of them, not one per create past its cap; no
    429 uses up an attempt, and the provider never runs more than its 6, and runs 6."""
    events = Events()
    provider = Provider(events, latency=10.0)
    provider.cap = 6

    stats = driven(provider, [entry(r) for r in range(1, 121)], 10)
    assert stats.finished == 120 and len(updates(events, Finish)) == 120
    assert stats.cap_refusals >= 1  # it learned the cap from the provider
    assert 1 <= stats.rate_limited <= 10
    assert len(provider.made) == 120  # a 429 made nothing and cost no attempt
    assert most_in_flight(provider) == 6


def test_429_storms_are_waited_out_without_using_up_attempts() -> None:
    """One key; storms of 1 s start on a fifth of its creates: every job is made once, at
    its first attempt (a 429 made nothing), and each 429 is counted."""
    events = Events()
    provider = Provider(events, latency=2.0)
    provider.storm_chance = 0.2

    stats = driven(provider, [entry(r) for r in range(1, 41)], 10)
    finished = [u for _, u in updates(events, Finish)]
    assert len(finished) == 40 and all(f.outcome.status is Status.SUCCEEDED for f in finished)
    assert len(provider.made) == 40 and stats.retries == 0 and stats.finished == 40
    assert {u.attempt for _, u in updates(events, MarkCreating)} == {1}  # as the results say
    refused = provider.refused[KEY.secret]
    assert refused > 0 and stats.rate_limited == refused


def test_a_throttled_key_gives_its_jobs_to_the_other_keys() -> None:
    """Three keys, one in a 429 storm that outlasts the run: its jobs go back to the
    dispatcher and on to the other keys instead of waiting out 429 after 429 until they fail;
    every job is made once, by a key that works, at its first attempt."""
    events = Events()
    provider = Provider(events, latency=10.0)
    keys = [ApiKey(f"unit-key-{n}") for n in (1, 2, 3)]
    provider.storming = {keys[2].secret}
    lanes = [KeyLane(k, CreateGate(100, 60.0), InFlightCap(10, k.name)) for k in keys]

    async def main() -> RunStats:
        source = dispatcher([entry(r) for r in range(1, 81)], lanes=len(lanes))
        return (await drive(provider, source, concurrent=10, lanes=lanes))[2]

    stats = virtual(main)
    finished = [u for _, u in updates(events, Finish)]
    assert sorted(f.row_number for f in finished) == list(range(1, 81))
    assert all(f.outcome.status is Status.SUCCEEDED for f in finished)
    made_by = {key.removeprefix("Bearer ") for key, _ in provider.made.values()}
    assert len(provider.made) == 80 and made_by == {keys[0].secret, keys[1].secret}
    assert provider.refused[keys[2].secret] > 0
    assert stats.rate_limited == provider.refused[keys[2].secret]
    assert stats.retries == 0 and stats.finished == 80
    assert {u.attempt for _, u in updates(events, MarkCreating)} == {1}


# -- the key driver's parts alone: the listing's sweeps, a lost create's settling -------------


class Listing:
    """The provider's organisation-wide listing (v2), which shows `executions` to any key,
    and each prediction's `GET` with the input it was made with (`inputs`, by id)."""

    def __init__(self, events: Events, executions: list[dict[str, Any]]) -> None:
        self.events = events
        self.executions = executions
        self.inputs: dict[str, dict[str, Any] | None] = {}

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        if request.url.path.endswith("/v2/executions"):
            self.events.add("listing", key)
            page = {"executions": self.executions, "has_more": False, "next_cursor": None}
            return httpx.Response(200, json=page)
        pid = request.url.path.rstrip("/").split("/")[-1]
        self.events.add("get", pid)
        given = self.inputs.get(pid)
        body: dict[str, Any] = {"status": "success", "output": []}
        if given is not None:
            body["input"] = given
        return httpx.Response(200, json=body)


def _ended(pid: str) -> dict[str, Any]:
    return {"id": pid, "status": "success", "created_at": "2026-12-07T09:00:00Z"}


def _sweeping(
    listing: Listing, lanes: list[KeyLane], jobs: dict[str, KeyLane], stats: RunStats
) -> tuple[Sweeper, Listings, dict[str, Any]]:
    """A sweeper over `jobs` (prediction id -> its key's lane), all created at 0, each with
    its waiter for the listing's hints."""
    client = EachlabsClient("https://api.test/v1", "wan", transport=listing.transport())
    clock = SystemClock()
    flight = InFlight(clock)
    hints = Callbacks(5, source="listing")
    waiters = {}
    for row, (pid, lane) in enumerate(jobs.items(), start=1):
        flight.fly(pid, Flying(lane, entry(row), 0.0, 1))
        waiters[pid] = hints.expect(pid)
    planner = PollPlanner(
        expected_latency=4.0, target_delay=1.0, min_interval=0.5, max_interval=30.0
    )
    listings = Listings(client, stats)
    return Sweeper(settings(), listings, flight, planner, lanes, clock, hints), listings, waiters


def _lane(key: ApiKey) -> KeyLane:
    lane = KeyLane(key, CreateGate(100, 60.0), InFlightCap(10, key.name))
    lane.serving = 1  # its slots are serving
    return lane


def test_sweeps_wake_the_jobs_the_listing_shows_ended_and_no_other() -> None:
    events = Events()
    listing = Listing(events, [_ended("p1"), _ended("not-ours")])
    lane = _lane(KEY)
    stats = RunStats()

    async def main() -> dict[str, Any]:
        sweeper, _, waiters = _sweeping(listing, [lane], {"p1": lane, "p2": lane}, stats)
        with anyio.move_on_after(20):  # virtual seconds
            await sweeper.sweep(lane)
        return waiters

    waiters = virtual(main)
    assert waiters["p1"].event.is_set() and waiters["p1"].hinted
    assert not waiters["p2"].event.is_set()  # not ended: no hint
    reads = events.of("listing")
    assert reads and stats.listings == len(reads)
    # no read before the shortest jobs could have ended: the planner's prior says when
    assert reads[0][0] > 0.5


def test_a_listing_that_shows_another_keys_job_serves_every_key_with_one_read() -> None:
    events = Events()
    listing = Listing(events, [_ended("pa"), _ended("pb")])
    key_b = ApiKey("unit-key-2")
    a, b = _lane(KEY), _lane(key_b)
    stats = RunStats()

    async def main() -> tuple[dict[str, Any], Listings]:
        sweeper, listings, waiters = _sweeping(listing, [a, b], {"pa": a, "pb": b}, stats)
        with anyio.move_on_after(20):
            async with anyio.create_task_group() as both:
                both.start_soon(sweeper.sweep, a)
                both.start_soon(sweeper.sweep, b)
        return waiters, listings

    waiters, listings = virtual(main)
    assert listings.organisation_wide
    assert all(w.event.is_set() for w in waiters.values())
    readers = [key for _, key in events.of("listing")]
    # the two keys' first reads may go out together; once one showed the other key's job,
    # only the first serving key reads, for both
    assert len(readers) > 3
    assert set(readers[2:]) == {KEY.secret}
    assert readers.count(key_b.secret) <= 1


def _lost(listing: Listing, stats: RunStats, **changes: Any) -> LostCreates:
    client = EachlabsClient("https://api.test/v1", "wan", transport=listing.transport())
    lane = _lane(KEY)
    clock = SystemClock()
    listings = Listings(client, stats)
    return LostCreates(
        settings(**{"resolve_lost": True, "lost_settle": 1.0, **changes}),
        client,
        Commits(listing.events),
        Source([]),
        stats,
        listings,
        InFlight(clock),
        [lane],
        clock,
    )


def test_a_lost_create_is_adopted_when_the_listing_shows_a_job_made_with_its_input() -> None:
    events = Events()
    listing = Listing(events, [_ended("theirs"), _ended("made")])
    row = entry(1)
    inputs = {**row.inputs, "seed": 4242}
    listing.inputs = {"made": inputs, "theirs": {**row.inputs, "seed": 7}}
    stats = RunStats()

    async def main() -> tuple[Settled, float]:
        lost = _lost(listing, stats)
        settled = await lost.settle(_lane(KEY), row, inputs, sent=0.0, given_up=2.0)
        return settled, now()

    settled, at = virtual(main)
    assert settled == Settled("adopted", "made")
    assert at >= 3.0  # looked up once the answer was due and the settle time had passed
    assert {pid for _, pid in events.of("get")} == {"made", "theirs"}


def test_where_the_get_shows_no_input_a_lost_create_is_unresolved_not_guessed() -> None:
    events = Events()
    listing = Listing(events, [_ended("unknown")])  # its GET carries no input
    row = entry(1)
    stats = RunStats()

    async def main() -> Settled:
        return await _lost(listing, stats).settle(_lane(KEY), row, row.inputs, 0.0, 2.0)

    assert virtual(main) == Settled("unresolved")


def test_without_the_listing_a_lost_create_is_unresolved_at_once() -> None:
    events = Events()
    listing = Listing(events, [_ended("made")])
    row = entry(1)

    async def main() -> Settled:
        lost = _lost(listing, RunStats(), resolve_lost=False)
        return await lost.settle(_lane(KEY), row, row.inputs, 0.0, 2.0)

    assert virtual(main) == Settled("unresolved")
    assert events.of("listing") == []  # nothing read: polling.listing is off


def _hooked(callback_at: float) -> tuple[Events, Callbacks]:
    """One job (10 s long) driven in webhook mode on one key, the provider's callback for it
    sent `callback_at` seconds into the run; what the parts did, and the callbacks' counts."""
    events = Events()
    provider = Provider(events, latency=10.0)
    hints = Callbacks(5)
    client = EachlabsClient("https://api.test/v1", "wan", transport=provider.transport())
    lane = KeyLane(KEY, CreateGate(100, 60.0), InFlightCap(1, KEY.name))
    planner = PollPlanner(
        expected_latency=10.0, target_delay=1.0, min_interval=1.0, max_interval=30.0
    )
    webhook = Webhook("https://hooks.test/wanbatch", None, hints)
    driver = KeyDriver(
        settings(),
        client,
        Commits(events),
        Source([entry(1)]),
        planner,
        RunStats(),
        [lane],
        webhook=webhook,
    )

    async def callback() -> None:
        await asyncio.sleep(callback_at)
        hints.hint(next(iter(provider.ends)))

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(callback)
            await driver.run_slot(lane)

    virtual(main)
    return events, hints


def test_a_callback_wakes_its_job_and_one_poll_confirms_the_end() -> None:
    events, hints = _hooked(callback_at=10.0)
    polls = [at for at, _ in events.of("poll")]
    (finish,) = [(at, u) for at, u in updates(events, Finish)]
    assert polls == [pytest.approx(10.0, abs=0.01)]  # at the callback, not the schedule
    assert finish[1].outcome.status is Status.SUCCEEDED
    assert hints.stats.ends_by_callback == 1 and hints.stats.unconfirmed == 0


def test_a_callback_a_poll_contradicts_is_counted_and_the_job_polled_on_the_schedule() -> None:
    events, hints = _hooked(callback_at=4.0)  # the job still runs then
    polls = [at for at, _ in events.of("poll")]
    assert polls[0] == pytest.approx(4.0, abs=0.01)  # the hint led to a poll at once
    assert hints.stats.unconfirmed == 1  # which found it running: a hint, not an end
    assert len(polls) >= 2 and polls[-1] >= 10.0  # its end seen by a later poll
    (finish,) = [u for _, u in updates(events, Finish)]
    assert finish.outcome.status is Status.SUCCEEDED  # booked once, at its real end


# -- the dispatcher ----------------------------------------------------------------------------


class Pages:
    """The journal's side as the dispatcher sees it: open jobs by row, a page at a time."""

    def __init__(self, jobs: list[Entry]) -> None:
        self.jobs = jobs

    def open_jobs(self, after_row: int, limit: int) -> list[Entry]:
        return [j for j in self.jobs if j.row_number > after_row][:limit]


def dispatcher(jobs: list[Entry], **options: Any) -> Dispatcher:
    given: dict[str, Any] = {"price_per_image_usd": 0.03, "budget": Budget(None)}
    given.update(options)
    made = Dispatcher(Pages(jobs), lanes=given.pop("lanes", 1), **given)  # type: ignore[arg-type]
    made.ingest_advanced(done=True)
    return made


def test_dispatcher_hands_out_rows_in_order_and_a_created_job_only_to_its_key() -> None:
    jobs = [entry(1), entry(2, status=Status.CREATED, prediction_id="p2", key_name="k2"), entry(3)]

    async def main() -> tuple[list[int | None], list[int | None]]:
        d = dispatcher(jobs, lanes=2)
        first = [getattr(await d.next_job("k1"), "row_number", None) for _ in range(3)]
        second = [getattr(await d.next_job("k2"), "row_number", None) for _ in range(2)]
        return first, second

    first, second = virtual(main)
    assert first == [1, 3, None]  # row 2 was created with k2: it is polled with k2 alone
    assert second == [2, None]


def test_dispatcher_hands_a_row_left_creating_to_the_key_that_sent_it_while_the_run_has_it() -> (
    None
):
    jobs = [
        entry(1, status=Status.CREATING, key_name="k2"),  # its create's key: looked up with it
        entry(2, status=Status.CREATING, key_name="gone"),  # a key this run lacks: any key
        entry(3),
    ]

    async def main() -> tuple[list[int | None], list[int | None]]:
        d = dispatcher(jobs, lanes=2, keys=("k1", "k2"))
        first = [getattr(await d.next_job("k1"), "row_number", None) for _ in range(3)]
        second = [getattr(await d.next_job("k2"), "row_number", None) for _ in range(2)]
        return first, second

    first, second = virtual(main)
    assert first == [2, 3, None]
    assert second == [1, None]


def test_dispatcher_stops_handing_out_at_the_budget_and_says_so() -> None:
    jobs = [entry(r) for r in range(1, 6)]

    async def main() -> tuple[list[int], bool]:
        d = dispatcher(jobs, budget=Budget(0.10))
        handed = []
        while (job := await d.next_job("k1")) is not None:
            handed.append(job.row_number)
        return handed, d.budget_hit.is_set()

    handed, hit = virtual(main)
    assert handed == [1, 2, 3]  # three at $0.03 fit in $0.10, a fourth would not
    assert hit


def test_dispatcher_rest_ends_at_the_pause_or_at_once_when_no_work_is_left() -> None:
    async def main() -> tuple[float, float]:
        d = dispatcher([entry(1)])
        job = await d.next_job("k1")
        assert job is not None
        d.give_back(job)  # a paused key gave it back: work is left, the rest lasts
        start = now()
        await d.rest(30.0)
        waited = now() - start
        assert await d.next_job("k1") is not None
        assert await d.next_job("k1") is None  # drained
        start = now()
        await d.rest(30.0)
        return waited, now() - start

    waited, drained = virtual(main)
    assert waited == pytest.approx(30.0)
    assert drained == pytest.approx(0.0, abs=1e-6)


def test_dispatcher_stops_handing_out_when_the_last_key_is_retired() -> None:
    async def main() -> None:
        d = dispatcher([entry(1)], lanes=2)
        d.retire("k1")
        assert d.no_key is None and not d.halted
        d.retire("k2")  # the slots end on their own: their creates out are answered first
        assert isinstance(d.no_key, NoUsableKeyError) and d.halted
        assert await d.next_job("k2") is None

    virtual(main)


# -- the group commit --------------------------------------------------------------------------


class File:
    """The journal file's side as the group commit sees it: batches applied, in order."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[Update]] = []
        self.fail = fail

    def apply(self, updates: list[Update]) -> None:
        if self.fail:
            raise sqlite3.OperationalError("disk I/O error")
        self.batches.append(list(updates))


def mark(row: int) -> MarkCreating:
    return MarkCreating(row, 1, KEY.name, 0.0)


def test_group_commit_makes_many_writers_durable_in_one_transaction() -> None:
    file = File()

    async def main() -> int:
        commit = GroupCommit(file)  # type: ignore[arg-type]
        async with asyncio.TaskGroup() as tasks:
            runner = tasks.create_task(commit.run())
            async with asyncio.TaskGroup() as writers:
                for row in range(1, 51):
                    writers.create_task(commit.write(mark(row)))
            runner.cancel()
        return commit.commits

    commits = virtual(main)
    assert sum(len(b) for b in file.batches) == 50
    assert commits == len(file.batches) <= 2  # fifty writers, not fifty fsyncs


def test_group_commit_lets_a_posted_update_wait_for_company_at_most_lazy_s() -> None:
    file = File()

    async def main() -> tuple[float, float]:
        commit = GroupCommit(file, lazy_s=0.2)  # type: ignore[arg-type]
        runner = asyncio.ensure_future(commit.run())
        start = now()
        done = commit.post(mark(1))
        await asyncio.sleep(0.1)
        assert not done.is_set() and file.batches == []  # still waiting for company
        commit.post(mark(2))
        await done.wait()
        durable_at = now() - start
        await commit.write(mark(3))  # a writer does not wait: committed at once
        written_at = now() - start
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        return durable_at, written_at

    durable_at, written_at = virtual(main)
    assert durable_at == pytest.approx(0.2, abs=0.01)
    assert written_at == pytest.approx(0.2, abs=0.01)
    assert [len(b) for b in file.batches] == [2, 1]


def test_an_answer_posted_is_durable_before_the_next_create_of_its_key_is_sent() -> None:
    """A create's answer is posted, not waited for: the key's next `creating` is written
    after it and waited for before that create is sent, so the answer is durable by then,
    whether a commit was under way when it was posted or not."""
    file = File()

    async def main() -> list[bool]:
        commit = GroupCommit(file, lazy_s=0.2)  # type: ignore[arg-type]
        runner = asyncio.ensure_future(commit.run())
        seen = []
        for under_way in (False, True):
            if under_way:  # a commit of another slot is being applied as the answer comes
                other = asyncio.ensure_future(commit.write(mark(9)))
                await asyncio.sleep(0)
            answered = commit.post(MarkCreated(1, "p-1", KEY.name, 0.0))
            await commit.write(mark(2))  # the key's next create: `creating`, then it is sent
            seen.append(answered.is_set())
            if under_way:
                await other
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        return seen

    assert virtual(main) == [True, True]
    order = [type(u).__name__ for batch in file.batches for u in batch]
    assert order.index("MarkCreated") < order.index("MarkCreating")


def test_group_commit_fails_every_writer_after_a_failed_transaction() -> None:
    async def main() -> None:
        commit = GroupCommit(File(fail=True))  # type: ignore[arg-type]
        runner = asyncio.ensure_future(commit.run())
        with pytest.raises(sqlite3.OperationalError):
            await commit.write(mark(1))
        with pytest.raises(sqlite3.OperationalError):
            commit.post(mark(2))  # nothing more is taken once the journal failed
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)

    virtual(main)


# -- the downloader ----------------------------------------------------------------------------


def png(width: int = 8, height: int = 6) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(out, "PNG")
    return out.getvalue()


def downloader(tmp_path: Path, handler: Any, events: Events, **section: Any) -> Downloader:
    assets = AssetsSection(**{"store": str(tmp_path / "images"), **section})
    store = FolderStore(tmp_path / "images", tmp_path)
    store.check()
    return Downloader(assets, store, Commits(events), transport=httpx.MockTransport(handler))


def test_downloader_stores_each_image_whole_and_journals_it(tmp_path: Path) -> None:
    events = Events()
    image = png()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("broken.png"):
            return httpx.Response(200, content=b"\x89PNG not really an image")
        return httpx.Response(200, content=image, headers={"Content-Type": "image/png"})

    async def main() -> None:
        kept = downloader(tmp_path, handler, events, attempts=2)
        kept.submit(1, "job-1", ["https://cdn.test/a.png", "https://cdn.test/b.png"])
        kept.submit(2, "job-2", ["https://cdn.test/broken.png"])
        kept.close()
        await kept.run([])

    virtual(main)
    stored = [u for _, u in updates(events, StoreImage)]
    assert sorted((u.row_number, u.index) for u in stored) == [(1, 0), (1, 1)]
    for u in stored:
        assert (tmp_path / u.path).read_bytes() == image
        assert (u.width, u.height) == (8, 6)
    (failed,) = [u for _, u in updates(events, FailImage)]
    assert failed.row_number == 2 and "BadImage" in failed.error
    assert not list((tmp_path / "images").glob(".*.tmp"))  # nothing half-written is left


def test_downloader_gives_up_on_a_slow_server_at_its_timeout(tmp_path: Path) -> None:
    events = Events()

    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(3600)  # an hour, in virtual time
        return httpx.Response(200, content=png())

    async def main() -> float:
        kept = downloader(tmp_path, handler, events, download_timeout_s=45)
        kept.submit(1, "job-1", ["https://cdn.test/slow.png"])
        kept.close()
        start = now()
        await kept.run([])
        return now() - start

    took = virtual(main)
    (failed,) = [u for _, u in updates(events, FailImage)]
    assert "45 s (assets.download_timeout_s)" in failed.error
    assert 45.0 <= took < 60.0  # stopped at its timeout (and the inputs' short grace)
