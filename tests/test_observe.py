"""Running it from cron with confidence: estimate, progress, summary.json, status, metrics, the
command line's overrides and errors, and the Python API."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pyarrow.parquet as pq
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import pipeline
from pipeline.core import BudgetReached, ExitCode, RowsFailed, parse_config
from pipeline.runs import estimate
from pipeline.sandbox import FaultRates, SandboxServer
from tests.conftest import (
    KEY,
    KEY2,
    SCALE,
    catalog,
    config_data,
    go,
    make_config,
    results,
    shrunk_sandbox,
    wait_for,
    write_manifest,
)
from tests.test_crash import Pipeline, write_config

Start = Callable[..., SandboxServer]


def _cli(*args: str, keys: str = KEY, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EACHLABS_API_KEYS": keys}
    env.pop("EACHLABS_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _mixed_rows() -> list[dict[str, Any]]:
    rows = catalog(14)
    rows[1]["prompt"] = ""  # rejected: no prompt
    rows[2]["size"] = "3K"  # rejected: no such size
    rows[3]["sku"] = "SKU-1"  # rejected: the id of row 1
    for row in rows[4:7]:  # the same seeded input three times: sent once
        row.update(prompt="same", img_url="https://cdn.example.com/same.jpg", seed="5")
    rows[8]["n"] = "3"
    return rows


@pytest.mark.anyio
async def test_estimate_sends_nothing_and_matches_the_run(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2)
    state = {"enabled": True, "state": str(tmp_path / "state.sqlite")}
    earlier = write_manifest(tmp_path / "earlier.csv", catalog(14)[10:])  # rows 11-14 done
    first = make_config(
        tmp_path,
        sb.base_url,
        earlier,
        api={"time_scale": SCALE},
        output={"dir": str(tmp_path / "monday")},
        incremental=state,
    )
    assert (await go(first, [KEY])).exit_code is ExitCode.OK
    creates = sb.stats()["creates"]

    manifest = write_manifest(tmp_path / "m.csv", _mixed_rows())
    config = make_config(
        tmp_path, sb.base_url, manifest, api={"time_scale": SCALE}, incremental=state
    )
    found = estimate(config, keys=1)
    assert sb.stats()["creates"] == creates  # nothing was sent
    assert not config.output.dir.exists()  # nor anything written
    assert (found.rows, found.rejected, found.reused, found.shared) == (14, 3, 4, 2)
    assert found.rejected_by_rule["prompt (column 'prompt'): is required"] == 1
    assert found.to_send == 5 and found.images == 7

    summary = await go(config, [KEY])
    out = results(summary)
    assert sb.stats()["creates"] - creates == found.to_send
    assert sum(r["status"] == "rejected" for r in out) == found.rejected
    assert summary.totals["cost_usd"] == pytest.approx(found.cost_usd)
    # and the images the reused and shared rows carry over, one each
    assert summary.totals["images"] == found.images + found.reused + found.shared
    assert found.duration_s > 0 and found.latency_s == 2  # polling.expected_latency_s


def test_dry_run_is_estimate(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2)
    manifest = write_manifest(tmp_path / "m.csv", _mixed_rows())
    config = write_config(tmp_path, sb.base_url, manifest)
    done = _cli("run", str(config), "--dry-run")
    assert done.returncode == 0, done.stderr
    said = dict(line.split(None, 1) for line in done.stdout.splitlines() if line[:1] != " ")
    assert said["rows"].strip() == "14" and said["rejected"].strip() == "3"
    assert "to send" in done.stdout and "expected duration" in done.stdout
    assert sb.stats()["creates"] == 0 and not (tmp_path / "run").exists()


def test_estimate_exit_codes_say_over_budget_and_nothing_to_send(tmp_path: Path) -> None:
    """`estimate` exits 5 over budget.max_cost_usd and 6 when no row is valid, and says when
    rows repeat an input without a seed (each is paid); nothing is sent in any case."""
    same = {"prompt": "white background", "img_url": "https://cdn.test/a.jpg"}

    def estimated(rows: list[dict[str, Any]], **sections: Any) -> subprocess.CompletedProcess[str]:
        manifest = write_manifest(tmp_path / "m.csv", rows)
        path = tmp_path / "estimate.yaml"
        data = config_data(tmp_path, "https://api.test/v1", manifest, **sections)
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return _cli("estimate", str(path))

    over = estimated(catalog(10), budget={"max_cost_usd": 0.1})  # $0.30 to send
    assert over.returncode == 5, over.stderr
    assert "over budget.max_cost_usd (0.1)" in over.stderr
    nothing = estimated([{**row, "prompt": ""} for row in catalog(3)])
    assert nothing.returncode == 6 and "no valid row" in nothing.stderr
    repeated = estimated([{"sku": f"r{i}", **same} for i in range(4)])
    assert repeated.returncode == 0, repeated.stderr
    assert "3 row(s) repeat an earlier row's input without a seed" in repeated.stderr


def test_progress_lines_when_piped(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=10)
    manifest = write_manifest(tmp_path / "m.csv", catalog(60))
    config = write_config(tmp_path, sb.base_url, manifest)
    done = _cli("--log-level", "debug", "run", str(config), "--set", "progress.interval_s=0.3")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("wanbatch: ")]
    assert lines[0].startswith("wanbatch: run started in ")
    progress = [line for line in lines if line.startswith("wanbatch: progress rows=")]
    assert progress and "succeeded=" in progress[-1] and "eta=" in progress[-1]
    assert lines[-1].startswith("wanbatch: run finished (exit 0): 60 rows, 60 succeeded")
    events = [json.loads(line) for line in (tmp_path / "run" / "run.log").read_text().splitlines()]
    names = [e["event"] for e in events]
    assert names[0] == "run_started" and "progress" in names and "run_finished" in names
    ended = [e for e in events if e["event"] == "job_ended"]
    assert ended and all(e["job_id"] and e["prediction_id"] for e in ended)
    assert KEY not in (tmp_path / "run" / "run.log").read_text()


def test_live_display_on_a_terminal(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=10)
    manifest = write_manifest(tmp_path / "m.csv", catalog(40))
    config = write_config(tmp_path, sb.base_url, manifest)
    leader, follower = pty.openpty()
    env = {**os.environ, "EACHLABS_API_KEYS": KEY, "COLUMNS": "120", "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(config)],
        env=env,
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    shown = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # bounded: the run takes about 2 s
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    os.close(leader)
    assert proc.wait(timeout=30) == 0
    text = shown.decode(errors="replace")
    assert "\x1b[" in text  # drawn in place with the terminal's control sequences
    assert "in flight" in text and "ETA" in text and "key-" in text
    assert "run finished (exit 0)" in text


@pytest.mark.anyio
async def test_summary_json_agrees_with_results(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2, faults=FaultRates(job_error=0.2))
    manifest = write_manifest(tmp_path / "m.csv", _mixed_rows())
    config = make_config(tmp_path, sb.base_url, manifest, api={"time_scale": SCALE})
    summary = await go(config, [KEY])
    doc = json.loads((config.output.dir / "summary.json").read_text())
    table = pq.read_table(summary.results_path).to_pylist()
    assert doc["exit_code"] == int(summary.exit_code) == 6
    assert doc["rows"] == len(table) == 14
    for status in ("succeeded", "failed", "rejected"):
        assert doc["by_status"].get(status, 0) == sum(r["status"] == status for r in table)
    types: dict[str, int] = {}
    for r in table:
        if r["error_type"]:
            types[r["error_type"]] = types.get(r["error_type"], 0) + 1
    assert doc["by_error_type"] == types
    assert doc["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in table))
    assert doc["cost_usd"] == pytest.approx(sb.stats()["cost_usd"])
    assert doc["images"] == sum(r["images"] for r in table)
    assert doc["creates"] == sb.stats()["creates"] and doc["429s"] == 0
    assert doc["latency_s"]["p50"] is not None and doc["notice_delay_s"]["p95"] is not None
    assert doc["throughput"]["efficiency"] > 0 and doc["config_hash"]
    assert doc["versions"]["wanbatch"] == pipeline.__version__
    assert doc["started_at"] <= doc["ended_at"]


def test_status_of_a_running_then_a_killed_folder(
    sandbox: Start, tmp_path: Path, pipelines: list[Pipeline]
) -> None:
    sb = sandbox(time_scale=1.0, latency_mean_s=30, latency_spread=0)  # jobs outlast the test
    manifest = write_manifest(tmp_path / "m.csv", catalog(30))
    config = write_config(tmp_path, sb.base_url, manifest)
    run = Pipeline(config, keys=KEY)
    pipelines.append(run)
    run_dir = tmp_path / "run"
    assert wait_for(lambda: sb.stats()["creates"] >= 5, 30, run.running)
    said = _cli("status", str(run_dir), keys=KEY2)  # another machine, other keys
    assert said.returncode == 0, said.stderr
    assert (
        f"running now             yes, by pid {run.proc.pid}".split()
        == said.stdout.splitlines()[1].split()[
            : len(f"running now yes, by pid {run.proc.pid}".split())
        ]
    )
    assert "running (its jobs are being driven now)" in said.stdout
    assert "waiting on keys" not in said.stdout  # the run holding the folder polls its jobs
    assert sb.stats()["creates"] >= 5
    run.kill()  # the jobs in flight now wait on the key that created them

    other = _cli("status", str(run_dir), keys=KEY2)
    assert "running now            no" in other.stdout
    assert "stopped, unfinished (run the same command to resume)" in other.stdout
    assert "waiting on keys" in other.stdout and "not given" in other.stdout
    same = _cli("status", str(run_dir), keys=KEY)
    assert "waiting on keys" not in same.stdout
    missing = _cli("status", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "holds no run" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.anyio
async def test_metrics_while_running_and_at_the_end(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=10)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    manifest = write_manifest(tmp_path / "m.csv", catalog(80))
    config = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        metrics={"port": port, "interval_s": 0.1},
    )
    scraped: list[str] = []
    async with anyio.create_task_group() as tg:
        done = anyio.Event()

        async def run() -> None:
            await go(config, [KEY])
            done.set()

        tg.start_soon(run)
        async with httpx.AsyncClient() as http:
            for _ in range(400):  # bounded: the run takes about 3 s
                if done.is_set():
                    break
                with contextlib.suppress(httpx.TransportError):
                    scraped.append((await http.get(f"http://127.0.0.1:{port}/metrics")).text)
                await anyio.sleep(0.05)
    assert any("wanbatch_in_flight_jobs{key=" in text for text in scraped)
    assert (config.output.dir / "metrics.prom").is_file()
    families = {
        f.name: f
        for f in text_string_to_metric_families((config.output.dir / "metrics.prom").read_text())
    }
    rows = {s.labels["status"]: s.value for s in families["wanbatch_rows"].samples}
    assert rows["succeeded"] == 80 and rows["pending"] == 0
    latency = families["wanbatch_job_latency_seconds"].samples
    count = next(s.value for s in latency if s.name.endswith("_count"))
    assert count == 80
    creates = families["wanbatch_creates"].samples[0].value
    assert creates == sb.stats()["creates"]
    assert families["wanbatch_cost_usd"].samples[0].value == pytest.approx(sb.stats()["cost_usd"])


def test_overrides_and_errors_on_the_command_line(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2)
    manifest = write_manifest(tmp_path / "m.csv", catalog(3))
    data = config_data(tmp_path, sb.base_url, manifest, api={"time_scale": SCALE})
    data["output"]["dir"] = "nightly/%Y-%m-%d"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    here = tmp_path / "here"
    here.mkdir()

    done = _cli("run", str(config), "--run-date", "2026-11-24", cwd=here)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "nightly" / "2026-11-24" / "results.parquet").is_file()
    moved = _cli(
        "run", str(config), "--output-dir", "elsewhere", "--set", "manifest.id_column=sku", cwd=here
    )
    assert moved.returncode == 0, moved.stderr
    assert (here / "elsewhere" / "summary.json").is_file()  # taken from the working folder
    again = _cli("retry", str(here / "elsewhere"), "--errors", "all")
    assert again.returncode == 0, again.stderr
    assert str(here / "elsewhere") in again.stdout
    assert sb.stats()["creates"] == 6  # the retry had nothing to do
    finished = _cli("status", str(here / "elsewhere"))
    assert finished.returncode == 0, finished.stderr
    assert "running now            no" in finished.stdout
    assert "state                  finished" in finished.stdout and "$0.09" in finished.stdout

    bad = _cli("run", str(config), "--set", "limits.max_concurrent=zero")
    assert bad.returncode == 2 and "limits.max_concurrent" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.splitlines()) <= 3
    nodate = _cli("run", str(config), "--run-date", "yesterday")
    assert nodate.returncode == 2 and "--run-date 'yesterday' is not a date" in nodate.stderr
    debug = _cli("--debug", "run", str(tmp_path / "missing.yaml"))
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert "cannot read config" in debug.stderr
    version = _cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"wanbatch {pipeline.__version__}"


def test_python_api(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2)
    good = write_manifest(tmp_path / "good.csv", catalog(4))
    data = config_data(tmp_path, sb.base_url, good, api={"time_scale": SCALE})
    summary = pipeline.run(data, keys=[KEY])
    assert summary.exit_code is ExitCode.OK and summary.counts == {"succeeded": 4}
    assert summary.results_path.is_file()

    mixed = write_manifest(tmp_path / "mixed.csv", _mixed_rows())
    data = config_data(
        tmp_path, sb.base_url, mixed, api={"time_scale": SCALE}, output={"dir": str(tmp_path / "b")}
    )
    with pytest.raises(RowsFailed) as caught:
        pipeline.run(data, keys=[KEY])
    assert caught.value.summary.counts["rejected"] == 3
    kept = pipeline.run(data, keys=[KEY], raise_on_failed_rows=False)
    assert kept.exit_code is ExitCode.ROWS_FAILED

    costly = config_data(
        tmp_path, sb.base_url, good, api={"time_scale": SCALE}, output={"dir": str(tmp_path / "c")}
    )
    with pytest.raises(BudgetReached) as budget:
        pipeline.run(costly, keys=[KEY], overrides=["budget.max_cost_usd=0.05"])
    assert budget.value.summary.counts.get("succeeded", 0) == 1
    data = config_data(tmp_path, sb.base_url, good)
    loaded = pipeline.load(data, overrides=["limits.window_s=30"])
    assert loaded.limits.window_s == 30
    assert parse_config(data, tmp_path).limits.window_s == 60  # the mapping itself unchanged

    # from a plain Python process, as an orchestrator's task runs it
    plain = tmp_path / "plain.yaml"
    data = config_data(
        tmp_path, sb.base_url, good, api={"time_scale": SCALE}, output={"dir": str(tmp_path / "p")}
    )
    plain.write_text(yaml.safe_dump(data))
    script = f"import pipeline; s = pipeline.run({str(plain)!r}); print(s.exit_code.name, s.counts)"
    env = {**os.environ, "EACHLABS_API_KEY": KEY}
    env.pop("EACHLABS_API_KEYS", None)
    ran = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "OK {'succeeded': 4}"
