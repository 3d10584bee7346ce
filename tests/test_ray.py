"""Runs spread over Ray workers (`--workers`): one local Ray cluster for the session
(`ray.init(num_cpus=2)`), the sandbox as a real server on loopback, its ledger the judge."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import psutil
import pyarrow.parquet as pq
import pytest
import yaml

# without the `ray` extra this file is skipped, not failed at collection
ray = pytest.importorskip(
    "ray", reason="the ray extra is not installed (pip install wanbatch[ray])"
)

from pipeline.api import arun  # noqa: E402
from pipeline.core import ApiKey, ConfigError, ExitCode, RunConfig, parse_config, timings  # noqa: E402
from pipeline.drive import Workers  # noqa: E402
from pipeline.drive.ray.cluster import Cluster, spread  # noqa: E402
from pipeline.drive.ray.remote import WorkerProcess, WorkerSetup  # noqa: E402
from pipeline.journal import Journal  # noqa: E402
from pipeline.sandbox import SandboxServer, key_hash  # noqa: E402
from tests.conftest import (  # noqa: E402
    KEY,
    KEY2,
    SCALE,
    assert_one_result_per_row,
    catalog,
    config_data,
    go,
    journal_rows,
    judge_against_ledger,
    ledger_cost,
    make_config,
    results,
    shrunk_sandbox,
    throttled_run,
    wait_for,
    write_manifest,
)
from tests.test_crash import Pipeline  # noqa: E402

Start = Callable[..., SandboxServer]
# one Ray cluster for the file: its tests run on one worker of the suite (conftest.ONE_WORKER)
pytestmark = pytest.mark.anyio

KEYS = (KEY, KEY2, "sandbox-key-three", "sandbox-key-four")
LIMITS = {"creates_per_window": 20, "max_concurrent": 4}


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """One local Ray cluster for every test that needs it; its address, for subprocesses.
    Its workers run at the suite's priority: at Ray's default (nice 15) they had about 3 % of a
    core beside the suite's other workers, and this file took 166-254 s, not 141 s, in it."""
    ray.init(
        num_cpus=2,
        object_store_memory=80 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        _system_config={"worker_niceness": 0},
    )
    yield str(ray.get_runtime_context().gcs_address)
    ray.shutdown()


def _worker_processes(name: str | None = None) -> list[psutil.Process]:
    """The processes of our Ray workers (Ray titles an actor's process with its class), or
    of the one called `name` (in its environment)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        try:
            if line.startswith("ray::WorkerProcess") and (
                name is None or proc.environ().get("WANBATCH_WORKER") == name
            ):
                found.append(proc)
        except psutil.Error:  # it ended meanwhile
            continue
    return found


async def _until(
    check: Callable[[], bool], within: float = 60, still: Callable[[], bool] = lambda: True
) -> None:
    """Until `check` holds, while `still` does (polled in a thread: what they read has no
    event to wait on)."""
    held = await anyio.to_thread.run_sync(wait_for, check, within, still, abandon_on_cancel=True)
    assert held, f"not seen within {within} s"


def _catalog_run(
    sandbox: Start,
    tmp_path: Path,
    rows: int,
    provider: dict[str, Any] | None = None,
    **sections: Any,
) -> tuple[SandboxServer, RunConfig]:
    """A sandbox of the four keys (4 s jobs unless `provider` says otherwise) and a config
    for a catalog of `rows` against it, also written as config.yaml; `sections` override."""
    sb = shrunk_sandbox(
        sandbox, **{"keys": KEYS, "latency_mean_s": 4, **LIMITS, **(provider or {})}
    )
    manifest = write_manifest(tmp_path / "m.csv", catalog(rows))
    data = config_data(
        tmp_path,
        sb.base_url,
        manifest,
        **{"api": {"time_scale": SCALE}, "limits": LIMITS, **sections},
    )
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    return sb, parse_config(data, tmp_path)


def _distributed(config: Path, ray_cluster: str, *args: str) -> Pipeline:
    """`wanbatch run CONFIG --workers 2` in a process of its own, on the session's cluster."""
    keys = ",".join(KEYS)
    return Pipeline(config, "--workers", "2", "--ray-address", ray_cluster, *args, keys=keys)


