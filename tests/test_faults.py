"""The books close whatever fails (issue 23): answers that cannot be read, a crash, a full run
folder, a download that trickles, lost creates against a budget, --force with duplicates, two
runs on one state store, a step of the wall clock, a store that cannot be written, images
deleted between runs, and settings that are not finite or not sane.

The sandbox's ledger is the judge; where the sandbox cannot misbehave so, the test breaks a
part of the run itself (a bug in a poll, a full disk) and looks at what the run left behind.
"""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from pipeline import api
from pipeline.core import ConfigError, ExitCode, RunEnded, parse_config
from pipeline.journal import StateStore
from pipeline.outputs import RunSummary
from pipeline.provider import EachlabsClient
from pipeline.sandbox import FaultRates, SandboxServer
from tests.conftest import (
    KEY,
    PRICE,
    SCALE,
    catalog,
    config_data,
    go,
    journal_rows,
    judge_against_ledger,
    ledger_cost,
    make_config,
    results,
    shrunk_sandbox,
    until,
    write_manifest,
)
from tests.test_crash import Pipeline, write_config

Start = Callable[..., SandboxServer]


async def _arun(config: Any, **kwargs: Any) -> RunSummary:
    """A run as `pipeline.run` makes it (run.log in the run folder), ended or not."""
    try:
        return await api.arun(config, keys=[KEY], raise_on_failed_rows=False, **kwargs)
    except RunEnded as ended:
        summary: RunSummary = ended.summary
        return summary


# -- answers that cannot be read --------------------------------------------------------------


@pytest.mark.anyio
async def test_undecodable_answers_and_nonsense_readings_are_retried_polls(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox, faults=FaultRates(garbled_poll=0.2, nonsense_metrics=0.3), seed=2)
    manifest = write_manifest(tmp_path / "m.csv", catalog(40))
    config = make_config(tmp_path, sb.base_url, manifest, api={"time_scale": SCALE})
    summary = await go(config, [KEY])
    assert summary.exit_code is ExitCode.OK, summary.message
    judge_against_ledger(sb, summary.run_dir, 40)
    rows = results(summary)
    # a NaN, infinite or absurd predict time is no reading: taken as not given
    assert any(r["predict_time_s"] is None for r in rows)
    assert all(r["predict_time_s"] is None or r["predict_time_s"] < 1000 for r in rows)


# -- a crash: no secret in any file, and a closing line that is true ---------------------------


