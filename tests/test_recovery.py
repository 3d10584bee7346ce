"""Reprocessing failures and incremental runs, against the sandbox over real HTTP."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.core import ConfigError, ExitCode
from pipeline.journal import Journal
from pipeline.runs import Reprocess
from pipeline.sandbox import FaultRates, SandboxServer
from tests.conftest import (
    KEY,
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

Start = Callable[..., SandboxServer]
pytestmark = pytest.mark.anyio


def creates_by_fingerprint(sb: SandboxServer) -> Counter[str]:
    return Counter(e["fingerprint"] for e in sb.ledger() if e["event"] == "created")


async def test_retry_runs_the_failed_rows_only(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, faults=FaultRates(job_error=0.3), seed=7)
    manifest = write_manifest(tmp_path / "m.csv", catalog(30))
    config = make_config(tmp_path, sb.base_url, manifest, api={"time_scale": SCALE})
    first = await go(config, [KEY])
    before = {r["row_number"]: r for r in results(first)}
    failed = {n for n, r in before.items() if r["status"] == "failed"}
    assert failed, "the seed should give some job errors"
    assert {before[n]["error_type"] for n in failed} == {"job_error"}
    creates_before = sb.stats()["creates"]

    second = await go(config, [KEY], reprocess=Reprocess(None))

    # a row may fail again (the sandbox draws job errors anew): that is what exit 6 says
    left = second.counts.get("failed", 0)
    assert second.exit_code is (ExitCode.ROWS_FAILED if left else ExitCode.OK)
    assert second.requeued == {"job_error": len(failed)}
    after = {r["row_number"]: r for r in results(second)}
    assert_one_result_per_row(list(after.values()), 30)
    # exactly one new create per failed row, and none for the rows that had succeeded
    assert sb.stats()["creates"] - creates_before == len(failed)
    for n, row in after.items():
        if n in failed:
            assert len(row["history"]) == 1
            assert row["history"][0]["error_type"] == "job_error"
            assert row["history"][0]["prediction_id"] == before[n]["prediction_id"]
            # a time in a list of records is a UTC timestamp, as a time of a row is
            assert row["history"][0]["finished_at"] == before[n]["finished_at"]
            assert row["finished_at"].tzinfo is not None and row["finished_at"] > row["created_at"]
            assert row["prediction_id"] != before[n]["prediction_id"]
        else:
            assert row["history"] == []
            assert row["prediction_id"] == before[n]["prediction_id"]
            assert row["output_urls"] == before[n]["output_urls"]
    # the results hold each row's latest outcome, and the cost is what was billed
    assert sum(r["cost_usd"] for r in after.values()) == pytest.approx(ledger_cost(sb))


async def test_retry_by_error_type(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, faults=FaultRates(job_error=0.4), seed=3)
    manifest = write_manifest(tmp_path / "m.csv", catalog(20))
    config = make_config(tmp_path, sb.base_url, manifest, api={"time_scale": SCALE})
    first = await go(config, [KEY])
    failed = first.counts.get("failed", 0)
    assert failed > 0
    creates = sb.stats()["creates"]

    # a type with no failed rows: nothing is sent again
    other = await go(config, [KEY], reprocess=Reprocess(frozenset({"timeout"})))
    assert other.requeued == {}
    assert sb.stats()["creates"] == creates
    assert other.counts.get("failed", 0) == failed
    assert other.left_failed == {"job_error": failed}


async def test_a_timed_out_job_is_cancelled_at_the_provider_then_retried_anew(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=30, latency_spread=0.05)
    manifest = write_manifest(tmp_path / "m.csv", catalog(6))
    config = make_config(
        tmp_path, sb.base_url, manifest, api={"time_scale": SCALE}, polling={"job_timeout_s": 5}
    )
    first = await go(config, [KEY])
    assert first.counts == {"failed": 6}
    timed_out = results(first)
    assert {r["error_type"] for r in timed_out} == {"timeout"}
    assert all(r["cancel_accepted"] is True for r in timed_out)
    assert all("its cancel was accepted" in r["error_message"] for r in timed_out)
    # the provider stopped them: each ended cancelled, and the ledger bills nothing for it
    ends = [e for e in sb.ledger() if e["event"] == "ended"]
    assert len(ends) == 6 and {e["status"] for e in ends} == {"cancelled"}
    assert ledger_cost(sb) == 0

    patient = make_config(
        tmp_path, sb.base_url, manifest, api={"time_scale": SCALE}, polling={"job_timeout_s": 120}
    )
    second = await go(patient, [KEY], reprocess=Reprocess(frozenset({"timeout"})))

    assert second.counts == {"succeeded": 6}
    assert sb.stats()["creates"] == 12  # a cancelled job cannot end: each is created anew
    rows = results(second)
    assert all(r["history"][0]["error_type"] == "timeout" for r in rows)
    assert all(r["prediction_id"] != r["history"][0]["prediction_id"] for r in rows)
    assert all(r["cancel_accepted"] is None for r in rows)
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(ledger_cost(sb))


async def test_retry_needs_a_run_folder(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox)
    manifest = write_manifest(tmp_path / "m.csv", catalog(2))
    config = make_config(tmp_path, sb.base_url, manifest)
    with pytest.raises(ConfigError, match="nothing to retry"):
        await go(config, [KEY], reprocess=Reprocess(None))


async def test_the_failures_manifest_runs_as_a_new_manifest(sandbox: Start, tmp_path: Path) -> None:
    faulty = shrunk_sandbox(sandbox, faults=FaultRates(job_error=0.35), seed=11)
    rows = catalog(24, size="1K")
    rows[4]["prompt"] = ""  # rejected: an empty prompt
    rows[9]["img_url"] = "ftp://example.com/x.jpg"  # rejected: not http(s)
    manifest = write_manifest(tmp_path / "m.csv", rows)
    config = make_config(tmp_path, faulty.base_url, manifest, api={"time_scale": SCALE})
    first = await go(config, [KEY])
    bad = {r["sku"]: r for r in results(first) if r["status"] in ("failed", "rejected")}
    assert first.counts.get("failed", 0) > 0
    assert first.counts["rejected"] == 2
    assert first.failures_path is not None
    with first.failures_path.open(encoding="utf-8") as handle:
        written = list(csv.DictReader(handle))
    assert [r["sku"] for r in written] == sorted(bad, key=lambda s: int(s.split("-")[1]))
    reasons = ["wanbatch_status", "wanbatch_error_type", "wanbatch_error_message"]
    assert list(written[0]) == ["sku", "prompt", "img_url", "size", *reasons]
    assert all(r["wanbatch_error_message"] == bad[r["sku"]]["error_message"] for r in written)

    healthy = shrunk_sandbox(sandbox)
    again = make_config(
        tmp_path,
        healthy.base_url,
        first.failures_path,
        api={"time_scale": SCALE},
        output={"dir": str(tmp_path / "again")},
    )
    second = await go(again, [KEY])

    assert second.exit_code is ExitCode.ROWS_FAILED  # the rejected rows are rejected again
    out = {r["sku"]: r for r in results(second)}
    assert set(out) == set(bad)
    for sku, row in out.items():
        if bad[sku]["status"] == "rejected":
            assert row["status"] == "rejected"
            assert (
                row["error_message"].split(": ", 1)[1]
                == bad[sku]["error_message"].split(": ", 1)[1]
            )
        else:
            assert row["status"] == "succeeded"
            assert row["prompt"] == bad[sku]["prompt"]
            assert row["img_urls"] == bad[sku]["img_urls"]
            assert row["size"] == "1K"
    assert healthy.stats()["creates"] == first.counts["failed"]
    # run again and failing again, a row carries its new reason once, not a second set
    assert second.failures_path is not None
    with second.failures_path.open(encoding="utf-8") as handle:
        columns = next(csv.reader(handle))
    assert columns == ["sku", "prompt", "img_url", "size", *reasons]


async def test_incremental_run_sends_only_the_changed_rows(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox)
    rows = catalog(20, size="1K", seed=5)
    state = {"enabled": True, "state": str(tmp_path / "state" / "wanbatch-state.sqlite")}
    night1 = make_config(
        tmp_path,
        sb.base_url,
        write_manifest(tmp_path / "night1.csv", rows),
        api={"time_scale": SCALE},
        output={"dir": str(tmp_path / "night1")},
        incremental=state,
    )
    first = await go(night1, [KEY])
    assert first.counts == {"succeeded": 20}
    earlier = {r["sku"]: r for r in results(first)}

    rows[1]["prompt"] = "a new prompt"
    rows[3]["img_url"] = "https://cdn.example.com/p/new.jpg"
    rows[5]["size"] = "2K"
    rows[7]["seed"] = 6
    rows[8]["n"] = 2
    rows.append({"sku": "SKU-21", "prompt": "new row", "img_url": "https://cdn.example.com/21.jpg"})
    changed = {"SKU-2", "SKU-4", "SKU-6", "SKU-8", "SKU-9", "SKU-21"}
    night2 = make_config(
        tmp_path,
        sb.base_url,
        write_manifest(tmp_path / "night2.csv", rows),
        api={"time_scale": SCALE},
        output={"dir": str(tmp_path / "night2")},
        incremental=state,
    )
    before = creates_by_fingerprint(sb)
    second = await go(night2, [KEY])

    sent = creates_by_fingerprint(sb) - before
    out = {r["sku"]: r for r in results(second)}
    assert second.counts == {"succeeded": 21}
    assert {sku for sku, r in out.items() if not r["reused"]} == changed
    assert sum(sent.values()) == len(changed)
    for sku, row in out.items():
        if sku in changed:
            assert row["cost_usd"] > 0
        else:
            assert row["reused"]
            assert row["cost_usd"] == 0
            assert row["output_urls"] == earlier[sku]["output_urls"]
            assert row["prediction_id"] == earlier[sku]["prediction_id"]
    assert second.totals["reused"] == 15
    assert second.totals["cost_usd"] == pytest.approx(0.03 * 7)  # one row asks for 2 images

    # without `incremental`, the same manifest is sent in full
    full = make_config(
        tmp_path,
        sb.base_url,
        tmp_path / "night2.csv",
        api={"time_scale": SCALE},
        output={"dir": str(tmp_path / "full")},
    )
    before = sb.stats()["creates"]
    await go(full, [KEY])
    assert sb.stats()["creates"] - before == 21


async def test_incremental_needs_a_state_store(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.csv", catalog(1))
    with pytest.raises(ConfigError, match=r"incremental: .*state"):
        make_config(tmp_path, "sandbox", manifest, incremental={"enabled": True})


def test_requeue_keeps_history_and_filters_types(tmp_path: Path) -> None:
    from pipeline.core import JobOutcome, JobSpec, Status
    from pipeline.journal import Finish

    journal = Journal(tmp_path / "journal.sqlite")
    specs = [JobSpec(f"j{i}", i, {"prompt": "p"}, {}, f"fp{i}") for i in range(1, 5)]
    journal.intake.ingest(specs, {})
    kinds = {1: "job_error", 2: "invalid_input", 3: "server_error"}
    journal.apply(
        [
            Finish(n, JobOutcome(Status.FAILED, f"pred-{n}", error_type=kind, finished_at=1.0), 0)
            for n, kind in kinds.items()
        ]
        + [Finish(4, JobOutcome(Status.SUCCEEDED, "pred-4", ("u",), finished_at=1.0), 0.03)]
    )
    assert journal.reports.requeue({"job_error", "server_error"}) == {
        "job_error": 1,
        "server_error": 1,
    }
    assert [e.row_number for e in journal.open_jobs(0, 10)] == [1, 3]
    assert journal.reports.failed_types() == {"invalid_input": 1}
    assert journal.reports.requeue(None) == {"invalid_input": 1}
    assert journal.reports.counts() == {"pending": 3, "succeeded": 1}
    # a timed-out job is polled again unless the provider accepted its cancel
    late = [JobSpec(f"j{i}", i, {"prompt": "p"}, {}, f"fp{i}") for i in (5, 6)]
    journal.intake.ingest(late, {})
    journal.apply(
        [
            Finish(
                n,
                JobOutcome(
                    Status.FAILED,
                    f"pred-{n}",
                    error_type="timeout",
                    finished_at=1.0,
                    cancel_accepted=accepted,
                ),
                0,
            )
            for n, accepted in ((5, False), (6, True))
        ]
    )
    assert journal.reports.requeue({"timeout"}) == {"timeout": 2}
    again = {e.row_number: e for e in journal.open_jobs(4, 10)}
    assert (again[5].status, again[5].prediction_id) == (Status.CREATED, "pred-5")
    assert (again[6].status, again[6].prediction_id) == (Status.PENDING, None)
    journal.close()
