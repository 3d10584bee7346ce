"""A Ray worker of a distributed run (`--workers`): it drives the keys it owns with the same
`Worker` as a local run, takes its jobs from the driver's dispatcher and sends every journal
update to the driver, which makes it durable in the journal of record before it answers.

The worker only answers the driver's calls: `collect()` returns what the worker has to say
(updates to journal, jobs asked for, jobs given back, keys refused, thumbnails, log events and
its figures) once there is something, or after a second; `deliver()` brings the driver's answers
(which updates are durable, jobs, stop orders). So the worker needs no address of the driver,
and a worker that dies is seen by the driver's next call failing. A slot asks for one job when
it is free, and each key keeps one job ready beyond its slots (`_PREFETCH`): a freed slot takes
it at once instead of waiting a driver round trip, and asks for the next. So a worker holds at
most one job a key that another could do, for at most one job's turn; a pause, a stop or a
refused key gives it back at once.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Collection, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog

from pipeline.core import ApiKey, JobOutcome, RunConfig, Timings, make_thumbnail, run_stats
from pipeline.drive.assemble import KeySide, assemble
from pipeline.drive.lanes import key_states
from pipeline.intake import Uploads
from pipeline.journal import Entry, Update
from pipeline.observe import KeyState
from pipeline.outputs import Downloader

__all__ = ["Figures", "Orders", "Report", "WorkerProcess", "WorkerSetup"]

_REPORT_EVERY_S = 1.0  # a report goes out at least this often, for the figures
_PREFETCH = 1  # jobs a key holds ready beyond its slots' own asks


@dataclass(frozen=True, slots=True)
class WorkerSetup:
    """What a worker is started with: the keys it owns (a whole group of limits.groups, or
    none of it) and the creates of theirs the provider's window may still hold."""

    index: int
    config: RunConfig
    timings: Timings  # the run's, planned by the driver
    keys: list[ApiKey]
    groups: list[list[str]]  # limits.groups, as key names
    base_url: str
    recent: dict[str, list[float]]
    uploads: bool  # inputs were uploaded to assets.upload_to: sign them at each create
    store_marker: str | None = None  # a folder store: this file must be visible in it


@dataclass(frozen=True, slots=True)
class Figures:
    """A worker's counters (cumulative, this life), its new job ends, and its keys."""

    counters: dict[str, int]
    latencies: list[float]  # since the last report
    notice_delays: list[float]
    downloads: tuple[int, int, int]  # images stored, failed, bytes
    keys: tuple[KeyState, ...]
    host: str
    pid: int
    cpu_s: float
    peak_rss_mb: float


@dataclass(frozen=True, slots=True)
class Report:
    """Worker to driver. `seq` numbers the batch of `updates` (0: none)."""

    seq: int
    updates: list[Update]
    asks: dict[str, int]
    given_back: list[Entry]
    reserves: list[int]  # rows whose create is to be sent again: may the budget take it
    retired: list[str]
    thumbs: list[tuple[str, bytes]]
    logs: list[tuple[str, dict[str, Any]]]
    figures: Figures
    done: bool = False  # the worker's last report: every update of it is durable
    failure: str | None = None  # why the worker stopped, when it was not its work's end
    stop: tuple[str, str] | None = None  # creates stopped (the balance, an outage): why


@dataclass(frozen=True, slots=True)
class Orders:
    """Driver to worker: update batches up to `acked` are durable; `jobs` answer asks."""

    acked: int = 0
    jobs: list[tuple[str, Entry | None]] = field(default_factory=list)
    halt: bool = False  # no new creates (a signal, the budget): jobs handed out go back
    abandon: bool = False  # stop now and cancel the jobs in flight
    cancel_in_flight: bool = False  # budget.cancel_in_flight
    open_elsewhere: bool = False  # a key of another worker is serving and not paused
    reserved: list[tuple[int, bool]] = field(default_factory=list)  # answers to `reserves`