def _secrets_in(folder: Path, secrets: list[str]) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path.name}: {s[:6]}..." for s in secrets if s.encode() in data]
    return found


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["poll", "create", "webhook"])
async def test_a_crash_leaves_no_secret_in_the_run_folder_and_says_what_is_left(
    sandbox: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    sb = shrunk_sandbox(sandbox, allow_loopback_urls=True)
    manifest = write_manifest(tmp_path / "m.csv", catalog(12))
    sections: dict[str, Any] = {"api": {"time_scale": SCALE}}
    if where == "webhook":
        sections["webhook"] = {"enabled": True}
    config = make_config(tmp_path, sb.base_url, manifest, **sections)
    read = EachlabsClient._read
    broken = "create" if where == "create" else "poll"

    def buggy(response: Any, what: str, creating: bool, whole: bool = False) -> Any:
        if what == broken and sb.stats()["creates"] >= 3:
            raise RuntimeError("a bug in reading an answer")
        return read(response, what, creating, whole)

    monkeypatch.setattr(EachlabsClient, "_read", staticmethod(buggy))
    summary = await _arun(config)
    assert summary.exit_code is ExitCode.ERROR
    assert "RuntimeError: a bug in reading an answer" in summary.message
    left = sum(r["status"] in ("created", "creating") for r in journal_rows(summary.run_dir))
    if left:  # the closing line says what is true about the jobs left
        assert "were seen to their end" not in summary.message
        assert "not seen to end" in summary.message
    log = (summary.run_dir / "run.log").read_text()
    assert "a bug in reading an answer" in log and '"exception"' in log  # the traceback is kept
    secrets = [KEY]
    for job in list(sb.state.jobs.values()):
        secrets += [s for s in (job.webhook_secret, job.webhook_url) if s]
    assert _secrets_in(summary.run_dir, secrets) == []


# -- a full run folder --------------------------------------------------------------------------


def _fill(path: Path) -> None:
    try:
        with path.open("wb") as out:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
    except OSError:
        pass


@pytest.mark.anyio
async def test_a_full_run_folder_ends_with_its_books_as_far_as_the_disk_allows(
    sandbox: Start, tmp_path: Path, small_disk: Path
) -> None:
    # run.log, the journal and the results share the small disk: the logger meets it too
    sb = shrunk_sandbox(sandbox, latency_mean_s=10)
    manifest = write_manifest(tmp_path / "m.csv", catalog(80))
    config = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        manifest={"batch_rows": 20},
        output={"dir": str(small_disk / "run")},
        assets={"store": str(tmp_path / "images")},
    )

    async def fill_once_paid() -> None:
        while sb.stats()["creates"] < 5:  # noqa: ASYNC110 - the ledger has no event to wait on
            await anyio.sleep(0.01)
        await anyio.to_thread.run_sync(_fill, small_disk / "filler")

    out: list[RunSummary] = []

    async def run() -> None:
        out.append(await _arun(config))

    async with anyio.create_task_group() as tg:
        tg.start_soon(fill_once_paid)
        tg.start_soon(run)
    first = out[0]
    assert first.exit_code is ExitCode.ERROR
    assert "internal error" not in first.message
    assert "run the same command again" in first.message
    (small_disk / "filler").unlink()
    again = await _arun(config)
    assert again.exit_code is ExitCode.OK, again.message
    judge_against_ledger(sb, small_disk / "run", 80)


# -- a download that trickles -----------------------------------------------------------------


def test_a_trickling_download_has_a_deadline_and_signals_end_the_wait(
    sandbox: Start, tmp_path: Path, pipelines: list[Pipeline]
) -> None:
    # every output is served a byte every 2 s: a read never times out, the download never ends
    sb = shrunk_sandbox(
        sandbox, keys=(KEY,), faults=FaultRates(trickle_output=1.0, slow_s=40), latency_spread=0
    )
    manifest = write_manifest(tmp_path / "m.csv", catalog(4))
    config = write_config(tmp_path, sb.base_url, manifest)
    data = yaml.safe_load(config.read_text())
    data["assets"] = {"download_timeout_s": 1, "input_thumbnails": False}
    config.write_text(yaml.safe_dump(data))

    bounded = Pipeline(config, keys=KEY)
    pipelines.append(bounded)
    code, output = bounded.wait(timeout=60)
    assert code == 6, output  # finished, images missing: the same command fetches them
    assert "could not be downloaded" in output
    rows = journal_rows(tmp_path / "run")
    assert all(r["status"] == "succeeded" for r in rows)
    assert not list((tmp_path / "run" / "images").glob(".*.tmp"))

    # with a patient deadline, a first signal gives the downloads the grace, then ends them
    data["assets"]["download_timeout_s"] = 3600
    data["output"]["dir"] = str(tmp_path / "run2")
    config.write_text(yaml.safe_dump(data))
    patient = Pipeline(config, "--grace", "1", keys=KEY)
    pipelines.append(patient)

    def all_succeeded() -> bool:
        try:  # the journal's file may be there a moment before its tables
            statuses = [r["status"] for r in journal_rows(tmp_path / "run2")]
        except sqlite3.Error:
            return False
        return statuses == ["succeeded"] * 4

    until(all_succeeded, 30)
    patient.proc.send_signal(signal.SIGTERM)
    code, output = patient.wait(timeout=30)  # a trickled image takes hours: the grace ended it
    assert code == 3, output
    with sqlite3.connect(tmp_path / "run2" / "journal.sqlite") as db:
        states = [r[0] for r in db.execute("SELECT state FROM images")]
    assert states and "stored" not in states  # left for the same command to fetch


