"""The driver's side of a distributed run (`--workers N`): Ray workers (`remote.py`), each
owning some keys, fed from the driver's dispatcher, their updates made durable in the
driver's journal of record.

Keys are owned, never shared: each key, or each group of limits.groups, is driven by one
worker at a time, so every limit stays exact with no shared limiter; the keys are spread so
that the workers' capacities (what their keys can finish per second) are as equal as they can
be. A worker that dies (its process killed, its node lost) loses nothing: once what it sent is
durable, its unfinished jobs are read again from the journal and handed to its replacement,
which owns the same keys, polls the journaled jobs again and counts creates that were in
flight as ambiguous, as a resumed run does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import structlog

from pipeline.core import COUNTERS, ApiKey, ConfigError, RunConfig, RunStats, WanbatchError
from pipeline.drive.dispatcher import Dispatcher
from pipeline.drive.ray.remote import Figures, Orders, Report, WorkerProcess, WorkerSetup
from pipeline.journal import Entry, Finish, GroupCommit, Journal
from pipeline.observe import KeyState, WorkerState
from pipeline.outputs import THUMBS, save_thumb

__all__ = ["Cluster", "WorkerLost", "Workers", "check_workers", "ray_session", "spread"]

_log = structlog.get_logger("pipeline.drive.ray.cluster")
_MAX_RESTARTS = 3  # replacements of one worker before the run stops (and can be resumed)
_ORDERS_TICK_S = 0.5  # how often a stop order is looked for when nothing else is sent
_INSTALL = "pip install 'wanbatch[ray]'"


class WorkerLost(WanbatchError):
    """A worker died more often than it may be replaced, or failed outright."""


class _StartFailed(ConfigError):
    """A worker died before it could say whether it can do its part."""


@dataclass(frozen=True, slots=True)
class Workers:
    """`--workers N` and where the Ray cluster is (None: RAY_ADDRESS, else a local one)."""

    count: int
    address: str | None = None


def check_workers(workers: Workers, config: RunConfig) -> None:
    """What refuses `--workers` before anything is read: no Ray, a bad count, webhooks."""
    if workers.count < 1:
        raise ConfigError(f"--workers must be at least 1, not {workers.count}")
    if config.webhook.enabled:
        raise ConfigError(
            "webhook.enabled and --workers cannot go together yet: each worker would need a "
            "receiver of its own that the provider can reach; use polling with --workers"
        )
    _ray()


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--workers needs Ray, an optional extra: {_INSTALL}") from None
    return ray


@contextmanager
def ray_session(workers: Workers) -> Iterator[Any]:
    """Ray, connected: to a cluster this process joined already (kept), to `address` or
    RAY_ADDRESS, or to a local cluster started here and stopped after the run."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    address = workers.address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(
                num_cpus=max(os.cpu_count() or 1, workers.count),
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,  # Ray's own start-up lines stay off the terminal
            )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"at {address}" if address else "locally"
        raise ConfigError(f"a Ray cluster cannot be reached {where}: {exc}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def spread(
    keys: list[ApiKey], groups: list[list[str]], count: int, config: RunConfig
) -> list[list[ApiKey]]:
    """The keys in at most `count` sets of equal capacity, a group of limits.groups never
    split: largest first, each onto the set that can finish least per second so far."""
    limits = config.limits
    rate = limits.creates_per_window / limits.window_s
    per_cap = limits.max_concurrent / max(config.polling.expected_latency_s, 1e-9)
    grouped = {name for group in groups for name in group}
    by_name = {k.name: k for k in keys}
    units = [[by_name[n] for n in group if n in by_name] for group in groups]
    units = [u for u in units if u] + [[k] for k in keys if k.name not in grouped]
    # a group shares one in-flight cap; a key alone has its own
    units.sort(key=lambda u: -min(len(u) * rate, per_cap))
    sets: list[list[ApiKey]] = [[] for _ in range(min(count, len(units)))]
    load = [0.0] * len(sets)
    for unit in units:
        least = load.index(min(load))
        sets[least] += unit
        load[least] += min(len(unit) * rate, per_cap)
    return sets


