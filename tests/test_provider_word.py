"""A job's end and its cost are the provider's word (issue 22): a cancel is a request, every
terminal status the provider documents ends a job, `metrics.cost` is recorded, callbacks of
either shape and signature are taken, and what no poll confirmed is said, never booked as $0.

The sandbox's ledger is the judge: the cost recorded equals the cost billed, every job that
succeeded at the provider is a `succeeded` row with its images stored, and no job is polled
again after a poll that saw its end (`polls_after_end`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
import structlog

from pipeline.core import ApiKey, ExitCode, JobOutcome, JobSpec, RunStats, Status, WebhookSection
from pipeline.core.schema import MODEL
from pipeline.journal import CostBooks, Finish, Journal, MarkCreated, NoteAmbiguous, NoteCancel
from pipeline.provider import Callbacks, EachlabsClient, Receiver
from pipeline.sandbox import FaultRates, SandboxServer
from tests.conftest import (
    KEY,
    KEY2,
    SCALE,
    assert_one_result_per_row,
    catalog,
    go,
    journal_rows,
    judge_against_ledger,
    make_config,
    results,
    shrunk_sandbox,
    until,
    write_manifest,
)
from tests.test_crash import Pipeline, write_config

Start = Callable[..., SandboxServer]


def _ends(sb: SandboxServer) -> dict[str, dict[str, Any]]:
    return {e["prediction_id"]: e for e in sb.ledger() if e["event"] == "ended"}


def judge_books(
    sb: SandboxServer, run_dir: Path, rows: int, *, finished: bool = True
) -> list[dict[str, Any]]:
    """The ledger's judgement: cost recorded equals billed, every job that succeeded at the
    provider is a succeeded row with every image stored, and no job was polled past its end.
    `finished`: every row has its final result (a budget leaves unsent rows pending)."""
    table = pq.read_table(run_dir / "results.parquet").to_pylist()
    assert sorted(r["row_number"] for r in table) == list(range(1, rows + 1))
    if finished:
        judge_against_ledger(sb, run_dir, rows)
    recorded = sum(r["cost_usd"] for r in table)
    assert recorded == pytest.approx(sum(e["cost_usd"] for e in _ends(sb).values()))
    by_pid = {r["prediction_id"]: r for r in table if r["prediction_id"]}
    ends = _ends(sb)
    for pid, end in ends.items():
        if end["status"] == "success" and pid in by_pid:
            row = by_pid[pid]
            assert row["status"] == "succeeded", (row["row_number"], row["error_type"])
            assert row["cost_usd"] == pytest.approx(end["cost_usd"])
            assert row["outputs_status"] == "stored"
            assert row["cancel_accepted"] in (None, False)
    images = pq.read_table(run_dir / "images.parquet").to_pylist()
    billed_images = sum(e["images"] for e in ends.values())
    assert sum(i["state"] == "stored" for i in images) == billed_images
    assert sum(i["cost_usd"] for i in images) == pytest.approx(
        sum(e["cost_usd"] for e in ends.values())
    )
    assert sb.stats()["polls_after_end"] == 0
    return table


# -- the client reads every documented shape ------------------------------------------------


def _client(answers: dict[str, dict[str, Any]]) -> EachlabsClient:
    def handler(request: httpx.Request) -> httpx.Response:
        # as a provider may send them: NaN and Infinity are what Python's json reads
        body = json.dumps(answers[request.url.path.rsplit("/", 1)[-1]], allow_nan=True)
        return httpx.Response(200, content=body.encode())

    return EachlabsClient("https://api.test/v1", "m", transport=httpx.MockTransport(handler))


@pytest.mark.anyio
async def test_every_terminal_status_ends_a_job_and_cost_is_read() -> None:
    client = _client(
        {
            "f1": {"id": "f1", "status": "failed", "output": None, "logs": "NSFW content"},
            "f2": {
                "status": "failed",
                "output": {"error_code": "WORKER_LOST", "error_message": "lost"},
                "metrics": {"predict_time": 3.5, "cost": 0},
            },
            "s1": {
                "id": "s1",
                "status": "success",
                "output": "https://cdn.test/a.png",
                "metrics": {"predict_time": 9.7, "cost": 0.04},
            },
            "c1": {"status": "canceled"},
            "nan": {"status": "success", "output": [], "metrics": {"predict_time": math.nan}},
            "inf": {"status": "success", "output": [], "metrics": {"cost": math.inf}},
            "big": {"status": "processing", "metrics": {"predict_time": 10**400}},
        }
    )
    key = ApiKey("k")
    try:
        first = await client.get(key, "f1")
        assert (first.status, first.message, first.error_code) == ("error", "NSFW content", None)
        second = await client.get(key, "f2")
        assert (second.status, second.error_code, second.transient) == (
            "error",
            "WORKER_LOST",
            True,
        )
        assert second.cost_usd == 0
        done = await client.get(key, "s1")
        assert done.output_urls == ("https://cdn.test/a.png",) and done.cost_usd == 0.04
        assert (await client.get(key, "c1")).terminal
        # a reading that is no reading is not trusted: taken as not given
        assert (await client.get(key, "nan")).predict_time_s is None
        assert (await client.get(key, "inf")).cost_usd is None
        assert not (await client.get(key, "big")).terminal
    finally:
        await client.aclose()


def test_the_sandbox_speaks_the_reference_shape(sandbox: Start) -> None:
    sb = shrunk_sandbox(
        sandbox, api_shape="reference", price_per_image_usd=0.04, latency_spread=0, seed=1
    )
    headers = {"X-API-Key": KEY}
    with httpx.Client(base_url=sb.base_url, headers=headers, timeout=10) as c:
        body = {"prompt": "p", "img_url": "https://cdn.test/a.jpg", "n": 2}
        pid = c.post("/prediction/", json={"model": MODEL, "input": body}).json()["predictionID"]
        running = c.get(f"/prediction/{pid}").json()
        assert running["id"] == pid and running["input"] == body
        assert running["status"] in ("starting", "processing")
        assert running["urls"]["cancel"].endswith(f"/prediction/{pid}/cancel")
        until(lambda: c.get(f"/prediction/{pid}").json()["status"] == "success", 10)
        done = c.get(f"/prediction/{pid}").json()
        assert done["metrics"]["cost"] == pytest.approx(0.08) and len(done["output"]) == 2
        # a cancel of an ended job: 409 here; see the late_cancel test for the other answer
        assert c.post(f"/prediction/{pid}/cancel").status_code == 409
    ended = _ends(sb)[pid]
    assert (ended["status"], ended["cost_usd"]) == ("success", pytest.approx(0.08))


def test_a_late_cancel_is_answered_200_and_a_slow_one_can_lose_the_race(sandbox: Start) -> None:
    sb = shrunk_sandbox(
        sandbox, latency_mean_s=10, latency_spread=0, late_cancel=200, cancel_delay_s=20
    )
    headers = {"X-API-Key": KEY}
    with httpx.Client(base_url=sb.base_url, headers=headers, timeout=10) as c:
        body = {"model": MODEL, "input": {"prompt": "p", "img_url": "https://cdn.test/a.jpg"}}
        pid = c.post("/prediction/", json=body).json()["predictionID"]
        # answered as accepted, but the job's own end (10 s) comes before the cancel's (20 s)
        answer = c.post(f"/prediction/{pid}/cancel")
        assert answer.status_code == 200
        until(lambda: c.get(f"/prediction/{pid}").json()["status"] in ("success", "cancelled"), 10)
        assert c.get(f"/prediction/{pid}").json()["status"] == "success"
        assert c.post(f"/prediction/{pid}/cancel").status_code == 200  # too late, said as 200
    assert _ends(sb)[pid]["status"] == "success" and _ends(sb)[pid]["cost_usd"] == 0.03


# -- cancels: timeouts, a budget, a second signal ---------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(("late_cancel", "cancel_delay_s"), [(409, 0.0), (200, 0.0), (200, 4.0)])
async def test_jobs_ending_as_their_timeout_cancel_arrives_are_booked_as_they_ended(
    sandbox: Start, tmp_path: Path, late_cancel: int, cancel_delay_s: float
) -> None:
    # 40 s jobs (spread 0.3) against a 36 s timeout: many jobs end within moments of their
    # cancel; with a slow cancel (4 s), some end success after it was answered
    sb = shrunk_sandbox(
        sandbox, latency_mean_s=40, late_cancel=late_cancel, cancel_delay_s=cancel_delay_s, seed=7
    )
    manifest = write_manifest(tmp_path / "m.csv", catalog(30))
    config = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        polling={"job_timeout_s": 36, "expected_latency_s": 40},
    )
    summary = await go(config, [KEY, KEY2])
    rows = judge_books(sb, summary.run_dir, 30)
    assert_one_result_per_row(rows, 30)
    ends = _ends(sb)
    timed_out = [r for r in rows if r["error_type"] == "timeout"]
    assert timed_out, Counter((r["status"], r["error_type"]) for r in rows)
    assert summary.stats.timeouts >= len(timed_out)
    for row in timed_out:  # stopped by its cancel: the provider says so, and billed nothing
        assert ends[row["prediction_id"]]["status"] == "cancelled"
        assert row["cancel_accepted"] is True and row["cost_usd"] == 0
    succeeded = [r for r in rows if r["status"] == "succeeded"]
    assert len(succeeded) + len(timed_out) == 30
    assert summary.totals["cost_usd"] == pytest.approx(sum(e["cost_usd"] for e in ends.values()))
    assert summary.exit_code is ExitCode.ROWS_FAILED
    if cancel_delay_s:  # the cancel lost the race for some: they ended success, and say so
        assert any(r["cancel_accepted"] is False for r in succeeded)


@pytest.mark.anyio
async def test_a_job_still_running_after_its_cancel_is_left_unconfirmed_and_polled_again(
    sandbox: Start, tmp_path: Path
) -> None:
    # the provider takes 1,000 s to act on a cancel: every job ends as it would, billed
    sb = shrunk_sandbox(sandbox, latency_mean_s=40, latency_spread=0, cancel_delay_s=1000)
    manifest = write_manifest(tmp_path / "m.csv", catalog(4))
    sections: dict[str, Any] = {"api": {"time_scale": SCALE}}
    impatient = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        **sections,
        polling={"job_timeout_s": 5, "cancel_grace_s": 5, "expected_latency_s": 40},
    )
    first = await go(impatient, [KEY])
    assert first.exit_code is ExitCode.UNCONFIRMED
    assert first.counts == {"created": 4}
    assert "4 jobs created were not seen to end" in first.message
    assert first.cost is not None and first.cost.unconfirmed == 4
    assert first.possibly_billed_usd == pytest.approx(4 * 0.03)
    document = json.loads((first.run_dir / "summary.json").read_text())
    assert document["cost"]["unconfirmed_jobs"] == 4
    assert document["cost"]["possibly_billed_usd"] == pytest.approx(0.12)
    assert document["cost"]["confirmed_usd"] == 0
    rows = results(first)
    assert all(r["unconfirmed"] is True and r["cost_usd"] == 0 for r in rows)
    assert all(j["cancel_accepted"] == 1 for j in journal_rows(first.run_dir))

    # the next run polls them (never creates them again) and books what the provider billed
    patient = make_config(
        tmp_path, sb.base_url, manifest, **sections, polling={"expected_latency_s": 40}
    )
    second = await go(patient, [KEY])
    assert second.exit_code is ExitCode.OK, second.message
    assert sb.stats()["creates"] == 4
    rows = judge_books(sb, second.run_dir, 4)
    assert all(r["status"] == "succeeded" and r["cancel_accepted"] is False for r in rows)
    assert all(r["unconfirmed"] is False for r in rows)


@pytest.mark.anyio
async def test_a_budget_that_cancels_in_flight_books_the_jobs_that_won_the_race(
    sandbox: Start, tmp_path: Path
) -> None:
    # 12 s jobs (spread 0.5), and cancels that take 6 s to act: the shorter jobs end first,
    # billed, after their cancel was answered
    sb = shrunk_sandbox(
        sandbox, latency_mean_s=12, latency_spread=0.5, cancel_delay_s=6, late_cancel=200
    )
    manifest = write_manifest(tmp_path / "m.csv", catalog(20))
    config = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        budget={"max_cost_usd": 0.3, "cancel_in_flight": True},
    )
    summary = await go(config, [KEY])
    assert summary.exit_code is ExitCode.BUDGET
    rows = judge_books(sb, summary.run_dir, 20, finished=False)
    statuses = Counter((r["status"], r["error_type"]) for r in rows)
    assert sb.stats()["creates"] == 10
    assert statuses[("succeeded", None)] >= 1, statuses  # ended before the cancel took effect
    assert statuses[("failed", "cancelled")] >= 1, statuses
    cancelled = [r for r in rows if r["error_type"] == "cancelled"]
    assert all(r["cancel_accepted"] is True and r["cost_usd"] == 0 for r in cancelled)


def test_a_second_signal_books_each_cancelled_job_as_the_provider_ended_it(
    sandbox: Start, tmp_path: Path, pipelines: list[Pipeline]
) -> None:
    # 20 s jobs; a cancel takes 8 s to act and answers 200 even when the job had ended: some
    # jobs in flight at the second signal end success, billed, after their cancel was answered
    sb = sandbox(
        time_scale=SCALE,
        latency_mean_s=20,
        latency_spread=0.4,
        keys=(KEY, KEY2),
        cancel_delay_s=8,
        late_cancel=200,
        image_scale=0.05,
    )
    manifest = write_manifest(tmp_path / "m.csv", catalog(40))
    config = write_config(tmp_path, sb.base_url, manifest)
    run_dir = tmp_path / "run"
    p = Pipeline(config, "--grace", "60")
    pipelines.append(p)
    until(lambda: sb.stats()["creates"] >= 20 or not p.running(), 30)
    assert p.running()
    p.proc.send_signal(signal.SIGINT)
    until(lambda: '"stopping"' in (run_dir / "run.log").read_text(), 5)
    p.proc.send_signal(signal.SIGINT)
    code, output = p.wait(timeout=30)
    assert code == 3, output
    stopped = {r["row_number"]: r for r in journal_rows(run_dir)}
    asked = [r for r in stopped.values() if r["cancel_accepted"] is not None]
    assert asked, "jobs were in flight at the second signal"
    ends = _ends(sb)
    for row in asked:  # each booked as its poll saw it, or left journaled for the next run
        end = ends.get(row["prediction_id"])
        if row["status"] == "succeeded":
            assert end is not None and end["status"] == "success"
            assert row["cancel_accepted"] == 0 and row["cost_usd"] == end["cost_usd"]
        elif row["status"] == "failed":
            assert end is not None and end["status"] == "cancelled"
            assert row["cancel_accepted"] == 1 and row["cost_usd"] == 0
        else:
            assert row["status"] == "created"

    again = Pipeline(config)
    pipelines.append(again)
    code, output = again.wait(timeout=90)
    assert code in (0, 6), output
    rows = judge_books(sb, run_dir, 40)
    assert sb.stats()["creates"] <= 40 + sum(r["ambiguous_creates"] for r in rows)
    by_row = {r["row_number"]: r for r in rows}
    for row in asked:
        end = _ends(sb)[row["prediction_id"]]
        final = by_row[row["row_number"]]
        assert final["prediction_id"] == row["prediction_id"]  # never created again
        assert final["status"] == ("succeeded" if end["status"] == "success" else "failed")


# -- the reference's shapes, end to end ------------------------------------------------------


@pytest.mark.anyio
async def test_a_provider_speaking_the_reference_shape_with_its_own_price(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(
        sandbox,
        api_shape="reference",
        price_per_image_usd=0.04,
        faults=FaultRates(job_error=0.2),
        seed=5,
    )
    manifest = write_manifest(tmp_path / "m.csv", catalog(30, n=2))
    config = make_config(tmp_path, sb.base_url, manifest, api={"time_scale": SCALE})
    with structlog.testing.capture_logs() as logged:
        summary = await go(config, [KEY, KEY2])
    rows = judge_books(sb, summary.run_dir, 30)
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and all(r["error_type"] == "job_error" for r in failed)
    assert all(r["error_code"] == "PROVIDER_FAILED" for r in failed)
    assert summary.stats.timeouts == 0  # `failed` ends a job on its first terminal poll
    succeeded = [r for r in rows if r["status"] == "succeeded"]
    assert all(r["cost_usd"] == pytest.approx(0.08) for r in succeeded)
    assert all(r["priced_cost_usd"] == pytest.approx(0.06) for r in succeeded)
    assert all(r["provider_cost_usd"] == pytest.approx(0.08) for r in succeeded)
    assert summary.stats.cost_mismatches == len(succeeded)
    document = json.loads((summary.run_dir / "summary.json").read_text())
    assert document["cost"]["provider_price_mismatches"] == len(succeeded)
    assert document["cost"]["confirmed_usd"] == pytest.approx(0.08 * len(succeeded))
    assert document["cost"]["priced_usd"] == pytest.approx(0.06 * len(succeeded))
    assert document["cost"]["possibly_billed_usd"] == 0
    said = [e for e in logged if e["event"] == "provider_cost_differs"]
    assert len(said) == 1  # once a run, not once a job
    assert said[0]["provider_cost_usd"] == pytest.approx(0.08) and said[0]["priced_usd"] == 0.06


@pytest.mark.anyio
async def test_callbacks_in_the_reference_shape_signed_over_the_body_end_jobs(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox, api_shape="reference", allow_loopback_urls=True)
    manifest = write_manifest(tmp_path / "m.csv", catalog(20))
    config = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        polling={"expected_latency_s": 10},
        webhook={"enabled": True, "fallback_after_s": 20},
    )
    summary = await go(config, [KEY])
    assert summary.exit_code is ExitCode.OK, summary.message
    judge_books(sb, summary.run_dir, 20)
    callbacks = summary.stats.callbacks
    assert callbacks is not None
    assert callbacks.ends_by_callback == 20 and callbacks.bad_signatures == 0
    assert summary.stats.polls == 20  # one confirming poll per job
    assert sb.stats()["webhooks"]["delivered"] == 20


@pytest.mark.anyio
async def test_the_receiver_takes_both_signature_forms_and_refuses_a_wrong_one() -> None:
    callbacks = Callbacks(missed_limit=5)
    async with Receiver(WebhookSection(enabled=True), callbacks) as receiver:
        secret = receiver.secret.encode()
        body = json.dumps({"id": "p1", "status": "success"}).encode()
        digest = hmac.new(secret, body, hashlib.sha256).hexdigest()
        stamp = "1700000000"  # old: only the body-only form does not depend on it
        timed = hmac.new(secret, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        async with httpx.AsyncClient() as http:
            for signature in (digest, f"sha256={digest}", digest.upper()):
                answer = await http.post(
                    receiver.url, content=body, headers={"X-Webhook-Signature": signature}
                )
                assert answer.status_code == 200, signature
            old = {"X-Webhook-Signature": f"sha256={timed}", "X-Webhook-Timestamp": stamp}
            assert (await http.post(receiver.url, content=body, headers=old)).status_code == 401
            wrong = {"X-Webhook-Signature": hashlib.sha256(body).hexdigest()}
            assert (await http.post(receiver.url, content=body, headers=wrong)).status_code == 401
    assert callbacks.stats.received == 3 and callbacks.stats.bad_signatures == 2


# -- the books alone: the journal's cost and the run's verdict ---------------------------------


def _spec(n: int, images: int = 1) -> JobSpec:
    return JobSpec(
        f"j{n}", n, {"prompt": "p", "img_url": "https://a/b.jpg", "n": images}, {}, f"f{n}"
    )


def test_the_books_keep_the_providers_cost_apart_from_what_may_be_billed(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    journal.intake.ingest([_spec(n, images=2) for n in range(1, 6)], {})
    said = JobOutcome(Status.SUCCEEDED, "p1", ("u1", "u2"), finished_at=1.0, provider_cost_usd=0.1)
    ours = JobOutcome(Status.SUCCEEDED, "p2", ("u1", "u2"), finished_at=1.0)
    unknown = JobOutcome(
        Status.FAILED, "p3", error_type="not_found", finished_at=1.0, unconfirmed=True
    )
    journal.apply(
        [
            Finish(1, said, 0.03),
            Finish(2, ours, 0.03),
            Finish(3, unknown, 0.03),
            MarkCreated(4, "p4", "k", 1.0),  # still running when the run stopped
            NoteAmbiguous(5),
        ]
    )
    books = journal.reports.cost_books()
    assert books.confirmed_usd == pytest.approx(0.16)  # 0.10 stated + 0.06 priced
    assert books.provider_usd == pytest.approx(0.1) and books.priced_usd == pytest.approx(0.12)
    assert books.mismatched == 1
    # rows 3 and 4 may each have made 2 images, and row 5's lost create 2 more
    assert (books.unconfirmed, books.unconfirmed_images, books.ambiguous_images) == (2, 4, 2)
    assert books.possibly_billed_usd(0.03) == pytest.approx(0.18)

    # a cancel's answer noted after a poll saw the job end is judged by that end
    journal.apply([NoteCancel(1, True), NoteCancel(4, True)])
    rows = {r["row_number"]: r for r in journal_rows(tmp_path)}
    assert (rows[1]["cancel_accepted"], rows[4]["cancel_accepted"]) == (0, 1)
    journal.close()


def test_unconfirmed_jobs_decide_a_finished_runs_exit_code() -> None:
    from pipeline.runs.verdict import Books, Faults
    from pipeline.runs.verdict import verdict as run_verdict

    unsure = CostBooks(0.3, 0.0, 0.3, 0, 1, 2, 0)
    sure = CostBooks(0.3, 0.0, 0.3, 0, 0, 0, 0)
    failed = {"succeeded": 9, "failed": 1}
    stats = RunStats()

    def verdict(cost: CostBooks, stop: ExitCode, counts: dict[str, int]) -> tuple[ExitCode, str]:
        return run_verdict(
            (stop, "stopped"), Faults(), Books(cost=cost), counts, {}, [], stats, 0.03
        )

    assert verdict(sure, ExitCode.OK, failed)[0] is ExitCode.ROWS_FAILED
    code, message = verdict(unsure, ExitCode.OK, failed)
    assert code is ExitCode.UNCONFIRMED  # the money question before the failed rows
    assert "1 jobs created were not seen to end" in message and "$0.06" in message
    assert "1 failed" in message
    assert verdict(unsure, ExitCode.OK, {"succeeded": 10})[0] is ExitCode.UNCONFIRMED
    code, message = verdict(unsure, ExitCode.INTERRUPTED, failed)
    assert code is ExitCode.INTERRUPTED and "not seen to end" in message
