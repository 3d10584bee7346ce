"""The embedded sandbox (`api.base_url: sandbox`): one started for a run, on loopback, with the
config's limits and price, and stopped when the run ends. Whoever composes a run (`wanbatch
run`, `pipeline.run`) hands `open_embedded` to the runner; the production code never imports
the sandbox.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from pipeline.core import (
    SANDBOX_LEDGER,
    ApiKey,
    RunConfig,
    SandboxSettings,
    sandbox_keys,
)

if TYPE_CHECKING:
    from pipeline.sandbox.server import SandboxServer

__all__ = ["open_embedded"]


@asynccontextmanager
async def open_embedded(
    config: RunConfig, keys: list[ApiKey]
) -> AsyncIterator[tuple[str, list[ApiKey], SandboxServer]]:
    """The sandbox's base URL, the keys to use (made up when none is given) and its server."""
    from pipeline.sandbox.server import SandboxServer  # starlette, uvicorn, Pillow: only here

    s = config.sandbox
    if not keys:
        keys = [ApiKey(k) for k in sandbox_keys(s.keys)]  # as run() checks them
    settings = SandboxSettings(
        keys=tuple(k.secret for k in keys),
        creates_per_window=config.limits.creates_per_window,
        window_s=config.limits.window_s,
        max_concurrent=config.limits.max_concurrent,
        price_per_image_usd=config.api.price_per_image_usd,
        allow_loopback_urls=True,
        fetch_inputs=True,
        ledger_path=config.output.dir / SANDBOX_LEDGER,
        **s.settings(),
    )
    with SandboxServer(settings) as server:
        yield server.base_url, keys, server