@dataclass
class _Member:
    """One worker's place in the run, over its lives (a replacement takes the same place)."""

    index: int
    keys: list[ApiKey]
    actor: Any = None
    handed: dict[int, Entry] = field(default_factory=dict)  # jobs it holds, by row
    restarts: int = 0
    state: str = "starting"
    figures: Figures | None = None
    counted: dict[str, int] = field(default_factory=dict)  # counters merged, this life
    finished: int = 0  # jobs it saw end, over all its lives
    cpu_before: float = 0.0  # CPU seconds of its earlier lives
    peak_rss_mb: float = 0.0  # the most any of its lives held
    stored: tuple[int, int, int] = (0, 0, 0)  # downloads merged, this life
    acked: int = 0
    last_post: asyncio.Event | None = None  # the last of its updates given to the journal
    jobs: list[tuple[str, Entry | None]] = field(default_factory=list)
    reserved: list[tuple[int, bool]] = field(default_factory=list)  # answers to send
    wake: anyio.Event = field(default_factory=anyio.Event)
    sent: tuple[object, ...] = ()  # the last orders' acked batch and flags: resent on change

    @property
    def name(self) -> str:
        return f"worker-{self.index}"


class Cluster:
    """The workers of one run; also its view for the progress, and what the driver's signal
    and budget handling stop."""

    def __init__(
        self,
        ray: Any,
        config: RunConfig,
        key_sets: list[list[ApiKey]],
        groups: list[list[str]],
        base_url: str,
        uploads: bool,
    ) -> None:
        self._ray = ray
        self._config = _absolute(config)
        self._groups = groups
        self._base_url = base_url
        self._uploads = uploads
        self.members = [_Member(i + 1, keys) for i, keys in enumerate(key_sets)]
        _log.info(
            "workers_planned",
            workers={m.name: [k.name for k in m.keys] for m in self.members},
        )
        self._abandon = False
        self._cancel = False
        self._deadline = math.inf
        self._marker: Path | None = None
        self._returns = anyio.Event()
        self._actor_class = ray.remote(WorkerProcess)
        self._env = _forwarded_env()

    # -- the run's view ------------------------------------------------------------------------

    def keys(self) -> tuple[KeyState, ...]:
        states: list[KeyState] = []
        for m in self.members:
            if m.figures is not None and m.state == "working":
                states += m.figures.keys
            else:
                states += [KeyState(k.name, 0, m.state) for k in m.keys]
        return tuple(states)

    def workers(self) -> tuple[WorkerState, ...]:
        return tuple(
            WorkerState(
                m.name,
                m.figures.host if m.figures is not None else "",
                len(m.keys),
                sum(k.in_flight for k in m.figures.keys) if m.figures is not None else 0,
                m.finished,
                m.restarts,
                m.state,
            )
            for m in self.members
        )

    def figures(self) -> list[dict[str, Any]]:
        """Per worker, for summary.json."""
        return [
            {
                "worker": m.name,
                "keys": [k.name for k in m.keys],
                "host": m.figures.host if m.figures is not None else None,
                "pid": m.figures.pid if m.figures is not None else None,
                "restarts": m.restarts,
                "jobs_finished": m.finished,
                "cpu_s": round(m.cpu_before + (m.figures.cpu_s if m.figures else 0.0), 3),
                "peak_rss_mb": round(m.peak_rss_mb, 1),
            }
            for m in self.members
        ]

    # -- stopping ------------------------------------------------------------------------------

    def limit(self, seconds: float) -> None:
        """Jobs in flight get `seconds` more; then the workers stop and cancel them."""
        self._deadline = min(self._deadline, time.monotonic() + seconds)
        self._wake_all()

    def cancel(self) -> None:
        """Stop now: the workers cancel their jobs in flight at the provider."""
        self._abandon = True
        self._wake_all()

    async def cancel_in_flight(self) -> None:
        """budget.cancel_in_flight: every worker cancels its jobs in flight."""
        self._cancel = True
        self._wake_all()

    def _wake_all(self) -> None:
        for m in self.members:
            m.wake.set()

    # -- serving -------------------------------------------------------------------------------

    @asynccontextmanager
    async def started(self, journal: Journal) -> AsyncIterator[None]:
        """Every worker started and checked (ConfigError before any create if one cannot do
        its part); they are stopped when the block ends."""
        self._check_reach()
        with self._store_marker():
            try:
                async with anyio.create_task_group() as tg:
                    for member in self.members:
                        tg.start_soon(self._spawn, member, journal)
            except* ConfigError as group:
                raise group.exceptions[0] from None
            try:
                yield
            finally:
                for member in self.members:
                    if member.actor is not None:
                        self._ray.kill(member.actor, no_restart=True)

    async def serve(
        self, journal: Journal, commit: GroupCommit, dispatcher: Dispatcher, stats: RunStats
    ) -> None:
        """Until every worker has no more work (or the run is stopped)."""
        async with anyio.create_task_group() as tg:
            for member in self.members:
                tg.start_soon(self._keep, member, journal, commit, dispatcher, stats)

    def _check_reach(self) -> None:
        """A provider on this machine's loopback (the sandbox) serves a one-node cluster
        only: workers on other nodes could not reach it."""
        host = urlsplit(self._base_url).hostname or ""
        if not (host == "localhost" or host == "::1" or host.startswith("127.")):
            return
        nodes = [n for n in self._ray.nodes() if n.get("Alive")]
        if len(nodes) > 1:
            raise ConfigError(
                f"api.base_url {self._base_url} is on this machine's loopback, which workers "
                f"on the cluster's {len(nodes) - 1} other node(s) cannot reach: run the sandbox "
                "on an address the nodes share, or use a one-node cluster"
            )

    @contextmanager
    def _store_marker(self) -> Iterator[None]:
        """A folder store gets a file each worker must see there: a worker on a node that
        cannot reach the folder stops the run before any create."""
        a = self._config.assets
        if not a.download or "://" in a.store:
            yield
            return
        folder = Path(a.store)
        folder.mkdir(parents=True, exist_ok=True)
        self._marker = folder / f".wanbatch-reach-{secrets.token_hex(6)}"
        self._marker.write_text("every worker must see this file\n")
        try:
            yield
        finally:
            self._marker.unlink(missing_ok=True)

    async def _spawn(self, member: _Member, journal: Journal) -> None:
        """A worker for `member`'s keys, checked, its gates seeded with their recent creates."""
        window = self._config.scaled(self._config.limits.window_s)
        recent = await anyio.to_thread.run_sync(journal.recent_creates, time.time() - window)
        mine = {k.name for k in member.keys}
        setup = WorkerSetup(
            member.index,
            self._config,
            member.keys,
            self._groups,
            self._base_url,
            {name: at for name, at in recent.items() if name in mine},
            self._uploads,
            str(self._marker) if self._marker is not None else None,
        )
        # the worker's name in its environment, for `ps e` and the operator's tools
        env = {**self._env, "WANBATCH_WORKER": member.name}
        if member.figures is not None:  # a replacement: the dead life's CPU is kept
            member.cpu_before += member.figures.cpu_s
            member.figures = None
        member.actor = self._actor_class.options(
            num_cpus=1,
            scheduling_strategy="SPREAD",
            max_restarts=0,
            runtime_env={"env_vars": env},
        ).remote(setup)
        member.state, member.counted, member.stored = "starting", {}, (0, 0, 0)
        member.acked, member.jobs, member.sent = 0, [], ()
        try:
            problem = await member.actor.check.remote()
        except self._ray.exceptions.RayActorError as exc:
            raise _StartFailed(f"{member.name} could not start: {_first_line(exc)}") from None
        if problem is not None:
            raise ConfigError(problem)

    async def _keep(
        self,
        member: _Member,
        journal: Journal,
        commit: GroupCommit,
        dispatcher: Dispatcher,
        stats: RunStats,
    ) -> None:
        """The worker's lives: served, and replaced when it dies."""
        while await self._life(member, commit, dispatcher, stats):
            member.state = "replacing"
            if member.last_post is not None:  # what it sent is journaled before its jobs are read
                await commit.durable(member.last_post)
            await self._recover(member, journal, dispatcher)
            await self._replace(member, journal)
        member.state = "done"
        member.handed.clear()  # every job it held ended or was given back
        self._returned()

    async def _replace(self, member: _Member, journal: Journal) -> None:
        """A new worker for a dead one's keys; one that dies as it starts is another death."""
        while True:
            if member.restarts >= _MAX_RESTARTS:
                raise WorkerLost(
                    f"{member.name} died {member.restarts + 1} times; its jobs are kept in the "
                    "journal: run the same command again to resume"
                )
            member.restarts += 1
            _log.warning("worker_replaced", worker=member.name, restarts=member.restarts)
            self._ray.kill(member.actor, no_restart=True)
            try:
                await self._spawn(member, journal)
                return
            except _StartFailed as exc:
                _log.warning("worker_died", worker=member.name, error=str(exc))
            except ConfigError as exc:
                raise WorkerLost(f"{member.name} could not be replaced: {exc}") from None

    async def _life(
        self, member: _Member, commit: GroupCommit, dispatcher: Dispatcher, stats: RunStats
    ) -> bool:
        """One life of a worker, from its start to its last report; True when it died."""
        actor = member.actor
        died = False
        try:
            await actor.start.remote()
            member.state = "working"
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._send_orders, member, dispatcher)
                while True:
                    report = await actor.collect.remote()
                    self._take(member, report, commit, dispatcher, stats, tg)
                    if report.done:
                        break
                tg.cancel_scope.cancel()
        except* self._ray.exceptions.RayActorError as group:
            _log.warning("worker_died", worker=member.name, error=_first_line(group.exceptions[0]))
            died = True
        if died:
            return True
        if report.failure is not None:
            raise WorkerLost(f"{member.name} failed: {report.failure}")
        return False

    def _take(
        self,
        member: _Member,
        report: Report,
        commit: GroupCommit,
        dispatcher: Dispatcher,
        stats: RunStats,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        """What a worker said: its updates journaled, its asks and given-back jobs to the
        dispatcher, its figures into the run's."""
        for entry in report.given_back:
            member.handed.pop(entry.row_number, None)
            dispatcher.give_back(entry)
        if report.given_back:
            self._returned()
        if report.updates:
            for update in report.updates:
                if isinstance(update, Finish):
                    held = member.handed.pop(update.row_number, None)
                    if held is not None:
                        dispatcher.settle(held, update.outcome)
                        if not member.handed:  # asks waiting on its jobs look again
                            self._returned()
            member.last_post = commit.post(*report.updates)
            tg.start_soon(self._ack, member, commit, member.last_post, report.seq)
        for row_number in report.reserves:
            held = member.handed.get(row_number)
            member.reserved.append((row_number, held is not None and dispatcher.reserve_now(held)))
            member.wake.set()
        for name in report.retired:
            dispatcher.retire(name)
        for key_name, count in report.asks.items():
            for _ in range(count):
                tg.start_soon(self._hand, member, dispatcher, key_name)
        if report.thumbs:
            folder = self._config.output.dir / THUMBS
            tg.start_soon(_save_thumbs, folder, report.thumbs)
        for method, event in report.logs:
            _relog(member.name, method, event)
        self._merge(member, report.figures, stats)

    async def _ack(
        self, member: _Member, commit: GroupCommit, done: asyncio.Event, seq: int
    ) -> None:
        await commit.durable(done)
        member.acked = max(member.acked, seq)
        member.wake.set()

    async def _hand(self, member: _Member, dispatcher: Dispatcher, key_name: str) -> None:
        """A job for a free slot of `member`'s key. While other workers hold jobs that may
        come back (a paused key gives its unstarted jobs back, a dead worker's are read
        again), "no more work" waits for them rather than ending the slot."""
        while True:
            entry = await dispatcher.next_job(key_name)
            if entry is not None or dispatcher.stopped or not self._held_elsewhere(member):
                break
            with anyio.move_on_after(_ORDERS_TICK_S):
                await self._returns.wait()
        if entry is not None:
            member.handed[entry.row_number] = entry
        member.jobs.append((key_name, entry))
        member.wake.set()

    async def _send_orders(self, member: _Member, dispatcher: Dispatcher) -> None:
        """The driver's answers, in batches: what piled up while the last call was out."""
        while True:
            with anyio.move_on_after(_ORDERS_TICK_S):
                await member.wake.wait()
            member.wake = anyio.Event()
            if time.monotonic() >= self._deadline:
                self._abandon = True
            flags = (
                dispatcher.halted,
                self._abandon or dispatcher.abandoned,
                self._cancel,
                self._open_elsewhere(member),
            )
            now = (member.acked, *flags)
            if not member.jobs and not member.reserved and now == member.sent:
                continue
            jobs, member.jobs = member.jobs, []
            reserved, member.reserved = member.reserved, []
            orders = Orders(member.acked, jobs, *flags, reserved=reserved)
            member.sent = now
            await member.actor.deliver.remote(orders)

    def _held_elsewhere(self, member: _Member) -> bool:
        return any(other is not member and other.handed for other in self.members)

    def _returned(self) -> None:
        """A job came back to the dispatcher, or a worker ended: waiting asks look again."""
        self._returns.set()
        self._returns = anyio.Event()

    def _open_elsewhere(self, member: _Member) -> bool:
        """Whether a key of another worker was serving and not paused at its last report."""
        return any(
            key.state == "working"
            for other in self.members
            if other is not member and other.state == "working" and other.figures is not None
            for key in other.figures.keys
        )

    def _merge(self, member: _Member, figures: Figures, stats: RunStats) -> None:
        for counter in COUNTERS:
            name = counter.name
            value = figures.counters.get(name, 0)
            setattr(stats, name, getattr(stats, name) + value - member.counted.get(name, 0))
        member.finished += figures.counters.get("finished", 0) - member.counted.get("finished", 0)
        member.counted = dict(figures.counters)
        for latency, delay in zip(figures.latencies, figures.notice_delays, strict=True):
            stats.job_ended(latency, delay)
        if stats.downloads is not None:
            d = stats.downloads
            new = [
                now - before for now, before in zip(figures.downloads, member.stored, strict=True)
            ]
            d.stored, d.failed, d.bytes = d.stored + new[0], d.failed + new[1], d.bytes + new[2]
            member.stored = figures.downloads
        member.figures = figures
        member.peak_rss_mb = max(member.peak_rss_mb, figures.peak_rss_mb)

    async def _recover(self, member: _Member, journal: Journal, dispatcher: Dispatcher) -> None:
        """A dead worker's jobs, as the journal holds them now, go back to be handed out."""
        rows = list(member.handed)
        member.handed.clear()
        entries = await anyio.to_thread.run_sync(journal.open_entries, rows)
        for entry in entries:
            dispatcher.give_back(entry)
        self._returned()
        _log.warning("worker_jobs_recovered", worker=member.name, jobs=len(entries))


# what the workers read from their environment as the driver does: object storage's
# credentials and endpoints (obstore), and the proxies and CA of httpx
_FORWARDED = ("AWS_", "GOOGLE_", "AZURE_", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "SSL_CERT_")


def _forwarded_env() -> dict[str, str]:
    """The driver's settings that workers need, so a worker on any node reaches the same
    store, provider and proxy (sent to the workers through Ray, never logged)."""
    return {
        name: value for name, value in os.environ.items() if name.upper().startswith(_FORWARDED)
    }


def _absolute(config: RunConfig) -> RunConfig:
    """The config with the run folder and a folder store made absolute: a worker's working
    folder is not the driver's."""
    store = config.assets.store
    if "://" not in store:
        store = str(Path(store).absolute())
    return config.model_copy(
        update={
            "output": config.output.model_copy(update={"dir": config.output.dir.absolute()}),
            "assets": config.assets.model_copy(update={"store": store}),
        }
    )


async def _save_thumbs(folder: Path, thumbs: list[tuple[str, bytes]]) -> None:
    def save() -> None:
        for name, data in thumbs:
            try:
                save_thumb(folder, name, data)
            except OSError as exc:  # the report shows no thumbnail; the image is stored
                _log.warning("thumbnail_not_written", name=name, error=str(exc))
                return

    await anyio.to_thread.run_sync(save)


def _relog(worker: str, method: str, event: dict[str, Any]) -> None:
    text = str(event.pop("event", ""))
    event.pop("timestamp", None)
    event.pop("level", None)
    log = _log.bind(worker=worker)
    level = method if method in ("debug", "info", "warning", "error", "critical") else "error"
    getattr(log, level)(text, **event)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
