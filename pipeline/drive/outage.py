"""A provider that is down is not a catalog of failures: when every request has failed
(transport errors, 5xx) for `retries.outage_after_s`, a create that fails again does not fail
its row. Its slot waits while one prober asks the provider, with backoff, whether it answers
again, for at most `retries.outage_patience_s`; then the creates go on, or the run stops
sending (`Dispatcher.stop_creates("outage")`, exit 10) with the unsent rows left unsent.
"""

from __future__ import annotations

import anyio
import structlog

from pipeline.core import ApiError, RunStats, ServerError, TransportFailure
from pipeline.drive.lanes import KeyLane
from pipeline.provider import EachlabsClient, RetryPolicy

__all__ = ["Outage"]

_log = structlog.get_logger("pipeline.drive.outage")


class Outage:
    """The provider's outages as the slots of one process meet them."""

    def __init__(
        self,
        client: EachlabsClient,
        policy: RetryPolicy,
        stats: RunStats,
        *,
        after: float,
        patience: float,
    ) -> None:
        self._client = client
        self._policy = policy
        self._stats = stats
        self._after = after
        self._patience = patience
        self._lock = anyio.Lock()
        self.gave_up = False

    def down(self, error: ApiError, *, last_try: bool) -> bool:
        """Whether this failure is the provider's, not the row's: nothing has answered since
        the failures began, and either they have lasted `after` seconds (an outage), or this
        was the row's last try (it waits to see which)."""
        unreachable = isinstance(error, TransportFailure | ServerError)
        down = self._client.health.down_for()
        return unreachable and down > 0 and (last_try or down >= self._after)

    async def back(self, lane: KeyLane) -> bool:
        """Wait for the provider to answer again (one slot probes, the others wait on it):
        True when it does, False when it has not answered for `after` and then `patience`
        seconds."""
        async with self._lock:
            health = self._client.health
            if self.gave_up or health.down_for() == 0:
                return not self.gave_up  # another slot saw it through already
            said = False
            attempt = 0
            while health.down_for() < self._after + self._patience:
                if not said and health.down_for() >= self._after:
                    said = True
                    self._stats.outages += 1
                    _log.warning("provider_unreachable", seconds=round(health.down_for(), 1))
                attempt += 1
                wait = self._policy.backoff(attempt)
                await anyio.sleep(min(wait, self._after + self._patience - health.down_for()))
                try:
                    await self._client.model_cost(lane.key)
                except (TransportFailure, ServerError):
                    continue
                except ApiError:
                    pass  # an answer all the same: it is reachable
                if said:
                    _log.warning("provider_back", probes=attempt)
                return True
            self.gave_up = True
            _log.error("provider_gone", patience_s=self._patience)
            return False