class Outbox:
    """What the worker has to tell the driver, gathered between two collects. As the
    worker's `Commits`, an update is durable once the driver acknowledges its batch."""

    def __init__(self) -> None:
        self._updates: list[Update] = []
        self._batch = asyncio.Event()
        self._sent: dict[int, asyncio.Event] = {}
        self._seq = 0
        self._ready = asyncio.Event()
        self._empty = asyncio.Event()
        self.asks: Counter[str] = Counter()
        self.given_back: list[Entry] = []
        self.reserves: list[int] = []
        self.retired: list[str] = []
        self.thumbs: list[tuple[str, bytes]] = []  # appended from download threads
        self.logs: list[tuple[str, dict[str, Any]]] = []
        self.done = False
        self.failure: str | None = None
        self.stop: tuple[str, str] | None = None

    def stopped(self, cause: str, said: str) -> None:
        """This worker stops its creates: `cause` ("balance" or "outage") and what was said."""
        self.stop = (cause, said)

    def ended(self, failure: str | None) -> None:
        """The worker's work is over (`failure`: why it failed, if it did): said at the next
        report."""
        self.failure = failure
        self.done = True
        self.wake()

    async def write(self, *updates: Update) -> None:
        await self.post(*updates).wait()

    def post(self, *updates: Update) -> asyncio.Event:
        self._updates.extend(updates)
        self.wake()
        return self._batch

    async def durable(self, done: asyncio.Event) -> None:
        if not done.is_set():
            self.wake()
            await done.wait()

    async def known(self, ids: Collection[str]) -> set[str]:
        """None from here: the driver's journal is a collect away. A worker settles a lost
        create on what it knows itself (its key's answered creates) and on the input."""
        return set()

    def wake(self) -> None:
        self._ready.set()

    def acked(self, seq: int) -> None:
        for number in [n for n in self._sent if n <= seq]:
            self._sent.pop(number).set()
        if not self._sent:
            self._empty.set()

    async def settled(self) -> None:
        """Until every update posted so far is durable at the driver."""
        while self._updates or self._sent:
            self._empty.clear()
            self.wake()
            await self._empty.wait()

    async def take(self, figures: Callable[[], Figures]) -> Report:
        """What there is to send: at once if anything waits, else within a second."""
        with anyio.move_on_after(_REPORT_EVERY_S):
            await self._ready.wait()
        self._ready.clear()
        seq = 0
        updates, self._updates = self._updates, []
        if updates:
            self._seq = seq = self._seq + 1
            self._sent[seq], self._batch = self._batch, asyncio.Event()
        report = Report(
            seq,
            updates,
            dict(self.asks),
            self.given_back,
            self.reserves,
            self.retired,
            self.thumbs,
            self.logs,
            figures(),
            done=self.done and not updates and not self._sent,
            failure=self.failure,
            stop=self.stop,
        )
        self.asks = Counter()
        self.given_back, self.retired, self.thumbs, self.logs = [], [], [], []
        self.reserves = []
        return report


