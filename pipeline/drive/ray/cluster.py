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

import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import structlog

from pipeline.core import THUMBS, ApiKey, ConfigError, RunConfig, RunStats, Timings
from pipeline.drive.dispatcher import Dispatcher
from pipeline.drive.ray.exchange import Exchange
from pipeline.drive.ray.members import (
    Member,
    Roster,
    WorkerLost,
    absolute,
    first_line,
    forwarded_env,
)
from pipeline.drive.ray.remote import WorkerProcess, WorkerSetup
from pipeline.journal import GroupCommit, Journal

__all__ = ["Cluster", "WorkerLost", "Workers", "check_workers", "ray_session", "spread"]

_log = structlog.get_logger("pipeline.drive.ray.cluster")
_MAX_RESTARTS = 3  # replacements of one worker before the run stops (and can be resumed)
_INSTALL = "pip install -e '.[ray]' in the wanbatch checkout (make setup does)"


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
    latency = config.polling.expected_latency_s

    def capacity(unit: list[ApiKey]) -> float:  # a group shares one in-flight cap
        return config.limits.jobs_per_s(latency, len(unit), one_group=True)

    grouped = {name for group in groups for name in group}
    by_name = {k.name: k for k in keys}
    units = [[by_name[n] for n in group if n in by_name] for group in groups]
    units = [u for u in units if u] + [[k] for k in keys if k.name not in grouped]
    units.sort(key=lambda u: -capacity(u))
    sets: list[list[ApiKey]] = [[] for _ in range(min(count, len(units)))]
    load = [0.0] * len(sets)
    for unit in units:
        least = load.index(min(load))
        sets[least] += unit
        load[least] += capacity(unit)
    return sets


class Cluster:
    """The workers of one run: started, served through the exchange, replaced when they die;
    `roster` is the run's view of them, and what the driver's signal and budget handling
    stop."""

    def __init__(
        self,
        ray: Any,
        config: RunConfig,
        timings: Timings,
        key_sets: list[list[ApiKey]],
        groups: list[list[str]],
        base_url: str,
        uploads: bool,
    ) -> None:
        self._ray = ray
        self._config = absolute(config)
        self._timings = timings
        self._groups = groups
        self._base_url = base_url
        self._uploads = uploads
        self.roster = Roster(key_sets)
        self.members = self.roster.members
        thumbs = self._config.output.dir / THUMBS
        self._exchange = Exchange(self.roster, ray.exceptions.RayActorError, thumbs)
        self._marker: Path | None = None
        self._actor_class = ray.remote(WorkerProcess)
        self._env = forwarded_env()

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

    async def _spawn(self, member: Member, journal: Journal) -> None:
        """A worker for `member`'s keys, checked, its gates seeded with their recent creates."""
        since = time.time() - self._timings.window_s
        recent = await anyio.to_thread.run_sync(journal.reports.recent_creates, since)
        mine = {k.name for k in member.keys}
        setup = WorkerSetup(
            member.index,
            self._config,
            self._timings,
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
            raise _StartFailed(f"{member.name} could not start: {first_line(exc)}") from None
        if problem is not None:
            raise ConfigError(problem)

    async def _keep(
        self,
        member: Member,
        journal: Journal,
        commit: GroupCommit,
        dispatcher: Dispatcher,
        stats: RunStats,
    ) -> None:
        """The worker's lives: served, and replaced when it dies."""
        while await self._exchange.life(member, commit, dispatcher, stats):
            member.state = "replacing"
            if member.last_post is not None:  # what it sent is journaled before its jobs are read
                await commit.durable(member.last_post)
            await self._exchange.recover(member, journal, dispatcher)
            await self._replace(member, journal)
        member.state = "done"
        member.handed.clear()  # every job it held ended or was given back
        self.roster.returned()

    async def _replace(self, member: Member, journal: Journal) -> None:
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


# what the workers read from their environment as the driver does: object storage's
# credentials and endpoints (obstore), and the proxies and CA of httpx
