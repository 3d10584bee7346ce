"""Handing jobs to slots: open jobs from the journal in row order, given-back jobs first,
within the budget, until stopped.

The dispatcher reads the journal a page at a time (never all the jobs in memory) and follows
the ingest as it goes on, so the first creates go out before a large manifest is fully read.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Collection
from typing import Protocol

import anyio

from pipeline.core import Budget, JobOutcome, NoUsableKeyError, Status
from pipeline.journal import Entry, Journal

__all__ = ["Dispatcher", "JobSource"]


class JobSource(Protocol):
    """What a key's slots take jobs from: the `Dispatcher`, or on a Ray worker its proxy,
    which asks the driver's dispatcher."""

    halted: bool

    async def next_job(self, key_name: str) -> Entry | None: ...

    def give_back(self, entry: Entry) -> None: ...

    def retire(self, key_name: str) -> None: ...

    async def rest(self, seconds: float) -> None: ...

    def settle(self, entry: Entry, outcome: JobOutcome) -> None: ...

    def stop_creates(self, cause: str, said: str) -> None:
        """No create on any key from now on (`cause`: "balance", the organisation's balance
        refused one; "outage", the provider stayed unreachable); the jobs already created go
        on to their end, and no row is failed for it."""
        ...

    async def reserve(self, entry: Entry) -> bool:
        """One more create of a job already handed out (its last create's answer was lost, so
        that one may be billed too): True when the budget can take its worst case."""
        ...


_PAGE = 1000


class Dispatcher:
    def __init__(
        self,
        journal: Journal,
        *,
        price_per_image_usd: float,
        budget: Budget,
        lanes: int,
        keys: Collection[str] = (),
        on_retire: Callable[[str], None] | None = None,
    ) -> None:
        """`on_retire` is told the name of each key the provider refuses."""
        self._journal = journal
        self._price = price_per_image_usd
        self._budget = budget.limit_usd
        # billed so far (earlier runs and rounds included) plus the worst case of jobs in flight
        self._committed = budget.spent_usd
        self._page: deque[Entry] = deque()
        self._given_back: deque[Entry] = deque()
        self._cursor = 0
        self._lock = asyncio.Lock()  # anyio's looks the current task up on every acquire
        self._ingest_done = False
        self._ingest_progress = anyio.Event()
        self._drained = asyncio.Event()  # a slot was told there is no more work
        self._live_lanes = lanes
        self._retired: set[str] = set()
        self._keys = frozenset(keys)  # the names of the run's keys
        self.halted = False  # stopped by a signal: not even jobs already handed out are sent
        self.abandoned = False  # stopped for good (a second signal): jobs in flight are dropped
        self.budget_reached = False
        self.budget_hit = asyncio.Event()
        # why creates were stopped ("balance" or "outage"), and what was said
        self.creates_stopped: tuple[str, str] | None = None
        # every key was refused: the slots end on their own (their creates out are answered
        # and their rows kept pending), and the run says so
        self.no_key: NoUsableKeyError | None = None
        self.on_retire = on_retire

    def abandon(self) -> None:
        """Stopped for good (a second signal): jobs in flight are dropped (cancelled)."""
        self.abandoned = True

    # -- ingest ------------------------------------------------------------------------------

    def ingest_advanced(self, done: bool = False) -> None:
        self._ingest_done = self._ingest_done or done
        self._ingest_progress.set()

    # -- handing out ---------------------------------------------------------------------------

    async def next_job(self, key_name: str) -> Entry | None:
        """The next job for a slot of `key_name`, or None when there is no more work for it."""
        async with self._lock:
            while not self.stopped:
                entry = self._take(key_name)
                if entry is None:
                    if await self._refill():
                        continue
                    break
                if self._budget is not None:
                    worst = self._worst(entry)
                    if self._committed + worst > self._budget + 1e-9:
                        self.budget_reached = True
                        self.budget_hit.set()
                        self._given_back.appendleft(entry)
                        break
                    self._committed += worst
                return entry
            self._drained.set()  # no more work for this key: stopped, or none is left
            return None

    async def rest(self, seconds: float) -> None:
        """A slot of a paused key waits `seconds` before asking for work again; less when no
        work is left, so the run does not wait for a pause to end to finish."""
        with anyio.move_on_after(seconds):
            await self._drained.wait()
            if self._given_back:  # work is left, for other keys or for this one after the pause
                await anyio.sleep(seconds)

    def _take(self, key_name: str) -> Entry | None:
        for queue in (self._given_back, self._page):
            for index, entry in enumerate(queue):
                if self._for(entry, key_name):
                    del queue[index]
                    return entry
        return None

    def _for(self, entry: Entry, key_name: str) -> bool:
        """Whether a slot of `key_name` may take the job: one with a prediction id can only
        be polled with the key that created it; one a crash left `creating` is looked up in
        the listing of the key that sent it, while the run has that key."""
        owner = entry.key_name
        if owner is None or owner == key_name or entry.status is Status.PENDING:
            return True
        if entry.status is Status.CREATED:
            return False
        return owner not in self._keys or owner in self._retired

    async def _refill(self) -> bool:
        while True:
            page = await anyio.to_thread.run_sync(self._journal.open_jobs, self._cursor, _PAGE)
            if page:
                self._cursor = page[-1].row_number
                self._page.extend(page)
                return True
            if self._ingest_done:
                return False
            self._ingest_progress = anyio.Event()
            await self._ingest_progress.wait()

    def give_back(self, entry: Entry) -> None:
        """A job that was not started (its key was refused) goes to another key."""
        self._release(entry)
        self._given_back.append(entry)

    def _worst(self, entry: Entry) -> float:
        """What a job can cost at most: every image it asks for."""
        return entry.spec.images_requested * self._price

    def _release(self, entry: Entry) -> None:
        if self._budget is not None:
            self._committed -= self._worst(entry)

    async def reserve(self, entry: Entry) -> bool:
        return self.reserve_now(entry)

    def reserve_now(self, entry: Entry) -> bool:
        """`reserve`, for the driver of Ray workers. The reservation is never released: the
        create whose answer was lost may have been billed."""
        if self._budget is None:
            return True
        worst = self._worst(entry)
        if self._committed + worst > self._budget + 1e-9:
            self.budget_reached = True
            self.budget_hit.set()
            return False
        self._committed += worst
        return True

    def settle(self, entry: Entry, outcome: JobOutcome) -> None:
        """Replace a job's worst-case reservation by what it cost."""
        if self._budget is None:
            return
        self._release(entry)
        if outcome.status is Status.SUCCEEDED:
            self._committed += len(outcome.output_urls) * self._price

    def retire(self, key_name: str) -> None:
        """The provider refused this key (401); `no_key` once every key is refused."""
        if key_name in self._retired:
            return
        self._retired.add(key_name)
        self._live_lanes -= 1
        if self.on_retire is not None:
            self.on_retire(key_name)
        if self._live_lanes <= 0 and self.no_key is None:
            self.no_key = NoUsableKeyError(
                "every API key was refused by the provider (401); set a valid key in "
                "EACHLABS_API_KEY or EACHLABS_API_KEYS and run again: unfinished rows are kept"
            )
            self.halted = True

    def stop_creates(self, cause: str, said: str) -> None:
        if self.creates_stopped is None:
            self.creates_stopped = (cause, said)
        self.halted = True

    @property
    def stopped(self) -> bool:
        """No more jobs are handed out: stopped by a signal, or the budget is reached."""
        return self.halted or self.budget_reached

    def stop(self) -> None:
        """No new creates from now on: jobs handed out but not sent yet are not sent either;
        jobs already created go on."""
        self.halted = True
