"""Time as the waiting parts of the run see it: a `Clock` to read and to sleep on.

The create gate, the key driver and the dispatcher wait on computed deadlines. Their tests
run them in virtual time (an event loop whose clock jumps to the next timer when every task
waits), so they check exact instants instead of sleeping.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on this clock's own scale (only differences mean anything)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The clock of asyncio's timers: the running loop's (monotonic) time, so deadlines and
    the loop's own sleeps agree, in a test loop's virtual time too."""

    def now(self) -> float:
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:  # no loop running: the same monotonic clock asyncio uses
            return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)  # anyio.sleep would look the backend up on every call
