"""What drives a run's keys: this process's slots (`Local`), or Ray workers each owning
some keys (`Distributed`, `--workers`). Either way the run has one dispatcher handing out
jobs, one group commit into the journal of record, and, when images are kept, a downloader;
the runner drives an engine without knowing which it is.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus

from pipeline.core import THUMBS, FolderThumbs, Plan, RunConfig, RunStats, Timings
from pipeline.drive.assemble import assemble, downloader
from pipeline.drive.dispatcher import Dispatcher
from pipeline.drive.lanes import LocalView
from pipeline.drive.ray.cluster import Cluster, Workers, ray_session, spread
from pipeline.intake import Manifest, Uploads
from pipeline.journal import GroupCommit, Journal
from pipeline.observe import RunView
from pipeline.outputs import CopyCheck, Downloader, recheck_copies
from pipeline.provider import Receiver

__all__ = ["Engine", "open_engine"]

_log = structlog.get_logger("pipeline.drive.engine")


class Engine:
    """What drives the keys: this process's slots (`Local`), or Ray workers (`Distributed`).
    Either owns the run's dispatcher, its group commit and its downloader: `serve` runs the
    commit and the downloads for as long as the run, `stored` waits for the images of the
    jobs that ended, `aclose` lets go of everything."""

    dispatcher: Dispatcher
    commit: GroupCommit
    downloader: Downloader | None
    view: RunView

    def __init__(self, config: RunConfig, plan: Plan, journal: Journal, stats: RunStats) -> None:
        self._config = config
        self._timings = plan.timings
        self._journal = journal
        self._downloads_done = anyio.Event()
        self.dispatcher = _dispatcher(config, plan, journal, stats)
        self.commit = GroupCommit(journal)

    def figures(self) -> list[dict[str, Any]]:
        """Per worker, for summary.json (none for a local run)."""
        return []

    async def work(self) -> None:
        """Drive the keys until no work is left or the run is stopped; when stopped for good,
        cancel the jobs in flight at the provider."""
        raise NotImplementedError

    def limit(self, seconds: float) -> None:
        """Jobs in flight get `seconds` more (a first signal)."""
        raise NotImplementedError

    def cancel(self) -> None:
        """Stop now (a second signal)."""
        raise NotImplementedError

    def abandon(self) -> None:
        """Stop for good (a second signal): no job waits, those in flight are cancelled at the
        provider, and images not stored yet stay pending for the next run."""
        self.dispatcher.abandon()
        self.cancel()

    async def cancel_in_flight(self) -> None:
        raise NotImplementedError

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The engine's own services, until cancelled: the group commit, and the downloads
        (the images an earlier run left pending first, those gone from the store again).
        Started (`task_status`) once the pending images are known, before any job runs."""
        async with anyio.create_task_group() as services:
            services.start_soon(self.commit.run)
            if self.downloader is not None:
                try:
                    journal, config = self._journal, self._config
                    check = CopyCheck(config.assets.storage_options)
                    await anyio.to_thread.run_sync(
                        recheck_copies, journal, check, config.output.dir
                    )
                    pending = await anyio.to_thread.run_sync(journal.reports.images_to_fetch)
                except BaseException:
                    self._downloads_done.set()
                    raise
                services.start_soon(self._download, self.downloader, pending)
            task_status.started()

    async def _download(
        self, downloader: Downloader, pending: list[tuple[int, str, int, str]]
    ) -> None:
        try:
            await downloader.run(pending)
        finally:
            self._downloads_done.set()

    async def stored(self) -> None:
        """Once the work is done: the images of every job that ended, stored (the caller's
        scope bounds the wait; what is not stored by then stays pending)."""
        if self.downloader is not None and not self.dispatcher.abandoned:
            self.downloader.close()
            await self._downloads_done.wait()

    async def aclose(self) -> None:
        if self.downloader is not None:
            self.downloader.discard()