# -- a budget with lost creates ------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_budget_holds_when_creates_are_lost_and_when_the_run_is_resumed(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox, faults=FaultRates(lost_create=0.3), seed=4)
    manifest = write_manifest(tmp_path / "m.csv", catalog(40))
    config = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        budget={"max_cost_usd": 0.6},  # 20 images
        retries={"max_attempts": 8, "backoff_initial_s": 0.2, "backoff_max_s": 1},
    )
    first = await go(config, [KEY])
    assert first.exit_code is ExitCode.BUDGET
    assert ledger_cost(sb) <= 0.6 + 1e-9
    lost = sum(k["lost_answers"] for k in sb.stats()["keys"].values())
    assert lost > 0, "the run must meet lost creates"
    again = await go(config, [KEY])  # a resume counts its lost creates as spent
    assert again.exit_code is ExitCode.BUDGET
    assert ledger_cost(sb) <= 0.6 + 1e-9
    assert sb.stats()["creates"] * PRICE <= 0.6 + 1e-9  # not one create could pass it


# -- --force with duplicates, and two runs on one state store ------------------------------


@pytest.mark.anyio
async def test_force_keeps_rows_with_one_seeded_input_on_one_job(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox)
    rows = catalog(4) + [
        {"sku": f"DUP-{i}", "prompt": "same", "img_url": "https://cdn.example.com/same.jpg"}
        for i in range(6)
    ]
    for row in rows:
        row["seed"] = 7
    manifest = write_manifest(tmp_path / "m.csv", rows)
    held = make_config(
        tmp_path, sb.base_url, manifest, api={"time_scale": SCALE}, budget={"max_cost_usd": 0}
    )
    first = await go(held, [KEY])
    assert first.exit_code is ExitCode.BUDGET and sb.stats()["creates"] == 0
    rows.append({"sku": "NEW-1", "prompt": "new", "img_url": "https://cdn.example.com/n.jpg"})
    write_manifest(tmp_path / "m.csv", rows)
    config = make_config(tmp_path, sb.base_url, manifest, api={"time_scale": SCALE})
    forced = await go(config, [KEY], force=True)
    assert forced.exit_code is ExitCode.OK, forced.message
    assert sb.stats()["creates"] == 6  # 4 + 1 for the six rows that share one input + 1 new
    assert sb.stats()["duplicate_creates"] == 0
    out = results(forced)
    shared = [r for r in out if r["sku"].startswith("DUP-")]
    assert len({r["prediction_id"] for r in shared}) == 1
    assert sum(r["reused"] for r in shared) == 5
    assert sum(r["cost_usd"] for r in out) == pytest.approx(ledger_cost(sb))


@pytest.mark.anyio
async def test_a_second_run_on_a_held_state_store_is_refused_before_it_pays(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox)
    state = tmp_path / "state.sqlite"
    config = make_config(
        tmp_path,
        sb.base_url,
        write_manifest(tmp_path / "m.csv", catalog(5)),
        api={"time_scale": SCALE},
        incremental={"enabled": True, "state": str(state)},
    )
    other = StateStore(state, hold=True)  # another catalog's run, holding the store now
    try:
        with pytest.raises(ConfigError, match=r"in use by another run \(pid"):
            await go(config, [KEY])
        assert sb.ledger() == []
    finally:
        other.close()
    summary = await go(config, [KEY])  # once it is let go, the run goes ahead
    assert summary.exit_code is ExitCode.OK and sb.stats()["creates"] == 5


