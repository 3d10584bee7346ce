"""Shared fixtures: the sandbox as a real server on loopback, configs and manifests."""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, settings
from playwright.async_api import Browser, async_playwright

from pipeline.core import ApiKey, RunConfig, parse_config
from pipeline.core.schema import MODEL, fingerprint
from pipeline.outputs import RunSummary
from pipeline.runs import configure_logging, run
from pipeline.sandbox import FaultRates, SandboxServer, SandboxSettings, open_embedded
from pipeline.sandbox.state import ORG_MATE

# Hypothesis: CI runs a bounded, repeatable search; a developer's run searches more widely
settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=150, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

KEY = "test-key-1"
KEY2 = "test-key-2"

# files whose tests share one worker of the suite (pytest-xdist): test_ray.py's one Ray cluster
# for the session. xdist's own `loadgroup` reads an `xdist_group` mark through the test ids,
# which pytest 9.2 no longer lets it change (pytest-dev/pytest-xdist#1386), so the group is
# said here, by file; as the largest unit of work, it is handed out first
ONE_WORKER = {"tests/test_ray.py": "ray"}


@pytest.hookimpl(optionalhook=True)  # xdist's hook: pytest without xdist runs the file alone
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup`: every test on its own, but each file of ONE_WORKER's on one worker."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Groups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return ONE_WORKER.get(nodeid.split("::", 1)[0], nodeid)

    return Groups(config, log)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def sandbox() -> Iterator[Callable[..., SandboxServer]]:
    """Start sandboxes with given settings; all are stopped at the end of the test."""
    started: list[SandboxServer] = []

    def start(tls: Path | None = None, **kwargs: Any) -> SandboxServer:
        kwargs.setdefault("keys", (KEY, KEY2))
        kwargs.setdefault("image_scale", 0.05)
        server = SandboxServer(SandboxSettings(**kwargs), tls=tls)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def wait_for(
    check: Callable[[], bool], timeout: float, still: Callable[[], bool] = lambda: True
) -> bool:
    """Poll `check` (a server's stats, a file, a process: what has no event to wait on) until
    it holds (True), or `still` stops holding or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and still():
        if check():
            return True
        time.sleep(0.005)
    return False


def until(check: Callable[[], bool], timeout: float) -> None:
    """`wait_for` that fails the test when `check` does not come to hold within `timeout`."""
    assert wait_for(check, timeout), f"not seen within {timeout} s"


def write_manifest(path: Path, rows: list[dict[str, Any]]) -> Path:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def catalog(count: int, **extra: Any) -> list[dict[str, Any]]:
    return [
        {
            "sku": f"SKU-{i}",
            "prompt": f"edit number {i}",
            "img_url": f"https://cdn.example.com/p/{i}.jpg",
            **extra,
        }
        for i in range(1, count + 1)
    ]


def config_data(
    tmp_path: Path, base_url: str, manifest_path: Path, **sections: Any
) -> dict[str, Any]:
    """A config document for a fast run against a sandbox at `base_url`; `sections` override.
    The listing is read (and a job polled) at most every 2 provider seconds, not the default
    0.1: the suite's jobs are short and few are in flight, and at SCALE 2 s is 0.1 s of real
    time. At the default, 60 jobs of 2 s, 4 in flight at most, read 374 pages of it; at 0.5 the
    SIGKILL test still read 1,421 pages for 107 creates (979 at 2), the Ray worker-death test
    1,773 (661 at 2). test_listing reads it at the default."""
    data: dict[str, Any] = {
        "api": {"base_url": base_url},
        "limits": {"creates_per_window": 100, "window_s": 60, "max_concurrent": 10},
        "polling": {"job_timeout_s": 120, "expected_latency_s": 2, "min_interval_s": 2},
        "retries": {"max_attempts": 5, "backoff_initial_s": 0.5, "backoff_max_s": 4},
        "manifest": {"path": str(manifest_path), "id_column": "sku"},
        "output": {"dir": str(tmp_path / "run")},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def make_config(tmp_path: Path, base_url: str, manifest_path: Path, **sections: Any) -> RunConfig:
    """A config for a fast run against a sandbox at `base_url` with the given time scale."""
    return parse_config(config_data(tmp_path, base_url, manifest_path, **sections), tmp_path)


# 60 s window and 10 s jobs, shrunk 20x: a 3 s window and 0.5 s jobs
SCALE = 0.05


def shrunk_sandbox(sandbox: Callable[..., SandboxServer], **kwargs: Any) -> SandboxServer:
    kwargs.setdefault("time_scale", SCALE)
    kwargs.setdefault("creates_per_window", 100)
    kwargs.setdefault("window_s", 60)
    kwargs.setdefault("max_concurrent", 10)
    kwargs.setdefault("latency_mean_s", 10)
    return sandbox(**kwargs)


def throttled_run(
    sandbox: Callable[..., SandboxServer], tmp_path: Path, keys: list[str], throttled: str
) -> tuple[SandboxServer, RunConfig]:
    """A sandbox of `keys` where every create on `throttled` meets a 429 storm that outlasts
    the run (its Retry-After clamped to 2 provider seconds, so the key is tried again and
    again), and a config of 80 rows against it."""
    sb = shrunk_sandbox(
        sandbox,
        keys=tuple(keys),
        latency_mean_s=2,
        key_faults={throttled: FaultRates(storm_429=1.0, storm_s=100_000)},
    )
    manifest = write_manifest(tmp_path / "m.csv", catalog(80))
    config = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        retries={"retry_after_max_s": 2},
    )
    return sb, config


async def go(config: Any, keys: list[str], **kwargs: Any) -> RunSummary:
    kwargs.setdefault("embedded", open_embedded)
    return await run(config, [ApiKey(k) for k in keys], handle_signals=False, **kwargs)


async def shrunk_run(
    sandbox: Callable[..., SandboxServer],
    tmp_path: Path,
    count: int,
    sections: dict[str, dict[str, Any]] | None = None,
    **settings: Any,
) -> tuple[SandboxServer, RunSummary, list[dict[str, Any]]]:
    """`count` catalog rows run on KEY against a shrunk sandbox of `settings`, with the config's
    `sections` beside the shrunk time scale: the sandbox, the summary and the results."""
    sb = shrunk_sandbox(sandbox, **settings)
    manifest = write_manifest(tmp_path / "m.csv", catalog(count))
    config = make_config(
        tmp_path, sb.base_url, manifest, api={"time_scale": SCALE}, **(sections or {})
    )
    summary = await go(config, [KEY])
    return sb, summary, results(summary)


def results(summary: RunSummary) -> list[dict[str, Any]]:
    return pq.read_table(summary.results_path).to_pylist()


def assert_one_result_per_row(rows: list[dict[str, Any]], count: int) -> None:
    assert sorted(r["row_number"] for r in rows) == list(range(1, count + 1))
    assert all(r["status"] in ("succeeded", "failed", "rejected") for r in rows)


def ledger_cost(sb: SandboxServer) -> float:
    """What the sandbox billed our keys (another application's jobs, `org_traffic`, are its)."""
    ended = [e for e in sb.ledger() if e["event"] == "ended" and e.get("key") != ORG_MATE]
    return round(sum(e.get("cost_usd", 0) for e in ended), 6)


PRICE = 0.03


def journal_rows(run_dir: Path) -> list[dict[str, Any]]:
    db = sqlite3.connect(f"file:{run_dir / 'journal.sqlite'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM jobs ORDER BY row_number")]
    finally:
        db.close()


def sent_fingerprint(row: dict[str, Any]) -> str:
    """The fingerprint of the input a journal row's creates were sent with."""
    inputs = json.loads(row["inputs"]) if row["inputs"] else {}
    if row.get("sent_seed") is not None and "seed" not in inputs:
        inputs["seed"] = row["sent_seed"]
    return fingerprint(MODEL, inputs)


def judge_against_ledger(sb: SandboxServer, run_dir: Path, rows: int) -> dict[str, Any]:
    """The issue's three checks; returns the figures for the failure message."""
    results = pq.read_table(run_dir / "results.parquet").to_pylist()
    journal = {r["row_number"]: r for r in journal_rows(run_dir)}
    ledger = sb.ledger()

    # every manifest row has exactly one final result
    assert sorted(r["row_number"] for r in results) == list(range(1, rows + 1))
    assert {r["status"] for r in results} <= {"succeeded", "failed", "rejected"}

    # no input was created twice, except for counted ambiguous creates (a row's input is sent
    # with the seed drawn for it when it has none: the provider's fingerprint is of that)
    created = Counter(e["fingerprint"] for e in ledger if e["event"] == "created")
    ambiguous_by_fp: dict[str, int] = {}
    for j in journal.values():
        ambiguous_by_fp[sent_fingerprint(j)] = j["ambiguous"]
    for fp, count in created.items():
        assert count - 1 <= ambiguous_by_fp[fp], f"{fp} created {count}x, uncounted"

    # the recorded cost is the billed cost; anything else billed is a counted possible duplicate
    billed = {e["prediction_id"]: e["cost_usd"] for e in ledger if e["event"] == "ended"}
    ours = {r["prediction_id"] for r in results if r["prediction_id"]}
    recorded = round(sum(r["cost_usd"] for r in results), 6)
    assert recorded == pytest.approx(sum(billed.get(p, 0.0) for p in ours))
    fp_of = {e["prediction_id"]: e["fingerprint"] for e in ledger if e["event"] == "created"}
    orphans = [p for p in fp_of if p not in ours]
    for p in orphans:
        assert ambiguous_by_fp[fp_of[p]] > 0, "a job we do not know of was created"
    possible = sum(r["ambiguous_creates"] for r in results) * PRICE
    assert sum(billed.get(p, 0.0) for p in orphans) <= possible + 1e-9
    return {
        "recorded": recorded,
        "orphans": len(orphans),
        "ambiguous": sum(r["ambiguous_creates"] for r in results),
        "creates": sum(created.values()),
    }


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB disk of its own (tmpfs), for a run folder that another process fills."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.fixture(autouse=True, scope="session")
def logs_as_the_cli() -> None:
    """Runs started here without a run.log (`pipeline.runs.run`) log as the CLI does by
    default: warnings and up on stderr, one line each, no traceback. Left to structlog's own
    default, every debug event was printed, each logged error with a highlighted traceback."""
    configure_logging(None, console_level=logging.WARNING)


@pytest.fixture
def pipelines() -> Iterator[list[Any]]:
    """Runs in subprocesses a test starts (`tests.test_crash.Pipeline`), killed at its end."""
    started: list[Any] = []
    yield started
    for p in started:
        p.kill()


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """moto's S3 server on loopback, with a bucket; the standard environment points at it.
    (moto and boto3 are imported here: at the top, each worker of the suite paid 0.5 CPU-s.)"""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "wanbatch-test",
        "AWS_SECRET_ACCESS_KEY": "wanbatch-test-secret",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="catalog-images")
    yield client
    server.stop()


# as the machine's own check starts it: without the background-networking flags, Chromium's
# connections are refused by the closed network, many at a time
CHROMIUM_FLAGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed by the test setup when the machine lacks it."""
    # one installer at a time: the suite's workers (pytest-xdist) may all ask at once
    with open(Path(tempfile.gettempdir()) / "wanbatch-chromium.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = shutil.which("chromium")
        if found is None:
            install = ["apt-get", "install", "-y", "-q", "chromium"]
            if subprocess.run(install, capture_output=True).returncode != 0:
                subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
                subprocess.run(install, check=True, capture_output=True)
            found = shutil.which("chromium")
    assert found is not None, "Debian's chromium package could not be installed"
    return found


@pytest.fixture(scope="session")
def devtools(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One headless Chromium for this worker of the suite, reached by its DevTools address:
    each test opens its own browser contexts in it (a launch per test cost 2 CPU-s)."""
    profile = tmp_path_factory.mktemp("chromium-profile")
    args = [chromium, "--headless", "--remote-debugging-port=0", f"--user-data-dir={profile}"]
    # its own temporary folder: a Chromium stopped by a signal leaves one behind in /tmp
    env = {**os.environ, "TMPDIR": str(tmp_path_factory.mktemp("chromium-tmp"))}
    proc = subprocess.Popen(
        [*args, *CHROMIUM_FLAGS, "about:blank"], stderr=subprocess.PIPE, env=env
    )
    assert proc.stderr is not None
    said = []
    for raw in proc.stderr:  # its first lines, until it names its address
        line = raw.decode(errors="replace")
        said.append(line)
        if line.startswith("DevTools listening on "):
            break
    else:
        raise AssertionError(f"chromium did not start: {''.join(said)[-2000:]}")
    drain = threading.Thread(target=proc.stderr.read, daemon=True)  # its later lines
    drain.start()
    yield line.removeprefix("DevTools listening on ").strip()
    proc.terminate()
    proc.wait(timeout=30)
    drain.join(timeout=30)
    proc.stderr.close()


@pytest.fixture
async def browser(devtools: str) -> AsyncIterator[Browser]:
    """Headless Chromium driven by Playwright (Debian's binary: Playwright downloads none),
    the worker's one, through its DevTools protocol; the contexts a test opens are closed
    with it."""
    async with async_playwright() as driver:
        connected = await driver.chromium.connect_over_cdp(devtools)
        yield connected
        await connected.close()