class Local(Engine):
    """The keys driven by this process's slots."""

    def __init__(
        self,
        config: RunConfig,
        plan: Plan,
        journal: Journal,
        base_url: str,
        stats: RunStats,
        receiver: Receiver | None,
        uploads: Uploads | None,
    ) -> None:
        super().__init__(config, plan, journal, stats)
        # a resume: the provider's window still holds the creates of the run before, if recent
        recent = journal.reports.recent_creates(time.time() - plan.timings.window_s)
        self.side = assemble(
            config,
            plan.timings,
            base_url,
            list(plan.keys),
            plan.groups,
            self.commit,
            self.dispatcher,
            stats,
            recent,
            receiver=receiver,
            thumbs=FolderThumbs(config.output.dir / THUMBS),
            uploads=uploads,
        )
        self.downloader = self.side.driver.downloader
        self._scope = anyio.CancelScope()
        self.view: RunView = LocalView(self.side.lanes, self.side.driver.flight.lanes)

    async def work(self) -> None:
        driver = self.side.driver
        with self._scope:
            async with anyio.create_task_group() as slots:
                for lane in self.side.lanes:
                    slots.start_soon(driver.run_lane, lane, self._config.limits.max_concurrent)
        if self.dispatcher.abandoned and driver.flight:
            await driver.cancel_in_flight(confirm_within=_confirm_within(self._timings))

    def limit(self, seconds: float) -> None:
        self._scope.deadline = min(self._scope.deadline, anyio.current_time() + seconds)

    def cancel(self) -> None:
        self._scope.cancel()

    async def cancel_in_flight(self) -> None:
        await self.side.driver.cancel_in_flight()

    async def aclose(self) -> None:
        await super().aclose()
        await self.side.client.aclose()


class Distributed(Engine):
    """The keys driven by Ray workers, each owning some (see `pipeline.drive.ray.cluster`); this
    process keeps the journal of record, hands out the jobs, and fetches the images an
    earlier run left pending."""

    def __init__(
        self, cluster: Cluster, config: RunConfig, plan: Plan, journal: Journal, stats: RunStats
    ) -> None:
        super().__init__(config, plan, journal, stats)
        self.cluster = cluster
        self.view: RunView = cluster.roster
        self.stats = stats
        self.downloader: Downloader | None = None
        if config.assets.download:
            thumbs = FolderThumbs(config.output.dir / THUMBS)
            self.downloader = downloader(config, self.commit, stats, thumbs)

    def figures(self) -> list[dict[str, Any]]:
        return self.cluster.roster.figures()

    async def work(self) -> None:
        await self.cluster.serve(self._journal, self.commit, self.dispatcher, self.stats)
        if self.downloader is not None and not self.dispatcher.abandoned:
            # images a dead worker was still fetching: every worker is done, so the ones
            # still pending are those
            lost = await anyio.to_thread.run_sync(self._journal.reports.images_to_fetch, True)
            self.downloader.submit_many(lost)

    def limit(self, seconds: float) -> None:
        self.cluster.roster.limit(seconds)

    def cancel(self) -> None:
        self.cluster.roster.cancel()

    async def cancel_in_flight(self) -> None:
        await self.cluster.roster.cancel_in_flight()


def _confirm_within(timings: Timings) -> float:
    """How long a run stopped for good polls its cancelled jobs for their ends."""
    return timings.cancel_grace_s


def _dispatcher(config: RunConfig, plan: Plan, journal: Journal, stats: RunStats) -> Dispatcher:
    keys = [k.name for k in plan.keys]
    dispatcher = Dispatcher(
        journal,
        price_per_image_usd=config.api.price_per_image_usd,
        budget=plan.budget,
        lanes=len(keys),
        keys=keys,
        on_retire=stats.retired_keys.append,
    )
    return dispatcher


@asynccontextmanager
async def open_engine(
    config: RunConfig,
    plan: Plan,
    journal: Journal,
    manifest: Manifest,
    base_url: str,
    stats: RunStats,
    receiver: Receiver | None,
    workers: Workers | None,
) -> AsyncIterator[Engine]:
    """This process's slots, or Ray workers started and checked (ConfigError before any
    create when they cannot do their part)."""
    uploads = manifest.inputs.uploads if manifest.inputs is not None else None
    if workers is None:
        local = Local(config, plan, journal, base_url, stats, receiver, uploads)
        yield local
        return
    with ray_session(workers) as ray:
        keys, groups = list(plan.keys), plan.groups
        key_sets = spread(keys, groups, workers.count, config)
        if len(key_sets) < workers.count:  # a key (or group) is never split over workers
            _log.warning(
                "fewer_workers",
                asked=workers.count,
                started=len(key_sets),
                why="one worker per key or key group at most",
            )
        cluster = Cluster(
            ray, config, plan.timings, key_sets, groups, base_url, uploads is not None
        )
        async with cluster.started(journal):
            yield Distributed(cluster, config, plan, journal, stats)