async def test_two_workers_drive_four_keys_each_within_its_limits(
    ray_cluster: str, sandbox: Start, tmp_path: Path
) -> None:
    sb, config = _catalog_run(sandbox, tmp_path, 160)
    summary = await arun(config, keys=list(KEYS), workers=2)  # run.log, as from Python
    rows = results(summary)
    assert summary.exit_code is ExitCode.OK, summary.message
    assert_one_result_per_row(rows, 160)
    assert all(r["status"] == "succeeded" and r["images"] == 1 for r in rows)

    # each key owned by one worker, two keys each
    owned = [set(w["keys"]) for w in summary.workers]
    assert [len(o) for o in owned] == [2, 2] and not owned[0] & owned[1]
    assert set().union(*owned) == {ApiKey(k).name for k in KEYS}
    assert all(w["jobs_finished"] > 0 and w["restarts"] == 0 for w in summary.workers)

    # every key within its limits at the provider, and every key worked
    for key in KEYS:
        stats = sb.stats()["keys"][key_hash(key)]
        assert stats["max_creates_in_window"] <= 20
        assert stats["max_in_flight"] <= 4
        assert stats["refused_429"] == 0
        assert summary.per_key[ApiKey(key).name]["jobs"] > 0

    # nothing paid twice, and the cost is the ledger's
    figures = judge_against_ledger(sb, config.output.dir, 160)
    assert figures["creates"] == 160 and figures["orphans"] == 0
    assert summary.totals["cost_usd"] == pytest.approx(ledger_cost(sb))
    assert summary.stats.creates_sent == 160 and summary.stats.finished == 160
    assert len(summary.stats.latencies) == 160

    # one run of record: results, images and a summary covering both workers
    document = json.loads((config.output.dir / "summary.json").read_text())
    assert [w["worker"] for w in document["workers"]] == ["worker-1", "worker-2"]
    assert document["jobs_finished_this_run"] == 160
    assert len(list((config.output.dir / "images").iterdir())) == 160
    thumbs = config.output.dir / "report-thumbs"
    assert len([p for p in thumbs.iterdir() if p.name.startswith("o-")]) == 160
    metrics = (config.output.dir / "metrics.prom").read_text()
    assert 'wanbatch_worker_jobs_finished{worker="worker-1"}' in metrics
    for key in KEYS:
        assert f'wanbatch_in_flight_jobs{{key="{ApiKey(key).name}"}}' in metrics
    events = [json.loads(line) for line in (config.output.dir / "run.log").read_text().splitlines()]
    finished = next(e for e in events if e["event"] == "run_finished")
    assert "worker-1 on" in finished["progress"] and "worker-2 on" in finished["progress"]
    assert all(KEY not in line for line in map(json.dumps, events))  # no secret logged


async def test_a_worker_that_keeps_dying_stops_the_run_which_resumes(
    ray_cluster: str, sandbox: Start, tmp_path: Path
) -> None:
    """A worker killed mid-run is replaced and the run goes on within every key's limits;
    replaced three times, a worker that dies a fourth time (a node lost for good) stops the
    run with exit code 1, its books finished; the same run resumes and loses nothing: what
    the dead worker held was polled again or created again, never paid twice uncounted."""
    # 2 s jobs, 4 in flight per key: worker-1's share of 120 rows outlasts its four lives
    sb, config = _catalog_run(sandbox, tmp_path, 120, {"latency_mean_s": 40, "latency_spread": 0.1})
    summary = None

    async def run() -> None:
        nonlocal summary
        summary = await go(config, list(KEYS), workers=Workers(2))

    def up() -> bool:  # a worker-1 is running (it may be starting: a death all the same)
        return len(_worker_processes("worker-1")) == 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await _until(lambda: sb.stats()["creates"] > 0)  # the run is under way
        for _ in range(4):
            await _until(up, still=lambda: summary is None)
            _worker_processes("worker-1")[0].send_signal(signal.SIGKILL)
            await _until(lambda: not up(), still=lambda: summary is None)
    assert summary is not None
    assert summary.exit_code is ExitCode.ERROR
    assert "worker-1 died 4 times" in summary.message and "resume" in summary.message
    assert [w["restarts"] for w in summary.workers] == [3, 0]
    # the worker that lived reported its figures; one killed as it started may never have
    # reported any (its lives' CPU then counts as 0, the truth as the driver saw it)
    lived = [w for w in summary.workers if w["restarts"] == 0]
    assert lived and all(w["cpu_s"] > 0 and w["peak_rss_mb"] > 0 for w in lived)
    assert len(results(summary)) == 120  # results hold every row, finished or not

    again = await go(config, list(KEYS), workers=Workers(2))
    assert again.exit_code is ExitCode.OK, again.message
    rows = results(again)
    assert_one_result_per_row(rows, 120)
    assert all(r["status"] == "succeeded" for r in rows)
    figures = judge_against_ledger(sb, config.output.dir, 120)
    # a create in flight at a kill may or may not have reached the provider: it is counted
    assert 120 <= figures["creates"] <= 120 + figures["ambiguous"]
    assert summary.stats.ambiguous_creates + again.stats.ambiguous_creates == figures["ambiguous"]
    for key in KEYS:
        stats = sb.stats()["keys"][key_hash(key)]
        assert stats["max_creates_in_window"] <= 20 and stats["max_in_flight"] <= 4


