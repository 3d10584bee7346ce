"""Group commit: updates from every slot of the run made durable together, one fsync a batch."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import anyio

from pipeline.journal.file import JournalFile
from pipeline.journal.updates import Update


class Commits(Protocol):
    """Where a worker's updates go: the journal's `GroupCommit`, or, on a Ray worker, the
    driver's through the worker's outbox. `write` returns once its updates are durable;
    `post` returns at once with an event set when they are, and `durable` waits for that event
    (asking for the commit now). Updates become durable in the order they were given."""

    async def write(self, *updates: Update) -> None: ...

    def post(self, *updates: Update) -> asyncio.Event: ...

    async def durable(self, done: asyncio.Event) -> None: ...

    async def known(self, ids: Collection[str]) -> set[str]:
        """Which of these prediction ids the journal has as a row's job (durable ones)."""
        ...


class _Batch:
    """Updates that share one commit; `done` is set once they are durable (or failed)."""

    __slots__ = ("done", "updates")

    def __init__(self) -> None:
        self.updates: list[Update] = []
        self.done = asyncio.Event()


class GroupCommit:
    """Many writers, one transaction. `await write(...)` returns once its updates are durable
    and has them committed at once; `post(...)` queues updates that may wait up to `lazy_s`
    for a commit they can share, and returns an event set once they are durable.

    It sits on every job's path, so it is built on asyncio's own events and timer and one
    committing thread: anyio's events and `to_thread` cost several times more CPU per commit.
    """

    def __init__(self, journal: JournalFile, *, lazy_s: float = 0.2) -> None:
        self._journal = journal
        self._lazy_s = lazy_s
        self._batch = _Batch()
        self._go = asyncio.Event()  # a commit is wanted: a writer waits, or lazy_s has passed
        self._timer: asyncio.TimerHandle | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="journal-commit")
        self._failure: BaseException | None = None
        self.commits = 0

    async def write(self, *updates: Update) -> None:
        await self.durable(self.post(*updates))

    def post(self, *updates: Update) -> asyncio.Event:
        self._check()
        batch = self._batch
        if self._timer is None:  # the first update of a batch waits at most lazy_s
            self._timer = asyncio.get_running_loop().call_later(self._lazy_s, self._go.set)
        batch.updates.extend(updates)
        return batch.done

    async def durable(self, done: asyncio.Event) -> None:
        """Wait until posted updates are durable."""
        if not done.is_set():
            self._go.set()
            await done.wait()
        self._check()

    async def known(self, ids: Collection[str]) -> set[str]:
        if not ids:
            return set()
        loop = asyncio.get_running_loop()
        # on the committing thread: after every commit sent before it
        return await loop.run_in_executor(self._thread, self._journal.known_predictions, ids)

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def run(self) -> None:
        """The committing task; runs until cancelled, then commits what is queued."""
        try:
            while True:
                await self._go.wait()
                self._go.clear()
                await self._flush()
        finally:
            with anyio.CancelScope(shield=True):
                await self._flush()
            self._thread.shutdown(wait=False)

    async def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = self._batch
        if not batch.updates:
            return
        self._batch = _Batch()
        loop = asyncio.get_running_loop()
        try:
            with anyio.CancelScope(shield=True):  # a commit under way is seen to its end
                await loop.run_in_executor(self._thread, self._journal.apply, batch.updates)
            self.commits += 1
        except sqlite3.Error as exc:
            self._failure = exc
        finally:
            batch.done.set()
