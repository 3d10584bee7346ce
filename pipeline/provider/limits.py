"""Holding one API key to the provider's limits: create spacing, the window, and retry waits.

`CreateGate` lets creates through one at a time, spaced, and never lets a create start while the
last `creates_per_window` creates were ANSWERED less than `window_s` ago. Measuring from our answer
(which comes after the provider counted the create) to our next send (which comes before the
provider counts it) makes the guarantee hold whatever the network delays: no `window_s` span on
the provider's clock ever holds more than `creates_per_window` of our creates.

The spacing follows how full the window is: from a tenth of `window_s / creates_per_window`
while the window is at most half full, growing to the whole of it as the window fills. So a
key whose slots bind (10 jobs in flight) rather than its create rate does not keep a freed slot
waiting for spacing it does not need, and creates are never sent in a burst.

A create whose answer arrived is journaled before the next create of its key is sent: the caller
posts the answer to the journal before it leaves the gate, and the next create's `creating` is
made durable, after it, before that create is sent (the journal keeps updates in order). A crash
then leaves ambiguous only the creates whose answers had not arrived.

A 429 pauses the whole key for its Retry-After: every create of the key waits at the gate, so a
throttled key sends one create into the storm rather than one per slot. A caller may ask to
give way instead of waiting out a pause (`GatePaused`), so its job can go to another key.

The slots (`max_concurrent`) are the workers themselves: each key has that many, and a worker
holds its slot from the create request to the job's terminal status.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass

from pipeline.core import ApiKey, Clock, RateLimited, SystemClock

__all__ = ["CreateGate", "GatePaused", "InFlightCap", "RetryPolicy", "caps_for"]


class GatePaused(Exception):
    """The key is paused by a 429 and the caller chose to give way; `wait` seconds remain."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"paused for {wait:.3f} s")
        self.wait = wait


_LEAST_WAIT = 1e-6  # seconds: a shorter wait for the gate is none


class CreateGate:
    """Per-key create admission (see the module docstring)."""

    def __init__(
        self, creates_per_window: int, window_s: float, clock: Clock | None = None
    ) -> None:
        self._limit = creates_per_window
        self._window = window_s
        self._interval = window_s / creates_per_window
        self.clock: Clock = clock or SystemClock()
        self._answered: deque[float] = deque()
        self._open = 0
        self._next_start = -math.inf
        self._paused_until = -math.inf
        self._lock = asyncio.Lock()  # anyio's looks the current task up on every acquire
        self.sent = 0

    def _wait_needed(self, now: float) -> float:
        while self._answered and self._answered[0] <= now - self._window:
            self._answered.popleft()
        wait = max(self._next_start, self._paused_until) - now
        # Unanswered creates count as in the window; this many answered ones must leave it first.
        excess = len(self._answered) + self._open - self._limit
        if excess >= 0:
            if excess < len(self._answered):
                wait = max(wait, self._answered[excess] + self._window - now)
            else:  # only unanswered creates fill the window: look again shortly
                wait = max(wait, self._interval)
        # less than a microsecond is the rounding of the sums above (12 x 0.1 s is 1.2 s and a
        # few 1e-16): slept, it would wake at the same instant of a clock that counts in steps
        # (a test loop's), and look again forever
        return wait if wait >= _LEAST_WAIT else 0.0

    def seed(self, answered: list[float]) -> None:
        """Creates answered before this gate existed (by an earlier run of the same key), on the
        gate's clock, oldest first: a resume does not send into a window they still fill."""
        self._answered.extend(answered[-self._limit :])

    def pause(self, seconds: float) -> None:
        """No create of this key starts in the next `seconds` (a 429 asked us to wait)."""
        self._paused_until = max(self._paused_until, self.clock.now() + seconds)

    def in_window(self) -> int:
        """Creates of this key in the window now (answered within `window_s`, or unanswered)."""
        now = self.clock.now()
        return sum(1 for t in self._answered if t > now - self._window) + self._open

    def paused_for(self) -> float:
        """Seconds left of a pause; 0 when the key is not paused."""
        return max(0.0, self._paused_until - self.clock.now())

    @asynccontextmanager
    async def create(
        self, give_way: Callable[[], bool] | None = None, room: InFlightCap | None = None
    ) -> AsyncIterator[None]:
        """Wait for this key's turn, and for `room` under its in-flight cap; the create request
        is sent inside the block. While the key is paused, `give_way()` is asked whether to wait
        (False) or raise GatePaused (True). The room is taken only once the key's window and
        spacing let the create go: a key that waits for its window holds none of a cap it shares
        with the other keys of its group."""
        async with self._lock:
            while True:
                # a computed deadline, not a condition another task signals: sleeping is right
                while (wait := self._wait_needed(now := self.clock.now())) > 0:
                    if give_way is not None and self._paused_until > now and give_way():
                        raise GatePaused(self._paused_until - now)
                    await self.clock.sleep(wait)
                if room is None or room.has_room():
                    break
                await room.changed()  # then the window and a pause are looked at again
            self._open += 1
            self.sent += 1
            fill = (len(self._answered) + self._open) / self._limit
            self._next_start = self.clock.now() + self._interval * min(1.0, max(0.1, 2 * fill - 1))
        try:
            with room.holding() if room is not None else nullcontext():
                yield
        finally:
            self._open -= 1
            self._answered.append(self.clock.now())


