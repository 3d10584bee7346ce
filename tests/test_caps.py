"""Keys of one account share its concurrency cap, and a cap shrinks at a 429 and grows back
step by step (a provider cap below ours, learned in a whole key driver: tests/test_parts.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from pipeline.core import ConfigError, ExitCode
from pipeline.provider import CreateGate, InFlightCap
from pipeline.sandbox import SandboxServer
from tests.conftest import (
    KEY,
    KEY2,
    SCALE,
    catalog,
    go,
    make_config,
    shrunk_sandbox,
    write_manifest,
)

Start = Callable[..., SandboxServer]
pytestmark = pytest.mark.anyio


async def test_the_cap_shrinks_at_a_429_and_grows_back_step_by_step() -> None:
    cap = InFlightCap(10, "key-test")
    gate = CreateGate(10_000, 1.0)  # a window that never binds: the cap alone holds creates
    for _ in range(6):  # six jobs created and running at the provider
        async with gate.create(room=cap):
            cap.started()
    async with gate.create(room=cap):
        cap.refused()  # the 7th create was refused: the provider's cap is the 6 it runs
    assert cap.cap == 6 and cap.lowered == 1
    waiting = anyio.Event()
    sent = anyio.Event()

    async def seventh() -> None:
        waiting.set()
        async with gate.create(room=cap):
            sent.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(seventh)
        await waiting.wait()
        await anyio.wait_all_tasks_blocked()
        assert not sent.is_set()  # no room: it waits for an end
        cap.ended()
        await sent.wait()
    cap.started()
    for _ in range(4):  # with the one before, six jobs end (one round at 6) without a 429:
        cap.ended()
    assert cap.cap == 6
    cap.ended()  # ... up by one, to probe
    assert cap.cap == 7 and cap.running == 1
    for _ in range(6):
        cap.started()
    cap.refused()  # the probe met a 429 again: back down, and the next probe waits longer
    assert cap.cap == 6 and cap.lowered == 2
    for _ in range(6):
        cap.ended()
    for _ in range(5):  # 11 ends: two rounds of patience (12) are not over yet
        cap.started()
        cap.ended()
    assert cap.cap == 6
    cap.started()
    cap.ended()
    assert cap.cap == 7
    for _ in range(100):  # no 429 any more: back to the configured cap, and no further
        cap.started()
        cap.ended()
    assert cap.cap == 10


async def test_keys_of_one_account_share_its_cap(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=10, groups=((KEY, KEY2),))
    manifest = write_manifest(tmp_path / "m.csv", catalog(80))
    config = make_config(
        tmp_path, sb.base_url, manifest, api={"time_scale": SCALE}, limits={"groups": [[1, 2]]}
    )
    summary = await go(config, [KEY, KEY2])
    assert summary.exit_code is ExitCode.OK
    stats = sb.stats()
    assert stats["max_in_flight_per_group"]["group-1"] == 10  # the shared cap, full
    assert stats["refused_429"] == 0  # never sent past it
    assert all(k["creates"] >= 10 for k in stats["keys"].values()), stats["keys"]


async def test_a_group_naming_a_key_not_given_stops_before_anything_is_sent(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2)
    manifest = write_manifest(tmp_path / "m.csv", catalog(3))
    config = make_config(
        tmp_path, sb.base_url, manifest, api={"time_scale": SCALE}, limits={"groups": [[1, 3]]}
    )
    with pytest.raises(ConfigError, match=r"limits\.groups\[0\]: key 3 is not one of the 2 keys"):
        await go(config, [KEY, KEY2])
    assert sb.stats()["creates"] == 0