def _created(run_dir: Path) -> int:
    path = run_dir / "journal.sqlite"
    if not path.exists():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM jobs WHERE status='created'").fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        db.close()


async def test_a_killed_distributed_run_resumes(
    ray_cluster: str, sandbox: Start, tmp_path: Path
) -> None:
    sb, config = _catalog_run(sandbox, tmp_path, 120)
    driver = _distributed(tmp_path / "config.yaml", ray_cluster)
    run_dir = tmp_path / "run"
    try:
        await _until(lambda: _created(run_dir) >= 8 or not driver.running(), within=90)
        assert driver.running(), driver.wait()[1]
    finally:
        driver.kill()  # SIGKILL
    # the driver's workers go with it; the same command resumes, here from Python
    summary = await go(config, list(KEYS), workers=Workers(2))
    assert summary.exit_code is ExitCode.OK, summary.message
    assert summary.stats.reattached >= 1
    rows = results(summary)
    assert_one_result_per_row(rows, 120)
    assert all(r["status"] == "succeeded" for r in rows)
    figures = judge_against_ledger(sb, run_dir, 120)
    assert 120 <= figures["creates"] <= 120 + figures["ambiguous"]


async def test_a_throttled_key_gives_its_jobs_to_another_workers_key(
    ray_cluster: str, sandbox: Start, tmp_path: Path
) -> None:
    """Each key alone on its worker: the throttled key's jobs go back to the driver and on to
    the other worker's key instead of waiting out 429 after 429 until they fail."""
    keys = ["k-ok", "k-throttled"]
    sb, config = throttled_run(sandbox, tmp_path, keys, "k-throttled")
    summary = await go(config, keys, workers=Workers(2))
    assert [len(w["keys"]) for w in summary.workers] == [1, 1]
    rows = results(summary)
    assert summary.exit_code is ExitCode.OK, summary.message
    assert all(r["status"] == "succeeded" and r["attempts"] == 1 for r in rows)
    assert {r["key"] for r in rows} == {ApiKey("k-ok").name}
    throttled = sb.stats()["keys"][key_hash("k-throttled")]
    assert throttled["creates"] == 0 and throttled["refused_429"] > 0
    assert summary.stats.rate_limited == throttled["refused_429"]
    assert sb.stats()["creates"] == 80


