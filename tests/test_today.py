"""The provider as its docs and changelog say today (the sandbox's `api_shape: today`): Bearer
auth, an organisation-wide listing paged by cursor (v1 capped), the provider's own clock and a
lagging listing, the organisation's balance, classified failures. The ledger judges: every row
ends once, no two rows share a job, no input is created twice, cost recorded is cost billed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from pipeline.core import ApiKey, BalanceShort, ExitCode
from pipeline.provider import EachlabsClient, Execution, ProviderClock
from pipeline.sandbox import FaultRates, SandboxServer, SandboxSettings
from pipeline.sandbox.billing import top_up
from pipeline.sandbox.state import BACKUP_MODEL, ORG_MATE
from tests.conftest import (
    KEY,
    catalog,
    config_data,
    go,
    journal_rows,
    ledger_cost,
    make_config,
    results,
    write_manifest,
)

Start = Callable[..., SandboxServer]
SCALE = 0.05
pytestmark = pytest.mark.anyio


def _today(sandbox: Start, **kwargs: Any) -> SandboxServer:
    kwargs.setdefault("time_scale", SCALE)
    kwargs.setdefault("latency_mean_s", 2)
    kwargs.setdefault("seed", 5)
    return sandbox(api_shape="today", **kwargs)


def _config(tmp_path: Path, base_url: str, rows: list[dict[str, Any]], **sections: Any) -> Any:
    manifest = write_manifest(tmp_path / "m.csv", rows)
    api = {"time_scale": SCALE, **sections.pop("api", {})}
    return make_config(tmp_path, base_url, manifest, api=api, **sections)


def _ours(sb: SandboxServer) -> list[dict[str, Any]]:
    return [e for e in sb.ledger() if e.get("key") != ORG_MATE]


def test_today_bearer_is_the_one_way_and_v1_stops_at_its_prefix(sandbox: Start) -> None:
    sb = _today(sandbox)
    body = {
        "model": "alibaba-wan-2-7-image-edit",
        "input": {"prompt": "p", "img_url": "https://cdn.example.com/a.jpg"},
    }
    with httpx.Client() as c:
        refused = c.post(f"{sb.base_url}/prediction/", json=body, headers={"X-API-Key": KEY})
        assert refused.status_code == 401
        assert refused.json() == {"error": "Invalid or missing API key"}
        bearer = {"Authorization": f"Bearer {KEY}"}
        assert c.post(f"{sb.base_url}/prediction/", json=body, headers=bearer).status_code == 200
        deep = c.get(f"{sb.base_url}/executions", params={"offset": 990}, headers=bearer)
        assert deep.status_code == 400 and "v2/executions" in deep.json()["error"]
        root = sb.base_url.removesuffix("/v1")
        page = c.get(f"{root}/v2/executions", params={"limit": 5}, headers=bearer).json()
        assert page["has_more"] is False and len(page["executions"]) == 1
        cost = c.get(f"{sb.base_url}/models/alibaba-wan-2-7-image-edit", headers=bearer).json()
        assert cost["cost"] == pytest.approx(0.03)


async def test_the_client_reads_v2_by_cursor_and_v1_never_past_its_prefix() -> None:
    asked: list[httpx.URL] = []

    def entries(start: int, count: int) -> list[dict[str, Any]]:
        return [{"id": f"p{i}", "status": "success"} for i in range(start, start + count)]

    def v2(request: httpx.Request) -> httpx.Response:
        asked.append(request.url)
        if request.url.path == "/v1/executions":
            offset = int(request.url.params["offset"])
            assert offset <= 900, "v1 read past its 1,000-row prefix"
            return httpx.Response(
                200, json={"executions": entries(offset, 100), "total_count": 5000}
            )
        cursor = int(request.url.params.get("cursor", "0"))
        page = [*entries(cursor, 100), {"id": "../x", "status": "success"}, {"status": "error"}]
        more = cursor < 200
        return httpx.Response(
            200,
            json={
                "executions": page,
                "has_more": more,
                "next_cursor": str(cursor + 100) if more else None,
            },
        )

    client = EachlabsClient("https://api.test/v1", "m", transport=httpx.MockTransport(v2))
    listed = await client.executions(ApiKey("k"), ("success", "failed"), None, pages=10)
    assert listed.whole and listed.pages == 3 and len(listed.entries) == 300
    assert listed.malformed == 6  # an id that is not one, an entry without one: skipped
    assert all(u.path == "/v2/executions" for u in asked)
    assert asked[0].params["status"] == "success"  # v2 takes its documented filters only

    def no_v2(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/executions":
            return httpx.Response(404, json={"error": "Not found"})
        return v2(request)

    asked.clear()
    client = EachlabsClient("https://api.test/v1", "m", transport=httpx.MockTransport(no_v2))
    listed = await client.executions(ApiKey("k"), (), None, pages=50)
    assert not listed.whole and len(listed.entries) == 1000  # v1's prefix, and no further
    await client.aclose()


async def test_a_night_against_the_provider_as_it_is_today(sandbox: Start, tmp_path: Path) -> None:
    # lost answers, the provider's clock 20 s ahead, a listing 3 provider-s behind, another
    # application of the organisation editing the same pictures, 30 identical unseeded rows and
    # 6 rows whose image is gone
    sb = _today(
        sandbox,
        faults=FaultRates(lost_create=0.08),
        clock_offset_s=20,
        listing_lag_s=3,
        org_traffic=0.3,
        allow_loopback_urls=True,
        fetch_inputs=True,
    )
    same = {"prompt": "white background", "img_url": "https://cdn.example.com/tee.jpg"}
    rows = [{"sku": f"SAME-{i}", **same} for i in range(30)]
    rows += catalog(40)
    root = sb.base_url.removesuffix("/v1")
    rows += [
        {"sku": f"GONE-{i}", "prompt": "p", "img_url": f"{root}/gone/{i}.jpg"} for i in range(6)
    ]
    config = _config(tmp_path, sb.base_url, rows, manifest={"allow_loopback_urls": True})
    summary = await go(config, [KEY])
    got = results(summary)
    assert sorted(r["row_number"] for r in got) == list(range(1, len(rows) + 1))

    ledger = _ours(sb)
    made = Counter(e["fingerprint"] for e in ledger if e["event"] == "created")
    assert max(made.values()) == 1, "an input was created twice"
    pids = [r["prediction_id"] for r in got if r["prediction_id"]]
    assert len(pids) == len(set(pids)), "two rows share a job"
    assert round(sum(r["cost_usd"] for r in got), 6) == ledger_cost(sb)
    assert sum(1 for e in ledger if e["event"] == "answer_lost") > 0
    assert sb.stats()["org_mate"]["creates"] > 0

    gone = [r for r in got if r["sku"].startswith("GONE-")]
    assert all(r["status"] == "failed" and r["error_type"] == "input_rejected" for r in gone)
    assert all(r["error_code"] == "INPUT_DOWNLOAD_ERROR" and r["attempts"] == 1 for r in gone)
    alike = [r for r in got if r["sku"].startswith("SAME-") and r["status"] == "succeeded"]
    assert len({r["seed"] for r in alike}) == len(alike)  # each its own draw, named by it

    document = json.loads((summary.run_dir / "summary.json").read_text())
    org = {e["prediction_id"] for e in sb.ledger() if e.get("key") == ORG_MATE}
    assert not org & {o["prediction_id"] for o in document["orphans"]}
    # a row the listing could not settle before the end is left, flagged, never made again
    left = [r for r in got if r["status"] not in ("succeeded", "failed")]
    assert all(r["unconfirmed"] for r in left)


async def test_a_balance_that_runs_out_stops_the_creates_and_a_top_up_finishes(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = _today(sandbox, balance_usd=0.03 * 15)
    rows = catalog(40)
    config = _config(tmp_path, sb.base_url, rows)
    first = await go(config, [KEY])
    assert first.exit_code == ExitCode.BALANCE
    got = results(first)
    assert not [r for r in got if r["status"] == "failed"]
    assert 0 < sum(r["status"] == "succeeded" for r in got) <= 15
    document = json.loads((first.run_dir / "summary.json").read_text())
    assert document["possible_duplicate_charges"] == 0 and document["balance_refusals"] >= 1

    top_up(sb.state, 10.0)
    second = await go(config, [KEY])
    assert second.exit_code == ExitCode.OK
    done = results(second)
    assert all(r["status"] == "succeeded" for r in done)
    made = Counter(e["fingerprint"] for e in _ours(sb) if e["event"] == "created")
    assert sum(made.values()) == 40 and max(made.values()) == 1
    assert round(sum(r["cost_usd"] for r in done), 6) == ledger_cost(sb)


async def test_a_402_is_balance_short_never_a_possible_charge() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(402, json={"error": "Insufficient balance"})

    client = EachlabsClient("https://api.test/v1", "m", transport=httpx.MockTransport(handler))
    with pytest.raises(BalanceShort) as caught:
        await client.create(ApiKey("k"), {"prompt": "p"})
    assert caught.value.ambiguous is False
    await client.aclose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_provider_down_is_not_a_catalog_of_failures(tmp_path: Path) -> None:
    port = _free_port()
    rows = catalog(12)
    retries = {"outage_after_s": 20, "outage_patience_s": 40, "backoff_max_s": 4}
    config = _config(tmp_path, f"http://127.0.0.1:{port}/v1", rows, retries=retries)
    first = await go(config, [KEY])
    assert first.exit_code == ExitCode.PROVIDER_DOWN
    assert not [r for r in results(first) if r["status"] == "failed"]
    assert first.stats.outages == 1

    settings = SandboxSettings(
        keys=(KEY,), api_shape="today", time_scale=SCALE, latency_mean_s=2, image_scale=0.05
    )
    with SandboxServer(settings, port=port) as sb:  # it comes back
        second = await go(config, [KEY])
        assert second.exit_code == ExitCode.OK
        assert all(r["status"] == "succeeded" for r in results(second))
        assert sb.stats()["creates"] == 12


@given(
    offset=st.floats(-600, 600),
    lag=st.floats(0, 40),
    sends=st.lists(st.floats(0, 5), min_size=2, max_size=30),
    answer=st.floats(0.001, 2),
    lost=st.integers(0, 29),
    made=st.booleans(),
    read_at=st.floats(0, 200),
)
def test_nothing_is_called_unmade_unless_the_listing_shows_past_it(
    offset: float,
    lag: float,
    sends: list[float],
    answer: float,
    lost: int,
    made: bool,
    read_at: float,
) -> None:
    """In virtual time: creates sent `sends` apart, each made at its send and answered
    `answer` later; one lost (made or not); a listing read at `read_at` shows what the
    provider made `lag` before. `covers` must never say the window is complete while the lost
    job, made, is not in what the listing shows; and the clock's interval holds the offset."""
    lost %= len(sends)
    clock = ProviderClock()
    t, times = 0.0, []
    for gap in sends:
        t += gap
        times.append(t)
    shown_by = read_at + offset - lag
    entries = []
    for i, sent in enumerate(times):
        if i == lost and not made:
            continue
        if i != lost:
            clock.answered(f"p{i}", sent, sent + answer)
        if sent + offset <= shown_by:
            entries.append(Execution(f"p{i}", "success", 0.03, sent + offset))
    clock.seen(entries)
    if clock.learned:
        assert clock.low - 1e-6 <= offset <= clock.high + 1e-6
    given_up = times[lost] + answer
    if made and clock.learned:  # the window read holds the lost job, wherever the clocks are
        made_at = times[lost] + offset
        assert clock.earliest(times[lost]) - 1e-6 <= made_at <= clock.latest(given_up) + 1e-6
    if made and clock.covers(entries, given_up):
        assert any(e.prediction_id == f"p{lost}" for e in entries)