class Handouts:
    """The worker's `JobSource`: each free slot asks the driver's dispatcher for a job."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self._waiting: defaultdict[str, deque[asyncio.Future[Entry | None]]] = defaultdict(deque)
        self._ready: defaultdict[str, deque[Entry]] = defaultdict(deque)  # jobs held ahead
        self._asked: Counter[str] = Counter()  # asks of a key not answered yet
        self._dry: set[str] = set()  # keys the driver said have no more work: none asked ahead
        self._drained = asyncio.Event()  # the driver said a key has no more work
        self._reserving: dict[int, asyncio.Future[bool]] = {}
        self.halted = False
        self.abandoned = False
        self.open_elsewhere = False  # a paused key's job can go to another worker's key

    async def next_job(self, key_name: str) -> Entry | None:
        if self.halted:
            return None
        ready = self._ready[key_name]
        if ready:
            entry = ready.popleft()
            self._ask(key_name)
            return entry
        answer: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
        self._waiting[key_name].append(answer)
        self._ask(key_name)
        return await answer

    def _ask(self, key_name: str) -> None:
        """Ask for the jobs the key's waiting slots, and its job held ahead, still lack."""
        ahead = 0 if key_name in self._dry else _PREFETCH
        want = len(self._waiting[key_name]) + ahead
        missing = want - len(self._ready[key_name]) - self._asked[key_name]
        if missing > 0:
            self._asked[key_name] += missing
            self._outbox.asks[key_name] += missing
            self._outbox.wake()

    def deliver(self, key_name: str, entry: Entry | None) -> None:
        self._asked[key_name] = max(0, self._asked[key_name] - 1)
        queue = self._waiting[key_name]
        while queue:
            answer = queue.popleft()
            if not answer.done():  # a slot cancelled while it waited does not take it
                answer.set_result(entry)
                break
        else:
            if entry is not None:
                if self.halted or key_name in self._dry:
                    self.give_back(entry)
                else:
                    self._ready[key_name].append(entry)
        if entry is None:
            self._dry.add(key_name)
            self._drained.set()

    def give_back(self, entry: Entry) -> None:
        """A job not started goes back to the driver, and with it every job held ahead: a
        paused key's, or all of them when the run stops."""
        self._outbox.given_back.append(entry)
        self.give_back_ready()

    def give_back_ready(self, key_name: str | None = None) -> None:
        """The jobs held ahead (of one key, or of all) go back to the driver."""
        for name in [key_name] if key_name is not None else list(self._ready):
            self._outbox.given_back.extend(self._ready.pop(name, ()))
        self._outbox.wake()

    def obey(self, orders: Orders) -> bool:
        """The driver's stops and whether another worker's key is open; True when the orders
        abandon the jobs here for the first time."""
        if orders.halt and not self.halted:
            self.halted = True
            self.give_back_ready()
        self.open_elsewhere = orders.open_elsewhere
        if orders.abandon and not self.abandoned:
            self.abandoned = True
            return True
        return False

    def stop_creates(self, cause: str, said: str) -> None:
        """No create from this worker from now on; the driver's dispatcher stops the others."""
        self.halted = True
        self._outbox.stopped(cause, said)
        self.give_back_ready()

    def retire(self, key_name: str) -> None:
        self._dry.add(key_name)
        self.give_back_ready(key_name)
        self._outbox.retired.append(key_name)
        self._outbox.wake()

    async def rest(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._drained.wait()

    def settle(self, entry: Entry, outcome: JobOutcome) -> None:
        """The driver settles the budget as it journals the job's end."""

    async def reserve(self, entry: Entry) -> bool:
        """Asks the driver's dispatcher, which holds the run's budget."""
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._reserving[entry.row_number] = answer
        self._outbox.reserves.append(entry.row_number)
        self._outbox.wake()
        return await answer

    def reserved(self, row_number: int, granted: bool) -> None:
        answer = self._reserving.pop(row_number, None)
        if answer is not None and not answer.done():
            answer.set_result(granted)


class _RemoteThumbs:
    """Thumbnails made here and written into the run folder by the driver."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox

    def put(self, name: str, data: bytes) -> None:
        self._outbox.thumbs.append((name, make_thumbnail(data)))


def _forward_logs(outbox: Outbox) -> None:
    """This process's log events go to the driver, which writes them to run.log."""

    def forward(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        event.pop("exc_info", None)
        outbox.logs.append((method, dict(event)))
        raise structlog.DropEvent

    structlog.configure(
        processors=[forward],
        wrapper_class=structlog.make_filtering_bound_logger(20),  # info and up
        cache_logger_on_first_use=False,
    )


class WorkerProcess:
    """The Ray actor (made one by `cluster.py`); its methods run on its event loop."""

    def __init__(self, setup: WorkerSetup) -> None:
        self._setup = setup
        self._outbox = Outbox()
        self._handouts = Handouts(self._outbox)
        self._stats = run_stats(webhook=False, download=setup.config.assets.download)
        self._reported = 0  # job ends already reported
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots: anyio.CancelScope | None = None
        self._side: KeySide | None = None

    def check(self) -> str | None:
        """What keeps this worker from doing its part (None: nothing), before any create."""
        marker = self._setup.store_marker
        if marker is not None and not Path(marker).is_file():
            store = Path(marker).parent
            return (
                f"assets.store {store} is a folder that worker {self._setup.index} on host "
                f"{socket.gethostname()} cannot see: on a cluster, set assets.store to object "
                "storage (s3://, gs://, az://) or a folder every node shares"
            )
        return None

    def start(self) -> None:
        """Drive the keys until no work is left for them (or the driver stops the run)."""
        _forward_logs(self._outbox)
        task = asyncio.get_running_loop().create_task(self._main())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def collect(self) -> Report:
        return await self._outbox.take(self._figures)

    async def deliver(self, orders: Orders) -> None:
        self._outbox.acked(orders.acked)
        for key_name, entry in orders.jobs:
            self._handouts.deliver(key_name, entry)
        for row_number, granted in orders.reserved:
            self._handouts.reserved(row_number, granted)
        newly_abandoned = self._handouts.obey(orders)
        side = self._side
        if newly_abandoned and self._slots is not None:
            self._slots.cancel()
        if orders.cancel_in_flight and side is not None and not side.driver.flight.cancel_all:
            task = asyncio.get_running_loop().create_task(side.driver.cancel_in_flight())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _main(self) -> None:
        failure = None
        try:
            await self._drive()
        except Exception as exc:  # noqa: BLE001 - said to the driver, which ends the run
            structlog.get_logger("pipeline.drive.ray.remote").exception("worker_failed")
            failure = f"{type(exc).__name__}: {exc}"
        await self._outbox.settled()
        self._outbox.ended(failure)

    async def _drive(self) -> None:
        s = self._setup
        config = s.config
        a = config.assets
        uploads = None
        if s.uploads and a.upload_to is not None:
            uploads = Uploads(a.upload_to, a.storage_options, a.upload_url_lifetime_s)
        side = self._side = assemble(
            config,
            s.timings,
            s.base_url,
            s.keys,
            s.groups,
            self._outbox,
            self._handouts,
            self._stats,
            s.recent,
            thumbs=_RemoteThumbs(self._outbox),
            uploads=uploads,
            open_elsewhere=lambda: self._handouts.open_elsewhere,
        )
        driver = side.driver
        downloads = anyio.Event()
        try:
            async with anyio.create_task_group() as services:
                if driver.downloader is not None:
                    services.start_soon(_download, driver.downloader, downloads)
                async with anyio.create_task_group() as slots:
                    self._slots = slots.cancel_scope
                    for lane in side.lanes:
                        slots.start_soon(driver.run_lane, lane, config.limits.max_concurrent)
                if self._handouts.abandoned and driver.flight:
                    grace = s.timings.cancel_grace_s
                    await driver.cancel_in_flight(confirm_within=grace)
                if driver.downloader is not None and not self._handouts.abandoned:
                    driver.downloader.close()
                    await downloads.wait()
                services.cancel_scope.cancel()
        finally:
            if driver.downloader is not None:
                driver.downloader.discard()
            await side.client.aclose()

    def _figures(self) -> Figures:
        st = self._stats
        new = slice(self._reported, len(st.latencies))
        self._reported = len(st.latencies)
        d = st.downloads
        usage = resource.getrusage(resource.RUSAGE_SELF)
        side = self._side
        return Figures(
            counters=st.counted(),
            latencies=list(st.latencies[new]),
            notice_delays=list(st.notice_delays[new]),
            downloads=(d.stored, d.failed, d.bytes) if d is not None else (0, 0, 0),
            keys=key_states(side.lanes, side.driver.flight.lanes()) if side is not None else (),
            host=socket.gethostname(),
            pid=os.getpid(),
            cpu_s=usage.ru_utime + usage.ru_stime,
            peak_rss_mb=usage.ru_maxrss / 1024,
        )


async def _download(downloader: Downloader, done: anyio.Event) -> None:
    try:
        await downloader.run([])
    finally:
        done.set()
