"""The traffic between the driver and one Ray worker: asks and jobs, updates and their
acknowledgements, figures, and the recovery of a dead worker's jobs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import structlog

from pipeline.core import COUNTERS, RunStats
from pipeline.drive.dispatcher import Dispatcher
from pipeline.drive.ray.members import (
    Member,
    Roster,
    WorkerLost,
    first_line,
    relog,
    save_thumbs,
)
from pipeline.drive.ray.remote import Figures, Orders, Report
from pipeline.journal import Finish, GroupCommit, Journal

_log = structlog.get_logger("pipeline.drive.ray.cluster")
_ORDERS_TICK_S = 0.5  # how often a stop order is looked for when nothing else is sent


__all__ = ["Exchange"]


class Exchange:
    """One worker's life as the driver lives it: jobs handed out in answer to its asks, its
    updates made durable and acknowledged, its figures merged, and its jobs recovered when
    it dies."""

    def __init__(self, roster: Roster, actor_died: type[Exception], thumbs: Path) -> None:
        """`actor_died`: Ray's RayActorError; `thumbs`: the run folder's thumbnails."""
        self._roster = roster
        self._actor_died = actor_died
        self._thumbs = thumbs

    async def life(
        self, member: Member, commit: GroupCommit, dispatcher: Dispatcher, stats: RunStats
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
        except* self._actor_died as group:
            _log.warning("worker_died", worker=member.name, error=first_line(group.exceptions[0]))
            died = True
        if died:
            return True
        if report.failure is not None:
            raise WorkerLost(f"{member.name} failed: {report.failure}")
        return False

    def _take(
        self,
        member: Member,
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
            self._roster.returned()
        if report.updates:
            for update in report.updates:
                if isinstance(update, Finish):
                    held = member.handed.pop(update.row_number, None)
                    if held is not None:
                        dispatcher.settle(held, update.outcome)
                        if not member.handed:  # asks waiting on its jobs look again
                            self._roster.returned()
            member.last_post = commit.post(*report.updates)
            tg.start_soon(self._ack, member, commit, member.last_post, report.seq)
        for row_number in report.reserves:
            held = member.handed.get(row_number)
            member.reserved.append((row_number, held is not None and dispatcher.reserve_now(held)))
            member.wake.set()
        for name in report.retired:
            dispatcher.retire(name)
        if report.stop is not None:
            dispatcher.stop_creates(*report.stop)
        for key_name, count in report.asks.items():
            for _ in range(count):
                tg.start_soon(self._hand, member, dispatcher, key_name)
        if report.thumbs:
            tg.start_soon(save_thumbs, self._thumbs, report.thumbs)
        for method, event in report.logs:
            relog(member.name, method, event)
        self._merge(member, report.figures, stats)

    async def _ack(
        self, member: Member, commit: GroupCommit, done: asyncio.Event, seq: int
    ) -> None:
        await commit.durable(done)
        member.acked = max(member.acked, seq)
        member.wake.set()

    async def _hand(self, member: Member, dispatcher: Dispatcher, key_name: str) -> None:
        """A job for a free slot of `member`'s key. While other workers hold jobs that may
        come back (a paused key gives its unstarted jobs back, a dead worker's are read
        again), "no more work" waits for them rather than ending the slot."""
        while True:
            entry = await dispatcher.next_job(key_name)
            if entry is not None or dispatcher.stopped or not self._roster.held_elsewhere(member):
                break
            with anyio.move_on_after(_ORDERS_TICK_S):
                await self._roster.returns()
        if entry is not None:
            member.handed[entry.row_number] = entry
        member.jobs.append((key_name, entry))
        member.wake.set()

    async def _send_orders(self, member: Member, dispatcher: Dispatcher) -> None:
        """The driver's answers, in batches: what piled up while the last call was out."""
        while True:
            with anyio.move_on_after(_ORDERS_TICK_S):
                await member.wake.wait()
            member.wake = anyio.Event()
            abandon, cancel = self._roster.stops()
            flags = (
                dispatcher.halted,
                abandon or dispatcher.abandoned,
                cancel,
                self._roster.open_elsewhere(member),
            )
            now = (member.acked, *flags)
            if not member.jobs and not member.reserved and now == member.sent:
                continue
            jobs, member.jobs = member.jobs, []
            reserved, member.reserved = member.reserved, []
            orders = Orders(member.acked, jobs, *flags, reserved=reserved)
            member.sent = now
            await member.actor.deliver.remote(orders)

    def _merge(self, member: Member, figures: Figures, stats: RunStats) -> None:
        for counter in COUNTERS:
            name = counter.name
            value = figures.counters.get(name, 0)
            stats.add(name, value - member.counted.get(name, 0))
        member.finished += figures.counters.get("finished", 0) - member.counted.get("finished", 0)
        member.counted = dict(figures.counters)
        for latency, delay in zip(figures.latencies, figures.notice_delays, strict=True):
            stats.job_ended(latency, delay)
        if stats.downloads is not None:
            d = stats.downloads
            new = [
                now - before for now, before in zip(figures.downloads, member.stored, strict=True)
            ]
            d.stored += new[0]
            d.failed += new[1]
            d.bytes += new[2]
            member.stored = figures.downloads
        member.figures = figures
        member.peak_rss_mb = max(member.peak_rss_mb, figures.peak_rss_mb)

    async def recover(self, member: Member, journal: Journal, dispatcher: Dispatcher) -> None:
        """A dead worker's jobs, as the journal holds them now, go back to be handed out."""
        rows = list(member.handed)
        member.handed.clear()
        entries = await anyio.to_thread.run_sync(journal.open_entries, rows)
        for entry in entries:
            dispatcher.give_back(entry)
        self._roster.returned()
        _log.warning("worker_jobs_recovered", worker=member.name, jobs=len(entries))