class InFlightCap:
    """The jobs one key, or one group of keys sharing the provider's cap (one account), may
    have running at the provider: `configured` at most, and fewer once the provider says so.

    A create is sent only while the jobs running at the provider plus the creates being sent
    are under the cap (`has_room()`; the key's gate takes the room, `CreateGate.create`, once
    the key's window lets the create go); a job counts from its create's answer to its end
    (`started()`, `ended()`). A 429 that says the concurrency cap was reached (see `Worker`:
    the key's window was not full) lowers the cap to the jobs running there then and at most to
    `_DECREASE` of it: multiplicative decrease. Each `cap` jobs that end without such a 429
    raise it by one (additive increase), back to `configured`; a raise that meets a 429 again
    makes the next one wait twice as long, so a provider cap below the configured one costs a
    429 every so often, not a storm.
    """

    def __init__(self, configured: int, name: str) -> None:
        self.configured = configured
        self.name = name
        self.cap = configured
        self.running = 0  # jobs created and not seen to end
        self.lowered = 0  # times the provider's 429 lowered it
        self._sending = 0
        self._ends = 0  # jobs ended since the cap last changed
        self._patience = 1  # rounds of `cap` ends before the next raise
        self._probing = False  # the cap was just raised: a 429 now means the raise was wrong
        self._changed = asyncio.Event()  # set when room may have opened

    def has_room(self) -> bool:
        """Whether one more create may be sent now."""
        return self.running + self._sending < self.cap

    async def changed(self) -> None:
        """Until room may have opened (a create answered or a job ended)."""
        self._changed.clear()
        await self._changed.wait()

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Hold room for one create, found free (`has_room`), until its answer."""
        self._sending += 1
        try:
            yield
        finally:
            self._sending -= 1
            self._changed.set()

    def started(self) -> None:
        """A job is running at the provider (its create answered, or a resumed one)."""
        self.running += 1

    def ended(self) -> None:
        """A job running at the provider was seen to end (or is no longer followed)."""
        self.running -= 1
        self._count_end()
        self._changed.set()

    def refused(self) -> None:
        """The provider refused a create of this key (or group) for its concurrency cap."""
        lower = max(1, min(self.cap - 1, self.running, math.floor(self.cap * _DECREASE)))
        if self._probing:
            self._patience = min(_MAX_PATIENCE, self._patience * 2)
        self._probing = False
        if lower < self.cap:
            self.cap, self._ends = lower, 0
            self.lowered += 1

    def _count_end(self) -> None:
        if self.cap >= self.configured:
            self._probing = False
            return
        self._ends += 1
        if self._ends >= self.cap * self._patience:
            if self._probing:  # the last raise held: the provider's cap may be growing back
                self._patience = max(1, self._patience // 2)
            self.cap, self._ends, self._probing = self.cap + 1, 0, True


_DECREASE = 0.9  # the least a 429 keeps of the cap
_MAX_PATIENCE = 16


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped, jittered exponential backoff, and Retry-After clamped to a bound; in wall seconds."""

    max_attempts: int
    backoff_initial_s: float
    backoff_max_s: float
    retry_after_max_s: float

    def backoff(self, attempt: int) -> float:
        """The wait after the `attempt`-th failure (1-based): half fixed, half random."""
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * 2.0 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def rate_limit_wait(self, error: RateLimited, attempt: int) -> float:
        if error.retry_after is None:
            return self.backoff(attempt)
        return min(error.retry_after, self.retry_after_max_s)


def caps_for(
    groups: list[list[str]], keys: Iterable[ApiKey], max_concurrent: int
) -> dict[str, InFlightCap]:
    """Each key's in-flight cap by key name: its own, or its group's (limits.groups, as names;
    groups are numbered as configured, so a group's cap has the same name in every process)."""
    caps = {k.name: InFlightCap(max_concurrent, k.name) for k in keys}
    for number, group in enumerate(groups, start=1):
        members = [name for name in group if name in caps]
        if members:
            shared = InFlightCap(max_concurrent, f"group-{number}")
            for name in members:
                caps[name] = shared
    return caps
