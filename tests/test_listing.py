"""The executions listing: the sandbox serves it in the reference's shape, the client reads it,
and a run without webhooks learns its jobs' ends from it, each confirmed by one poll; without
it (a provider that has none), the run polls each job on the schedule as before."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline import api
from pipeline.core import ApiKey, NotFound, ProtocolViolation
from pipeline.provider import EachlabsClient
from pipeline.provider.listing import read_listing
from pipeline.sandbox import SandboxServer
from tests.conftest import (
    KEY,
    KEY2,
    SCALE,
    assert_one_result_per_row,
    catalog,
    go,
    ledger_cost,
    make_config,
    results,
    shrunk_sandbox,
    write_manifest,
)

MODEL = "alibaba-wan-2-7-image-edit"
Start = Callable[..., SandboxServer]


def _create(client: httpx.Client, sb: SandboxServer, i: int, key: str = KEY) -> str:
    payload = {"model": MODEL, "input": {"prompt": f"p{i}", "img_url": "https://c.example/a.jpg"}}
    answer = client.post(f"{sb.base_url}/prediction/", json=payload, headers={"X-API-Key": key})
    return str(answer.json()["predictionID"])


def _ended(c: httpx.Client, sb: SandboxServer, ids: list[str], key: str = KEY) -> bool:
    """Each of these jobs, polled as a client does, has ended: the event a listing of ended
    jobs waits on (bounded: 2,000 polls)."""
    waiting = list(ids)
    for _ in range(2000):
        if not waiting:
            return True
        answer = c.get(f"{sb.base_url}/prediction/{waiting[0]}", headers={"X-API-Key": key})
        if answer.json().get("status") in ("success", "failed", "error", "cancelled"):
            waiting.pop(0)
    return False


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat()


def test_the_sandbox_lists_a_keys_executions_newest_first_in_the_reference_shape(
    sandbox: Start,
) -> None:
    sb = sandbox(time_scale=0.001, latency_spread=0.0)
    with httpx.Client() as c:
        before = time.time() - 1
        mine = [_create(c, sb, i) for i in range(5)]
        theirs = _create(c, sb, 9, key=KEY2)
        assert _ended(c, sb, mine) and _ended(c, sb, [theirs], KEY2)
        get = lambda **q: c.get(f"{sb.base_url}/executions", params=q, headers={"X-API-Key": KEY})  # noqa: E731
        page = get(model=MODEL, status="success,failed", limit="2")
        assert page.status_code == 200
        body = page.json()
        assert body["total_count"] == 5 and body["limit"] == 2 and body["offset"] == 0
        assert [e["id"] for e in body["executions"]] == mine[::-1][:2]  # newest first
        entry = body["executions"][0]
        assert set(entry) == {
            "id", "model", "status", "execution_cost", "run_time", "created_at", "started_at",
            "completed_at", "output", "workflow_id", "workflow_execution_id",
        }  # fmt: skip
        assert entry["status"] == "success" and entry["execution_cost"] == 0.03
        assert "input" not in entry  # the prediction's GET has it, the listing does not
        rest = get(model=MODEL, limit="100", offset="2").json()["executions"]
        assert [e["id"] for e in rest] == mine[::-1][2:]
        assert theirs not in {e["id"] for e in rest}  # another key's job is not listed
        # the creation-time window, and a status filter that holds nothing
        assert get(**{"from": _iso(time.time() + 60)}).json()["total_count"] == 0
        assert get(**{"from": _iso(before), "to": _iso(time.time())}).json()["total_count"] == 5
        assert get(status="cancelled").json()["executions"] == []
        assert get(model="another-model").json()["total_count"] == 0
        # reading the listing bills nothing more: each job ended once
        ended = [e["prediction_id"] for e in sb.ledger() if e["event"] == "ended"]
        assert sorted(ended) == sorted([*mine, theirs])
        for query, rule in [({"limit": "0"}, "limit"), ({"from": "yesterday"}, "from")]:
            refused = get(**query)
            assert refused.status_code == 400 and rule in refused.json()["error"]
        assert c.get(f"{sb.base_url}/executions").status_code == 401


def test_a_sandbox_without_the_listing_answers_404(sandbox: Start) -> None:
    sb = sandbox(time_scale=0.001, listing=False)
    with httpx.Client() as c:
        answer = c.get(f"{sb.base_url}/executions", headers={"X-API-Key": KEY})
    assert answer.status_code == 404


@pytest.mark.anyio
async def test_the_client_reads_the_listing_and_says_when_there_is_none(sandbox: Start) -> None:
    sb = sandbox(time_scale=0.001, latency_spread=0.0)
    with httpx.Client() as c:
        ids = {_create(c, sb, i) for i in range(3)}
        assert _ended(c, sb, sorted(ids))
    client = EachlabsClient(sb.base_url, MODEL)
    try:
        listed = await client.executions(ApiKey(KEY), ("success",), time.time() - 60, pages=2)
        found = listed.entries
        assert listed.whole and {e.prediction_id for e in found} == ids
        assert all(e.cost_usd == 0.03 and e.created_at is not None for e in found)
    finally:
        await client.aclose()
    none = sandbox(time_scale=0.001, listing=False)
    client = EachlabsClient(none.base_url, MODEL)
    try:
        with pytest.raises(NotFound, match="listing: HTTP 404"):
            await client.executions(ApiKey(KEY), ("success",), time.time(), pages=1)
    finally:
        await client.aclose()


@given(
    st.dictionaries(
        st.sampled_from(["executions", "total_count", "other"]),
        st.one_of(
            st.none(),
            st.integers(),
            st.text(),
            st.lists(
                st.dictionaries(
                    st.sampled_from(["id", "status", "execution_cost", "created_at"]),
                    st.one_of(
                        st.none(),
                        st.text(),
                        st.floats(),
                        st.integers(),
                        st.just(10**400),  # past a float's range: no reading, no crash
                        st.booleans(),
                    ),
                )
            ),
        ),
    )
)
@example({"executions": [{"id": "a", "status": "success", "execution_cost": 10**400}]})
def test_any_answer_is_read_or_refused_as_a_protocol_violation(answer: dict[str, Any]) -> None:
    """Whatever a provider answers, the reader gives entries with an id and a status, and a
    cost that is a reading or None; or it says the answer is not a listing."""
    try:
        page = read_listing(answer, v2=False)
    except ProtocolViolation:
        assert not isinstance(answer.get("executions"), list)
        return
    found = page.entries
    assert page.malformed + len(found) == len(answer["executions"])
    for entry in found:
        assert isinstance(entry.prediction_id, str) and isinstance(entry.status, str)
        assert entry.cost_usd is None or 0 <= entry.cost_usd <= 10_000


def _run(sandbox: Start, tmp_path: Path, rows: int, **settings: Any) -> tuple[Any, SandboxServer]:
    sb = shrunk_sandbox(sandbox, latency_spread=0.3, **settings)
    manifest = write_manifest(tmp_path / "m.csv", catalog(rows))
    # the listing read at the default pace (the suite's other runs read it at most every 0.5 s)
    config = make_config(
        tmp_path, sb.base_url, manifest, api={"time_scale": SCALE}, polling={"min_interval_s": 0.1}
    )
    return config, sb


@pytest.mark.anyio
async def test_a_run_learns_its_ends_from_the_listing_and_confirms_each_with_one_poll(
    sandbox: Start, tmp_path: Path
) -> None:
    config, sb = _run(sandbox, tmp_path, 60)
    summary = await go(config, [KEY])
    rows = results(summary)
    assert_one_result_per_row(rows, 60)
    assert {r["status"] for r in rows} == {"succeeded"}
    assert summary.stats.listings > 0
    # one poll confirms each end the listing showed; the schedule's ten are not made
    assert summary.stats.polls < 1.5 * 60
    assert round(sum(r["cost_usd"] for r in rows), 6) == ledger_cost(sb)


@pytest.mark.anyio
async def test_without_a_listing_each_job_is_polled_on_the_schedule(
    sandbox: Start, tmp_path: Path
) -> None:
    config, sb = _run(sandbox, tmp_path, 40, listing=False)
    summary = await api.arun(config, keys=[KEY], raise_on_failed_rows=False)
    rows = results(summary)
    assert_one_result_per_row(rows, 40)
    assert {r["status"] for r in rows} == {"succeeded"}
    assert summary.stats.listings == 0  # the 404 is no read of the listing
    assert summary.stats.polls > 2 * 40  # polled on the schedule instead
    log = (config.output.dir / "run.log").read_text()
    assert log.count('"listing_unavailable"') == 1
    assert round(sum(r["cost_usd"] for r in rows), 6) == ledger_cost(sb)
