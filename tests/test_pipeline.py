"""The whole pipeline against the sandbox over real HTTP, in shrunk time."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import structlog

from pipeline.core import (
    ApiKey,
    ConfigError,
    ExitCode,
    ManifestError,
    RunFolderMismatch,
    load_config,
)
from pipeline.sandbox import FaultRates, SandboxServer, key_hash
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
    until,
    write_manifest,
)

Start = Callable[..., SandboxServer]
pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]


async def test_every_row_once_within_the_limits_one_key(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, creates_per_window=20, max_concurrent=4, latency_mean_s=2)
    manifest = write_manifest(tmp_path / "m.csv", catalog(60))
    config = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        limits={"creates_per_window": 20, "max_concurrent": 4},
    )
    summary = await go(config, [KEY])
    rows = results(summary)
    assert summary.exit_code is ExitCode.OK
    assert_one_result_per_row(rows, 60)
    assert all(r["status"] == "succeeded" and r["images"] == 1 for r in rows)
    stats = sb.stats()["keys"][key_hash(KEY)]
    assert stats["refused_429"] == 0
    assert stats["max_creates_in_window"] <= 20
    assert stats["max_in_flight"] <= 4
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(ledger_cost(sb))
    assert summary.totals["cost_usd"] == pytest.approx(sb.stats()["cost_usd"])
    assert sb.stats()["duplicate_creates"] == 0


async def test_several_keys_share_the_work(sandbox: Start, tmp_path: Path) -> None:
    keys = ["k-a", "k-b", "k-c"]
    sb = shrunk_sandbox(
        sandbox, keys=tuple(keys), creates_per_window=10, max_concurrent=3, latency_mean_s=3
    )
    manifest = write_manifest(tmp_path / "m.csv", catalog(60))
    config = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        limits={"creates_per_window": 10, "max_concurrent": 3},
    )
    summary = await go(config, keys)
    assert_one_result_per_row(results(summary), 60)
    per_key = sb.stats()["keys"]
    for key in keys:
        s = per_key[key_hash(key)]
        assert s["creates"] > 5  # every key did a share
        assert s["refused_429"] == 0
        assert s["max_creates_in_window"] <= 10 and s["max_in_flight"] <= 3
    assert sb.stats()["creates"] == 60


async def test_retries_on_5xx_and_lost_answers(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(
        sandbox,
        seed=11,
        latency_mean_s=2,
        faults=FaultRates(create_5xx=0.15, poll_5xx=0.15, poll_reset=0.05, lost_create=0.1),
    )
    manifest = write_manifest(tmp_path / "m.csv", catalog(50))
    config = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        retries={"max_attempts": 8, "backoff_initial_s": 0.5},
    )
    summary = await go(config, [KEY])
    rows = results(summary)
    assert_one_result_per_row(rows, 50)
    assert all(r["status"] == "succeeded" for r in rows)
    assert any(r["attempts"] > 1 for r in rows)
    lost = sb.stats()["keys"][key_hash(KEY)]["lost_answers"]
    assert lost > 0
    # each lost answer's job is found in the key's listing and adopted: nothing is created
    # twice, and the results hold every cost billed
    assert sum(r["create_resolution"] == "adopted" for r in rows) == lost
    assert not any(r["possible_duplicate_charge"] for r in rows)
    assert sb.stats()["duplicate_creates"] == 0
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(sb.stats()["cost_usd"])
    assert summary.stats.creates_adopted == lost and summary.stats.creates_unresolved == 0


@pytest.mark.parametrize("listing", [False, True])
async def test_ambiguous_creates_can_be_failed_not_retried(
    sandbox: Start, tmp_path: Path, listing: bool
) -> None:
    sb = shrunk_sandbox(sandbox, seed=5, latency_mean_s=1, faults=FaultRates(lost_create=0.3))
    manifest = write_manifest(tmp_path / "m.csv", catalog(30))
    config = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        retries={"ambiguous_creates": "fail"},
        polling={"listing": listing},
    )
    rows = results(await go(config, [KEY]))
    ambiguous = [r for r in rows if r["ambiguous_creates"]]
    assert ambiguous
    if listing:  # each lost create's job is found and adopted: nothing fails
        assert all(r["status"] == "succeeded" for r in rows)
        assert all(r["create_resolution"] == "adopted" for r in ambiguous)
        assert not any(r["possible_duplicate_charge"] for r in rows)
    else:  # today's behaviour without the listing: failed, and flagged
        assert all(r["error_type"] == "ambiguous_create" for r in ambiguous)
        assert all(r["possible_duplicate_charge"] for r in ambiguous)
        assert all(r["create_resolution"] == "unresolved" for r in ambiguous)
    assert sb.stats()["duplicate_creates"] == 0
    assert sb.stats()["creates"] == 30


async def test_400_is_never_retried(sandbox: Start, tmp_path: Path) -> None:
    # the client lets loopback URLs through; this sandbox, like the provider, refuses them
    sb = shrunk_sandbox(sandbox, allow_loopback_urls=False)
    rows_in = catalog(5)
    rows_in[2]["img_url"] = "https://127.0.0.1/private.jpg"
    manifest = write_manifest(tmp_path / "m.csv", rows_in)
    config = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        manifest={"allow_loopback_urls": True},
    )
    rows = results(await go(config, [KEY]))
    bad = rows[2]
    assert bad["status"] == "failed" and bad["error_type"] == "invalid_input"
    assert bad["attempts"] == 1 and "localhost" in bad["error_message"]
    assert sb.stats()["keys"][key_hash(KEY)]["refused_400"] == 1


async def test_bad_rows_are_rejected_and_cost_nothing(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox)
    rows_in = catalog(6)
    rows_in[1]["prompt"] = ""
    rows_in[3]["n"] = "9"
    rows_in[4]["img_url"] = "ftp://x.com/a.jpg"
    for row in rows_in:
        row.setdefault("n", "")
    manifest = write_manifest(tmp_path / "m.csv", rows_in)
    config = make_config(tmp_path, sb.base_url, manifest, api={"time_scale": SCALE})
    summary = await go(config, [KEY])
    rows = results(summary)
    rejected = {r["row_number"]: r["error_message"] for r in rows if r["status"] == "rejected"}
    assert rejected.keys() == {2, 4, 5}
    assert "row 2" in rejected[2] and "prompt" in rejected[2] and "required" in rejected[2]
    assert "row 4" in rejected[4] and "n (column 'n')" in rejected[4]
    assert "img_url" in rejected[5] and "HTTPS" in rejected[5]
    assert sb.stats()["creates"] == 3
    with (tmp_path / "run" / "failures.csv").open(encoding="utf-8") as handle:
        failures = list(csv.DictReader(handle))
    columns = "sku,prompt,img_url,n,wanbatch_status,wanbatch_error_type,wanbatch_error_message"
    assert list(failures[0]) == columns.split(",") and len(failures) == 3
    assert {f["wanbatch_status"] for f in failures} == {"rejected"}
    assert {f["wanbatch_error_type"] for f in failures} == {"invalid_row"}
    assert failures[0]["wanbatch_error_message"] == rejected[2]  # the reason, in plain words


async def test_a_refused_key_is_retired_and_the_run_goes_on(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2)
    manifest = write_manifest(tmp_path / "m.csv", catalog(20))
    config = make_config(tmp_path, sb.base_url, manifest, api={"time_scale": SCALE})
    summary = await go(config, ["revoked-key", KEY])
    assert summary.exit_code is ExitCode.OK
    assert_one_result_per_row(results(summary), 20)
    assert summary.stats.retired_keys == [ApiKey("revoked-key").name]
    assert all(r["status"] == "succeeded" for r in results(summary))


async def test_no_usable_key_stops_before_burning_the_manifest(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox)
    manifest = write_manifest(tmp_path / "m.csv", catalog(30))
    config = make_config(tmp_path, sb.base_url, manifest, api={"time_scale": SCALE})
    summary = await go(config, ["wrong-1", "wrong-2"])
    assert summary.exit_code is ExitCode.NO_KEY
    assert "EACHLABS_API_KEY" in summary.message
    assert "wrong-1" not in summary.message
    assert summary.counts.get("failed", 0) == 0  # nothing was failed for a bad key
    assert sb.stats()["creates"] == 0


async def test_a_bad_config_fails_before_any_request(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox)
    manifest = write_manifest(tmp_path / "m.csv", catalog(3))
    with pytest.raises(ConfigError, match=r"limits\.max_concurrent"):
        make_config(tmp_path, sb.base_url, manifest, limits={"max_concurrent": 0})
    with pytest.raises(ConfigError, match=r"polling\.job_timout_s: unknown key"):
        make_config(tmp_path, sb.base_url, manifest, polling={"job_timout_s": 5})
    config = make_config(
        tmp_path, sb.base_url, manifest, manifest={"columns": {"prompt": "edit_prompt"}}
    )
    with pytest.raises(ManifestError, match="edit_prompt"):
        await go(config, [KEY])
    assert sb.stats()["creates"] == 0 and not sb.ledger()


async def test_results_columns_and_cost(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=1)
    manifest = write_manifest(tmp_path / "m.csv", catalog(4, n="2", title="extra col"))
    config = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        manifest={"defaults": {"size": "1K"}},
    )
    rows = results(await go(config, [KEY]))
    contract = [
        "job_id",
        "row_number",
        "sku",
        "prompt",
        "img_urls",
        "size",
        "n",
        "seed",
        "status",
        "prediction_id",
        "output_urls",
        "images",
        "cost_usd",
        "predict_time_s",
        "latency_s",
        "attempts",
        "error_type",
        "error_message",
        "created_at",
        "finished_at",
    ]
    assert all(c in rows[0] for c in contract)
    first = rows[0]
    assert first["job_id"] == "SKU-1" and first["sku"] == "SKU-1" and first["title"] == "extra col"
    assert first["size"] == "1K" and first["n"] == 2 and len(first["output_urls"]) == 2
    assert first["cost_usd"] == pytest.approx(0.06) and first["images"] == 2
    assert first["latency_s"] > 0 and first["created_at"] <= first["finished_at"]
    assert KEY not in json.dumps(rows, default=str)


async def test_a_job_timeout_fails_the_job_not_the_run(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=200, latency_spread=0)
    manifest = write_manifest(tmp_path / "m.csv", catalog(2))
    config = make_config(
        tmp_path, sb.base_url, manifest, api={"time_scale": SCALE}, polling={"job_timeout_s": 20}
    )
    rows = results(await go(config, [KEY]))
    assert [r["error_type"] for r in rows] == ["timeout", "timeout"]


async def test_embedded_sandbox_demo_config(tmp_path: Path) -> None:
    config = load_config(ROOT / "configs" / "demo.yaml")
    config = config.model_copy(
        update={"output": config.output.model_copy(update={"dir": tmp_path / "demo"})}
    )
    summary = await go(config, [])
    rows = results(summary)
    assert summary.exit_code is ExitCode.ROWS_FAILED  # the demo has bad rows on purpose
    assert "rejected rows" in summary.message
    assert len(rows) == summary.totals["rows"] > 30
    assert {r["status"] for r in rows} <= {"succeeded", "failed", "rejected"}
    assert summary.sandbox_stats is not None
    assert summary.totals["cost_usd"] == pytest.approx(summary.sandbox_stats["cost_usd"])


async def test_budget_stops_new_creates(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=1)
    manifest = write_manifest(tmp_path / "m.csv", catalog(20))
    config = make_config(
        tmp_path, sb.base_url, manifest, api={"time_scale": SCALE}, budget={"max_cost_usd": 0.15}
    )
    summary = await go(config, [KEY])
    assert summary.exit_code is ExitCode.BUDGET
    assert sb.stats()["cost_usd"] <= 0.15 + 1e-9
    assert summary.counts.get("pending", 0) == 20 - sb.stats()["creates"]


async def test_resume_reattaches_without_creating_again(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2)
    manifest = write_manifest(tmp_path / "m.csv", catalog(60))
    config = make_config(tmp_path, sb.base_url, manifest, api={"time_scale": SCALE})
    with anyio.move_on_after(0.6):  # stop mid-run, as a crash would: jobs are left in flight
        await go(config, [KEY])
    creates_before = sb.stats()["creates"]
    assert 0 < creates_before < 60
    summary = await go(config, [KEY])
    assert summary.exit_code is ExitCode.OK
    assert_one_result_per_row(results(summary), 60)
    # a create cut off in flight is counted ambiguous; nothing else is created twice
    duplicates = sb.stats()["duplicate_creates"]
    assert duplicates <= summary.totals["ambiguous_creates"]
    assert sb.stats()["creates"] == 60 + duplicates
    assert summary.stats.reattached > 0
    assert summary.totals["cost_usd"] + 0.03 * duplicates == pytest.approx(sb.stats()["cost_usd"])


async def test_a_resume_right_after_a_stop_keeps_the_window_it_left(
    sandbox: Start, tmp_path: Path
) -> None:
    # short jobs, so the window (20 creates in 3 s) binds rather than the slots
    sb = shrunk_sandbox(sandbox, creates_per_window=20, latency_mean_s=0.5)
    manifest = write_manifest(tmp_path / "m.csv", catalog(30))
    config = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        limits={"creates_per_window": 20},
    )
    async with anyio.create_task_group() as first:
        first.start_soon(go, config, [KEY])
        # stopped once the window is full, as a crash would be (bounded: 30 s)
        await anyio.to_thread.run_sync(until, lambda: sb.stats()["creates"] >= 20, 30.0)
        first.cancel_scope.cancel()
    assert 20 <= sb.stats()["creates"] < 30
    # resumed at once: the provider's window still holds the first run's creates
    summary = await go(config, [KEY])
    assert_one_result_per_row(results(summary), 30)
    stats = sb.stats()["keys"][key_hash(KEY)]
    assert stats["refused_429"] == 0 and summary.stats.rate_limited == 0
    assert stats["max_creates_in_window"] <= 20


async def test_a_changed_manifest_is_not_mixed_into_a_run(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=0.5)
    manifest = write_manifest(tmp_path / "m.csv", catalog(3))
    config = make_config(tmp_path, sb.base_url, manifest, api={"time_scale": SCALE})
    await go(config, [KEY])
    write_manifest(manifest, catalog(4))
    # the run goes on with the manifest it started with (its copy), and says the file changed
    with structlog.testing.capture_logs() as logged:
        again = await go(config, [KEY])
    assert again.totals["rows"] == 3 and sb.stats()["creates"] == 3
    assert [e for e in logged if e["event"] == "manifest_changed"]
    # a folder whose copy is gone (made before copies were kept) still refuses a changed file
    (again.run_dir / "manifest-source.csv").unlink()
    write_manifest(manifest, catalog(5))
    with pytest.raises(RunFolderMismatch, match="another manifest file"):
        await go(config, [KEY])


async def test_transient_error_codes_are_created_again_final_ones_and_cancels_are_not(
    sandbox: Start, tmp_path: Path
) -> None:
    faults = FaultRates(transient_error=0.3, job_error=0.1, cancelled=0.1)
    sb = shrunk_sandbox(sandbox, latency_mean_s=2, faults=faults, seed=11)
    manifest = write_manifest(tmp_path / "m.csv", catalog(80))
    config = make_config(tmp_path, sb.base_url, manifest, api={"time_scale": SCALE})
    summary = await go(config, [KEY])
    rows = results(summary)
    assert_one_result_per_row(rows, 80)
    ends = {e["prediction_id"]: e for e in sb.ledger() if e["event"] == "ended"}
    retried = [r for r in rows if r["attempts"] > 1]
    assert retried and summary.stats.job_retries == sum(r["attempts"] - 1 for r in rows)
    for row in rows:
        last = ends[row["prediction_id"]]
        if row["status"] == "succeeded":
            assert row["error_code"] is None
        elif row["error_type"] == "cancelled":
            assert last["status"] == "cancelled"
        else:  # a final code is never created again; a transient one only when attempts ran out
            assert row["error_type"] == "job_error"
            assert row["error_code"] == last["error_code"]
            assert row["error_code"] == "PROVIDER_FAILED" or row["attempts"] == 5
    assert {r["error_type"] for r in rows if r["status"] == "failed"} >= {"job_error", "cancelled"}
    assert sb.stats()["creates"] == 80 + summary.stats.job_retries
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(ledger_cost(sb))


async def test_a_reached_budget_can_cancel_the_jobs_in_flight(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=60)  # 3 s jobs: in flight when the budget binds
    manifest = write_manifest(tmp_path / "m.csv", catalog(20))
    config = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        budget={"max_cost_usd": 0.15, "cancel_in_flight": True},
    )
    summary = await go(config, [KEY])
    assert summary.exit_code is ExitCode.BUDGET
    rows = results(summary)
    cancelled = [r for r in rows if r["error_type"] == "cancelled"]
    assert len(cancelled) == 5 and sb.stats()["creates"] == 5
    assert all(r["cancel_accepted"] is True and r["cost_usd"] == 0 for r in cancelled)
    assert ledger_cost(sb) == 0 and summary.totals["cost_usd"] == 0
