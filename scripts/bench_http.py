"""The CPU floor of one request: httpx alone, and our client's poll and listing read, against the
sandbox in a process of its own (so only the client's CPU is counted).

    python scripts/bench_http.py --requests 2000

A job at the provider's real pace costs at least its create, its confirming poll, its share of
its key's listing reads and its image's download: this is what each of them costs before any
of the pipeline's own work.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import anyio
import httpx

from pipeline.core import ApiKey
from pipeline.provider import ENDED, EachlabsClient

_KEY = "bench-http-key"
_MODEL = "alibaba-wan-2-7-image-edit"
_IDLE = 40


async def _per_request(count: int, send: Callable[[], Awaitable[object]]) -> float:
    """CPU milliseconds per request, after a warm-up."""
    for _ in range(50):
        await send()
    cpu = time.process_time()
    for _ in range(count):
        await send()
    return (time.process_time() - cpu) / count * 1000


async def _measure(base_url: str, count: int) -> None:
    key = ApiKey(_KEY)
    client = EachlabsClient(base_url, _MODEL, max_connections=_IDLE + 4)
    inputs = {"img_url": "https://cdn.example.com/p/1.jpg", "prompt": "a white background"}
    pid = await client.create(key, inputs)
    since = time.time() - 60
    async with httpx.AsyncClient(base_url=base_url.rstrip("/") + "/") as raw:
        figures = {
            "httpx GET, nothing else": await _per_request(
                count, lambda: raw.get(f"prediction/{pid}", headers={"X-API-Key": _KEY})
            ),
            "our poll (EachlabsClient.get)": await _per_request(
                count, lambda: client.get(key, pid)
            ),
            "our listing read (one entry)": await _per_request(
                count, lambda: client.executions(key, (*ENDED, "processing"), since, pages=1)
            ),
        }
        # the pool of a run of many keys: each request looks at every idle connection
        async with anyio.create_task_group() as tg:
            for _ in range(_IDLE):
                tg.start_soon(client.get, key, pid)
        figures[f"our poll, {_IDLE} idle connections"] = await _per_request(
            count, lambda: client.get(key, pid)
        )
    await client.aclose()
    for name, ms in figures.items():
        print(f"{name:34} {ms:6.3f} ms CPU a request")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    sandbox = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "sandbox", "--keys", _KEY, "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sandbox.stdout is not None
        base_url = sandbox.stdout.readline().strip()
        anyio.run(_measure, base_url, args.requests)
    finally:
        sandbox.terminate()
        sandbox.wait(timeout=10)


if __name__ == "__main__":
    main()