# -- a step of the wall clock ------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_wall_clock_step_moves_no_deadline(
    sandbox: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a step back (which stalled polls on the old wall-clock schedule) shows only in time
    # taken, which tests do not assert; a step forward cancelled every job in flight
    step_s = 60.0
    sb = shrunk_sandbox(sandbox, latency_mean_s=10, latency_spread=0.1)
    manifest = write_manifest(tmp_path / "m.csv", catalog(30))
    # 10 s jobs against a 30 s timeout: only a clock step could make them time out
    config = make_config(
        tmp_path, sb.base_url, manifest, api={"time_scale": SCALE}, polling={"job_timeout_s": 30}
    )
    real = time.time

    async def step_once_in_flight() -> None:
        while sb.stats()["creates"] < 5:  # noqa: ASYNC110 - the ledger has no event to wait on
            await anyio.sleep(0.01)
        monkeypatch.setattr(time, "time", lambda: real() + step_s)

    out: list[RunSummary] = []

    async def run() -> None:
        out.append(await go(config, [KEY]))

    async with anyio.create_task_group() as tg:
        tg.start_soon(step_once_in_flight)
        tg.start_soon(run)
    summary = out[0]
    assert summary.exit_code is ExitCode.OK, summary.message
    assert summary.stats.timeouts == 0 and summary.stats.cancels == 0
    judge_against_ledger(sb, summary.run_dir, 30)


# -- stores --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_store_that_cannot_be_written_is_refused_before_any_create(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox)
    manifest = write_manifest(tmp_path / "m.csv", catalog(3))
    config = make_config(
        tmp_path, sb.base_url, manifest, api={"time_scale": SCALE}, assets={"store": "/proc/self"}
    )
    with pytest.raises(ConfigError, match=r"assets\.store /proc/self cannot be used"):
        await go(config, [KEY])
    assert sb.ledger() == []


@pytest.mark.anyio
async def test_images_deleted_between_runs_are_fetched_again_not_counted(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox)
    manifest = write_manifest(tmp_path / "m.csv", catalog(6))
    config = make_config(tmp_path, sb.base_url, manifest, api={"time_scale": SCALE})
    first = await go(config, [KEY])
    assert first.exit_code is ExitCode.OK
    shutil.rmtree(first.run_dir / "images")
    again = await go(config, [KEY])
    assert again.exit_code is ExitCode.OK, again.message
    assert sb.stats()["creates"] == 6  # nothing created again
    assert again.stats.downloads is not None and again.stats.downloads.stored == 6
    for row in results(again):
        assert all((again.run_dir / p).is_file() for p in row["output_paths"])
    assert not list((again.run_dir / "images").glob(".*"))  # no temporary or probe file left


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("api", "time_scale", ".inf"),
        ("limits", "window_s", ".inf"),
        ("polling", "expected_latency_s", "1e-300"),
        ("limits", "max_concurrent", "100000000"),
        ("api", "price_per_image_usd", ".inf"),
        ("budget", "max_cost_usd", ".nan"),
    ],
)
def test_settings_that_are_not_finite_or_not_sane_are_refused(
    tmp_path: Path, section: str, key: str, value: str
) -> None:
    data = config_data(tmp_path, "sandbox", write_manifest(tmp_path / "m.csv", catalog(1)))
    data.setdefault(section, {})[key] = yaml.safe_load(value)
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        parse_config(data, tmp_path)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_a_malformed_storage_endpoint_is_one_line_before_any_request(tmp_path: Path) -> None:
    import os

    manifest = write_manifest(tmp_path / "m.csv", catalog(1))
    data = config_data(tmp_path, "sandbox", manifest, assets={"store": "s3://bucket/images"})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://[::1", "RUST_BACKTRACE": "1"}
    done = _cli("run", str(path), env=env)
    assert done.returncode == 2, done.stderr
    said = done.stderr.strip().splitlines()
    assert len(said) == 1 and "AWS_ENDPOINT_URL" in said[0], said
    assert "panicked" not in done.stderr and "Traceback" not in done.stderr


def test_report_on_a_corrupt_journal_is_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "journal.sqlite").write_bytes(b"SQLite format 3\0" + b"\xff" * 4000)
    done = _cli("report", str(run))
    assert done.returncode == 2, done.stderr
    assert "cannot be read" in done.stderr and "internal error" not in done.stderr