async def test_workers_store_the_images_in_object_storage(
    ray_cluster: str, sandbox: Start, tmp_path: Path, s3: Any
) -> None:
    """The workers reach the bucket with the driver's settings (set here after the Ray
    cluster started, so they can only have come from the driver)."""
    sb, config = _catalog_run(sandbox, tmp_path, 40, assets={"store": "s3://catalog-images/n1"})
    summary = await arun(config, keys=list(KEYS), workers=2)
    assert summary.exit_code is ExitCode.OK, summary.message
    images = pq.read_table(config.output.dir / "images.parquet").to_pylist()
    assert len(images) == 40 and {i["state"] for i in images} == {"stored"}
    listed = s3.list_objects_v2(Bucket="catalog-images", Prefix="n1/")["Contents"]
    assert sorted(f"s3://catalog-images/{o['Key']}" for o in listed) == sorted(
        str(i["path"]) for i in images
    )
    for image in images[:5]:
        key = str(image["path"]).removeprefix("s3://catalog-images/")
        body = s3.get_object(Bucket="catalog-images", Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == image["sha256"]
    assert not (config.output.dir / "images").exists()  # nothing on the driver's disk
    assert summary.totals["cost_usd"] == pytest.approx(ledger_cost(sb))
    log = (config.output.dir / "run.log").read_text()
    assert "wanbatch-test-secret" not in log + json.dumps(summary.workers)
    assert "wanbatch-test-secret" not in (config.output.dir / "summary.json").read_text()


async def test_keys_of_one_account_stay_on_one_worker_and_share_its_cap(
    ray_cluster: str, sandbox: Start, tmp_path: Path
) -> None:
    sb, config = _catalog_run(
        sandbox,
        tmp_path,
        80,
        {"latency_mean_s": 10, "groups": ((KEY, KEY2),)},
        limits={**LIMITS, "groups": [[1, 2]]},
    )
    summary = await go(config, list(KEYS), workers=Workers(2))
    assert summary.exit_code is ExitCode.OK, summary.message
    owned = [set(w["keys"]) for w in summary.workers]
    account = {ApiKey(KEY).name, ApiKey(KEY2).name}
    assert account in owned  # the group on one worker, the two other keys on the other
    stats = sb.stats()
    assert stats["max_in_flight_per_group"]["group-1"] == 4  # the shared cap, full
    assert stats["refused_429"] == 0  # never sent past it
    assert all(k["creates"] > 0 for k in stats["keys"].values()), stats["keys"]


async def test_the_budget_holds_over_all_workers_and_can_cancel_their_jobs(
    ray_cluster: str, sandbox: Start, tmp_path: Path
) -> None:
    """The driver reserves each job's worst case before handing it to any worker."""
    sb, config = _catalog_run(sandbox, tmp_path, 60, budget={"max_cost_usd": 0.45})
    summary = await go(config, list(KEYS), workers=Workers(2))
    assert summary.exit_code is ExitCode.BUDGET
    assert sb.stats()["creates"] == 15 and ledger_cost(sb) <= 0.45 + 1e-9
    assert summary.totals["cost_usd"] == pytest.approx(ledger_cost(sb))
    assert summary.counts.get("pending", 0) == 45

    # 3 s jobs, in flight when the budget binds: cancelled at the provider by their workers
    slow = shrunk_sandbox(sandbox, keys=KEYS, latency_mean_s=60, **LIMITS)
    manifest = write_manifest(tmp_path / "slow.csv", catalog(20))
    config = make_config(
        tmp_path,
        slow.base_url,
        manifest,
        api={"time_scale": SCALE},
        limits=LIMITS,
        output={"dir": str(tmp_path / "slow")},
        budget={"max_cost_usd": 0.15, "cancel_in_flight": True},
    )
    summary = await go(config, list(KEYS), workers=Workers(2))
    assert summary.exit_code is ExitCode.BUDGET
    cancelled = [r for r in results(summary) if r["error_type"] == "cancelled"]
    assert len(cancelled) == 5 and slow.stats()["creates"] == 5
    assert all(r["cancel_accepted"] is True and r["cost_usd"] == 0 for r in cancelled)
    assert ledger_cost(slow) == 0 and summary.totals["cost_usd"] == 0


def test_signals_stop_a_distributed_run_as_a_local_one(
    ray_cluster: str, sandbox: Start, tmp_path: Path
) -> None:
    """A first signal: no new create, the workers' jobs in flight end within the grace.
    After a second: every worker cancels its jobs in flight at the provider at once."""
    sb, _ = _catalog_run(sandbox, tmp_path, 60, {"latency_mean_s": 40, "latency_spread": 0.1})
    config = tmp_path / "config.yaml"
    run_dir = tmp_path / "run"

    first = _distributed(config, ray_cluster, "--grace", "20")
    try:
        assert wait_for(lambda: sb.stats()["creates"] >= 10, 60, first.running)
        first.proc.send_signal(signal.SIGTERM)
        code, output = first.wait(timeout=30)
    finally:
        first.kill()
    assert code == 3, output
    journal = journal_rows(run_dir)
    statuses = {r["status"] for r in journal}
    assert "created" not in statuses and "creating" not in statuses  # every job ended
    done = sum(r["status"] == "succeeded" for r in journal)
    assert done == sb.stats()["creates"] and done < 60

    second = _distributed(config, ray_cluster, "--grace", "60")
    try:
        assert wait_for(lambda: sb.stats()["creates"] >= done + 10, 60, second.running)
        second.proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        second.proc.send_signal(signal.SIGINT)
        code, output = second.wait(timeout=30)
    finally:
        second.kill()
    assert code == 3, output
    # each job in flight was cancelled at the provider and, on a worker's poll, booked as the
    # provider ended it (cancelled, here), or left journaled for the resume
    in_flight = [r for r in journal_rows(run_dir) if r["cancel_accepted"] is not None]
    assert in_flight and all(r["cancel_accepted"] == 1 for r in in_flight)
    assert all(r["status"] in ("created", "failed") for r in in_flight)
    assert all(r["error_type"] == "cancelled" for r in in_flight if r["status"] == "failed")
    ends = {e["prediction_id"]: e for e in sb.ledger() if e["event"] == "ended"}
    assert all(ends[r["prediction_id"]]["status"] == "cancelled" for r in in_flight)


def test_keys_are_spread_to_equal_capacity_groups_whole(tmp_path: Path) -> None:
    config = make_config(tmp_path, "http://127.0.0.1:9/v1", tmp_path / "m.csv")
    keys = [ApiKey(f"key-number-{i}") for i in range(7)]
    groups = [[keys[0].name, keys[1].name, keys[2].name]]  # one account: one cap for three
    sets = spread(keys, groups, 3, config)
    names = [{k.name for k in s} for s in sets]
    assert sum(len(s) for s in sets) == 7
    assert any(set(groups[0]) <= n for n in names)  # a group is never split
    # a group of three shares one cap (10 jobs in flight): worth one key at the real pace
    assert sorted(len(s) for s in sets) == [2, 2, 3]
    assert len(spread(keys[:2], [], 4, config)) == 2  # never more workers than keys


async def test_workers_with_webhooks_or_a_bad_count_stop_before_anything(
    sandbox: Start, tmp_path: Path
) -> None:
    sb, hooked = _catalog_run(sandbox, tmp_path, 3, webhook={"enabled": True})
    with pytest.raises(ConfigError, match=r"webhook\.enabled and --workers"):
        await go(hooked, [KEY], workers=Workers(2))
    _, plain = _catalog_run(sandbox, tmp_path, 3)
    with pytest.raises(ConfigError, match="at least 1"):
        await go(plain, [KEY], workers=Workers(0))
    assert sb.stats()["creates"] == 0


def test_the_cli_names_the_extra_when_ray_is_missing(tmp_path: Path) -> None:
    """Without Ray importable, `--workers` says how to install it (exit 2, one line)."""
    blocker = tmp_path / "noray"
    blocker.mkdir()
    (blocker / "ray.py").write_text("raise ImportError('no ray here')\n")
    manifest = write_manifest(tmp_path / "m.csv", catalog(2))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_data(tmp_path, "http://127.0.0.1:9/v1", manifest)))
    env = {**os.environ, "PYTHONPATH": str(blocker), "EACHLABS_API_KEY": KEY}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(path), "--workers", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "pip install -e '.[ray]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_worker_that_cannot_see_a_folder_store_says_so(tmp_path: Path) -> None:
    """A folder store on the driver's disk that a worker's node does not share (the marker
    the driver wrote is not there) is named, with what to use instead."""
    config = make_config(tmp_path, "http://127.0.0.1:9/v1", tmp_path / "m.csv")
    seen = tmp_path / "images" / ".wanbatch-reach-1"
    seen.parent.mkdir()
    seen.write_text("x")
    setup = WorkerSetup(
        1, config, timings(config), [ApiKey(KEY)], [], "http://127.0.0.1:9/v1", {}, False
    )
    assert WorkerProcess(replace(setup, store_marker=str(seen))).check() is None
    unseen = str(tmp_path / "elsewhere" / ".wanbatch-reach-1")
    problem = WorkerProcess(replace(setup, store_marker=unseen)).check()
    assert problem is not None
    assert "cannot see" in problem and "s3://" in problem and str(tmp_path / "elsewhere") in problem


class _TwoNodes:
    """Ray as it answers on a cluster of two nodes (only `nodes()` differs)."""

    exceptions = ray.exceptions

    def nodes(self) -> list[dict[str, Any]]:
        return [{"NodeID": "a", "Alive": True}, {"NodeID": "b", "Alive": True}]

    def remote(self, cls: type) -> Any:
        return ray.remote(cls)


async def test_a_loopback_provider_is_refused_on_a_cluster_of_several_nodes(
    tmp_path: Path,
) -> None:
    """The sandbox on this machine's loopback cannot serve workers on other nodes: said
    before any worker starts."""
    config = make_config(tmp_path, "http://127.0.0.1:9/v1", tmp_path / "m.csv")
    cluster = Cluster(
        _TwoNodes(), config, timings(config), [[ApiKey(KEY)]], [], "http://127.0.0.1:9/v1", False
    )
    journal = Journal(tmp_path / "journal.sqlite")
    try:
        with pytest.raises(ConfigError, match="1 other node"):
            async with cluster.started(journal):
                pass
    finally:
        journal.close()
    assert cluster.members[0].actor is None  # no worker was started
