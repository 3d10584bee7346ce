"""Time as the waiting parts of the run see it: a `Clock` to read and to sleep on.

The create gate waits on computed deadlines; given a clock, its tests run in virtual time
(`now()` moves only when the gate sleeps), so they check exact instants instead of sleeping.
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
    """The clock of asyncio's timers."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)  # anyio.sleep would look the backend up on every call