def test_estimate_reads_the_balance_and_says_when_the_estimate_passes_it(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = _today(sandbox, balance_usd=0.10)
    rows = catalog(5)
    manifest = write_manifest(tmp_path / "m.csv", rows)
    path = tmp_path / "estimate.yaml"
    path.write_text(yaml.safe_dump(config_data(tmp_path, sb.base_url, manifest)), "utf-8")
    env = {**os.environ, "EACHLABS_API_KEYS": KEY}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "estimate", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == ExitCode.BALANCE, done.stderr
    assert "organisation balance" in done.stdout and "$0.10 (the estimate passes it)" in done.stdout
    assert "passes the organisation's balance" in done.stderr
    assert sb.stats()["creates"] == 0


async def test_require_balance_refuses_to_create_past_the_balance(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = _today(sandbox, balance_usd=0.10)
    rows = catalog(5)
    config = _config(tmp_path, sb.base_url, rows, budget={"require_balance": True})
    summary = await go(config, [KEY])
    assert summary.exit_code == ExitCode.BALANCE
    assert "less than this run's estimate of $0.15" in summary.message
    assert sb.stats()["creates"] == 0
    assert not [r for r in results(summary) if r["status"] == "failed"]
    document = json.loads((summary.run_dir / "summary.json").read_text())
    assert document["creates_stopped"] == "balance"
    assert document["balance_usd_at_start"] == pytest.approx(0.10)


async def test_a_fallback_chain_says_which_model_served_and_costs_what_ran(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = _today(sandbox, fallback_share=0.5)
    rows = catalog(20)
    config = _config(tmp_path, sb.base_url, rows, api={"fallback_selector": "wan-then-backup"})
    summary = await go(config, [KEY])
    got = results(summary)
    assert all(r["status"] == "succeeded" for r in got)
    served = [r for r in got if r["served_by"] == BACKUP_MODEL]
    assert 0 < len(served) < len(got)
    # the requested model's try and the backup's: the provider's figure, not price x images
    assert all(r["cost_usd"] == pytest.approx(0.04) for r in served)
    assert all(
        r["served_by"] is None and r["cost_usd"] == pytest.approx(0.03)
        for r in got
        if r not in served
    )
    assert round(sum(r["cost_usd"] for r in got), 6) == ledger_cost(sb)


async def test_a_run_whose_every_create_is_refused_says_nothing_may_be_billed(
    sandbox: Start, tmp_path: Path
) -> None:
    # the key is not the organisation's: every create answers 401, with ten slots sending
    sb = _today(sandbox)
    rows = catalog(30)
    config = _config(tmp_path, sb.base_url, rows)
    summary = await go(config, ["not-a-key-of-the-organisation"])
    assert summary.exit_code == ExitCode.NO_KEY
    assert summary.possibly_billed_usd == 0 and "may be billed" not in summary.message
    left = {r["status"] for r in journal_rows(summary.run_dir)}
    assert left <= {"pending"}  # a refusal made nothing: no row is left `creating`
    assert sb.stats()["creates"] == 0
