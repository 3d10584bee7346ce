"""The pipeline as users run it, in a subprocess, killed and stopped by real signals.

The sandbox runs in the test process and its billing ledger is the judge: every manifest row
ends with exactly one result, no input is created twice except where a create's answer was lost
(counted as ambiguous), and the cost the results record is the cost the provider billed.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.core import ApiKey
from pipeline.sandbox import FaultRates, SandboxServer
from tests.conftest import (
    KEY,
    KEY2,
    catalog,
    config_data,
    journal_rows,
    judge_against_ledger,
    wait_for,
    write_manifest,
)

Start = Callable[..., SandboxServer]
SCALE = 0.05  # 10 s jobs take 0.5 s; the 60 s window takes 3 s


def write_config(tmp_path: Path, base_url: str, manifest: Path) -> Path:
    """The config as a YAML file, for `wanbatch run` in a subprocess."""
    data = config_data(
        tmp_path,
        base_url,
        manifest,
        api={"time_scale": SCALE},
        polling={"job_timeout_s": 300, "expected_latency_s": 10},
        retries={"max_attempts": 8, "backoff_initial_s": 1, "backoff_max_s": 8},
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


class Pipeline:
    """`wanbatch run CONFIG` in a subprocess, with the sandbox's keys in its environment."""

    count = 0

    def __init__(
        self,
        config: Path,
        *args: str,
        keys: str = f"{KEY},{KEY2}",
        user: int | None = None,
        files: int | None = None,
        command: str = "run",
    ) -> None:
        env = {**os.environ, "EACHLABS_API_KEYS": keys}
        env.pop("EACHLABS_API_KEY", None)
        Pipeline.count += 1
        self.output = config.parent / f"pipeline-{Pipeline.count}.out"
        with self.output.open("w") as out:  # the child keeps its own copy of the descriptor
            # `user`: run as that uid (root is not held back by a folder's permissions)
            prefix = []
            if user is not None:
                prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "pipeline", command, str(config), *args],
                # `files`: the most descriptors the run may hold (ulimit -n)
                preexec_fn=None if files is None else lambda: _limit_files(files),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 60) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        return code, self.output.read_text(errors="replace")

    def kill(self) -> None:
        if self.running():
            self.proc.kill()
        self.proc.wait(timeout=10)


def _limit_files(count: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


def test_sigkill_at_many_points_then_resume(
    sandbox: Start, tmp_path: Path, pipelines: list[Pipeline]
) -> None:
    sb = sandbox(
        time_scale=SCALE,
        latency_mean_s=10,
        latency_spread=0.3,
        seed=5,
        faults=FaultRates(create_5xx=0.04, lost_create=0.04, poll_5xx=0.04, job_error=0.04),
    )
    rows = catalog(100)
    rows[10]["prompt"] = ""  # one rejected row
    manifest = write_manifest(tmp_path / "m.csv", rows)
    config = write_config(tmp_path, sb.base_url, manifest)
    run_dir = tmp_path / "run"
    rng = random.Random(20261124)
    kills: list[dict[str, int]] = []

    for cycle in range(10):
        p = Pipeline(config)
        pipelines.append(p)
        if cycle == 0:  # while it starts up and reads the manifest
            time.sleep(rng.uniform(0.2, 0.8))
        else:
            target = sb.stats()["creates"] + rng.randint(4, 16)
            wait_for(lambda t=target: sb.stats()["creates"] >= t, 30, p.running)
            time.sleep(rng.uniform(0, 0.05))  # land anywhere: between send, answer and commit
        if not p.running():
            break  # it finished before this kill
        p.proc.send_signal(signal.SIGKILL)
        p.proc.wait(timeout=10)
        stats = sb.stats()
        kills.append({"creates": stats["creates"], "ended": count_ended(sb)})

    final = Pipeline(config)
    pipelines.append(final)
    code, output = final.wait(timeout=120)
    assert code == 6, output  # finished, with the rejected row (and any job errors)

    figures = judge_against_ledger(sb, run_dir, 100)
    # every lost answer, at run time or left by a kill, was settled from the key's listing
    created = Counter(e["fingerprint"] for e in sb.ledger() if e["event"] == "created")
    assert sum(created.values()) == len(created), "an input was created twice"
    assert len(kills) >= 6, kills  # it was killed mid-run many times
    assert len({k["creates"] for k in kills}) >= 5, kills  # at different points
    assert any(k["creates"] > k["ended"] for k in kills), kills  # with jobs in flight
    summary = pq.read_table(run_dir / "results.parquet").to_pandas()
    assert (summary["status"] == "rejected").sum() == 1
    print("kills", kills, "figures", figures, "duplicates per kill", duplicates_per_kill(sb, kills))


def test_sigkill_at_any_instant_of_a_review_then_the_same_command_finishes_it(
    sandbox: Start, tmp_path: Path, pipelines: list[Pipeline]
) -> None:
    """Issue 37: a SIGKILL at random instants of `retry --rejected`, each followed by the same
    command: every rejected row is made again once, nothing is created twice, the folder is
    never refused, and the cost recorded is the cost billed."""
    sb = sandbox(time_scale=SCALE, latency_mean_s=40, latency_spread=0.3, seed=9)
    manifest = write_manifest(tmp_path / "m.csv", catalog(30))
    config = write_config(tmp_path, sb.base_url, manifest)
    run_dir = tmp_path / "run"
    first = Pipeline(config)
    pipelines.append(first)
    assert first.wait(timeout=120)[0] == 0
    made = {r["row_number"]: r for r in pq.read_table(run_dir / "results.parquet").to_pylist()}
    rejected = list(range(3, 30, 3))  # 9 rows, as the page exports them
    decisions = tmp_path / "decisions.csv"
    decisions.write_text(
        "job_id,row,prediction_id,decision,note\n"
        + "".join(
            f"{made[n]['job_id']},{n},{made[n]['prediction_id']},rejected,too dark\n"
            for n in rejected
        )
    )
    before = sb.stats()["creates"]
    rng = random.Random(37)
    kills = []
    for _ in range(10):  # bounded: ten kills at most, each within a few seconds
        p = Pipeline(config, "--rejected", str(decisions), command="retry")
        pipelines.append(p)
        # at a remake's create, or (once all are out) anywhere while they are polled
        target = sb.stats()["creates"] + rng.randint(1, 4)
        wait_for(lambda t=target: sb.stats()["creates"] >= t, rng.uniform(0.8, 2.5), p.running)
        if not p.running():
            code, output = p.wait()
            assert code == 0, output
            break
        p.proc.send_signal(signal.SIGKILL)
        p.proc.wait(timeout=10)
        kills.append(sb.stats()["creates"] - before)
    final = Pipeline(config, "--rejected", str(decisions), command="retry")
    pipelines.append(final)
    code, output = final.wait(timeout=120)
    assert code == 0 and "holds less" not in output, output
    assert len(kills) >= 5, kills
    created = Counter(e["fingerprint"] for e in sb.ledger() if e["event"] == "created")
    assert sum(created.values()) == len(created) == 30 + len(rejected), "created twice"
    rows = {r["row_number"]: r for r in pq.read_table(run_dir / "results.parquet").to_pylist()}
    for n in rejected:
        assert rows[n]["status"] == "succeeded"
        assert rows[n]["prediction_id"] != made[n]["prediction_id"]
    billed = {e["prediction_id"]: e["cost_usd"] for e in sb.ledger() if e["event"] == "ended"}
    assert sum(r["cost_usd"] for r in rows.values()) == pytest.approx(
        sum(billed.values()) - sum(billed[made[n]["prediction_id"]] for n in rejected)
    )
    print("kills at remakes created", kills)


def duplicates_per_kill(sb: SandboxServer, kills: list[dict[str, int]]) -> float:
    """Creates of an input beyond its first, less those a lost create answer explains (the
    sandbox's fault, retried on purpose), per kill: what the kills themselves cost."""
    ledger = sb.ledger()
    created = Counter(e["fingerprint"] for e in ledger if e["event"] == "created")
    lost = sum(1 for e in ledger if e["event"] == "answer_lost")
    return (sum(created.values()) - len(created) - lost) / max(1, len(kills))


def _logged_at(log: Path, event: str) -> float:
    """When the run logged `event` first (wall-clock seconds, from its timestamp)."""
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("event") == event:
            return datetime.datetime.fromisoformat(entry["timestamp"]).timestamp()
    raise AssertionError(f"{event} was not logged")


def count_ended(sb: SandboxServer) -> int:
    return sum(1 for e in sb.ledger() if e["event"] == "ended")


def test_sigterm_stops_creates_lets_jobs_end_and_resumes(
    sandbox: Start, tmp_path: Path, pipelines: list[Pipeline]
) -> None:
    sb = sandbox(time_scale=SCALE, latency_mean_s=10, latency_spread=0.2, keys=(KEY, KEY2))
    manifest = write_manifest(tmp_path / "m.csv", catalog(120))
    config = write_config(tmp_path, sb.base_url, manifest)
    run_dir = tmp_path / "run"

    p = Pipeline(config, "--grace", "20")
    pipelines.append(p)
    assert wait_for(lambda: sb.stats()["creates"] >= 25, 30, p.running)
    p.proc.send_signal(signal.SIGTERM)
    code, output = p.wait(timeout=30)

    assert code == 3, output
    assert "resume" in output
    journal = journal_rows(run_dir)
    # no create begun once the run took the signal: a slot checks the stop right before it
    # journals `creating` with the time (the run's own clock, as its `stopping` event's)
    took = _logged_at(run_dir / "run.log", "stopping")
    late = [r["row_number"] for r in journal if r["started_at"] and r["started_at"] > took]
    assert late == []
    assert sum(r["started_at"] is not None for r in journal) == sb.stats()["creates"]
    by_status = Counter(r["status"] for r in journal)
    # every job that was created ended within the grace period; nothing is left in flight
    assert by_status["created"] == 0 and by_status["creating"] == 0
    assert by_status["succeeded"] == sb.stats()["creates"]
    assert by_status["pending"] > 0
    # the results were flushed, with one row per manifest row
    table = pq.read_table(run_dir / "results.parquet").to_pylist()
    assert len(table) == 120
    assert Counter(r["status"] for r in table) == by_status

    again = Pipeline(config)
    pipelines.append(again)
    code, output = again.wait(timeout=60)
    assert code == 0, output
    judge_against_ledger(sb, run_dir, 120)
    assert sb.stats()["creates"] == 120  # nothing was created twice


def test_a_second_signal_stops_at_once_cancels_jobs_in_flight_and_stays_resumable(
    sandbox: Start, tmp_path: Path, pipelines: list[Pipeline]
) -> None:
    # 40 s jobs (2 s here) against a 60 s grace: only the second signal can end the run early
    sb = sandbox(time_scale=SCALE, latency_mean_s=40, latency_spread=0.1, keys=(KEY, KEY2))
    manifest = write_manifest(tmp_path / "m.csv", catalog(40))
    config = write_config(tmp_path, sb.base_url, manifest)
    run_dir = tmp_path / "run"

    p = Pipeline(config, "--grace", "60")
    pipelines.append(p)
    assert wait_for(lambda: sb.stats()["creates"] >= 15, 30, p.running)
    p.proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    p.proc.send_signal(signal.SIGINT)
    code, output = p.wait(timeout=30)

    assert code == 3, output
    # each signal says in plain words what happens now, not a log line
    assert "wanbatch: stopping: no new jobs are sent" in output
    assert "Press Ctrl-C again to stop now" in output
    assert "wanbatch: stopping now: the jobs in flight are being cancelled" in output
    journal = journal_rows(run_dir)
    in_flight = [r for r in journal if r["cancel_accepted"] is not None]
    assert in_flight, "jobs were in flight at the second signal"
    assert all(r["prediction_id"] for r in in_flight)
    # stopped for good, not waiting for the jobs in flight (they run 2 s; a wait would have seen
    # them end `success`): each was cancelled at the provider, billed nothing, and its end
    # confirmed by a poll before the run exited (or left journaled for the resume)
    ends = {e["prediction_id"]: e for e in sb.ledger() if e["event"] == "ended"}
    assert all(ends[r["prediction_id"]]["status"] == "cancelled" for r in in_flight)
    assert all(ends[r["prediction_id"]]["cost_usd"] == 0 for r in in_flight)
    for row in in_flight:
        assert row["status"] in ("failed", "created") and row["cancel_accepted"] == 1
        assert row["status"] == "created" or row["error_type"] == "cancelled"
    assert any(r["status"] == "failed" for r in in_flight)
    creates = sb.stats()["creates"]

    again = Pipeline(config)
    pipelines.append(again)
    code, output = again.wait(timeout=60)
    assert code == 6, output  # the cancelled rows are failed rows, for `wanbatch retry`
    judge_against_ledger(sb, run_dir, 40)
    # a create cut off by the second signal is left `creating`: its answer is lost, so the
    # resume may create it again (flagged); every other row was created exactly once
    cut_off = sum(r["status"] == "creating" for r in journal)
    assert 40 <= sb.stats()["creates"] <= 40 + cut_off
    final = {r["row_number"]: r for r in journal_rows(run_dir)}
    for row in in_flight:  # seen cancelled (by the stop's polls or the resume's): never again
        ended = final[row["row_number"]]
        assert (ended["status"], ended["error_type"]) == ("failed", "cancelled")
        assert ended["cost_usd"] == 0 and ended["prediction_id"] == row["prediction_id"]
    assert creates <= 40


def test_two_runs_on_one_folder_one_refuses_at_once(
    sandbox: Start, tmp_path: Path, pipelines: list[Pipeline]
) -> None:
    sb = sandbox(time_scale=SCALE, latency_mean_s=10, latency_spread=0.1, keys=(KEY, KEY2))
    manifest = write_manifest(tmp_path / "m.csv", catalog(60))
    config = write_config(tmp_path, sb.base_url, manifest)

    first = Pipeline(config)
    pipelines.append(first)
    assert wait_for(lambda: sb.stats()["creates"] >= 5, 30, first.running)
    second = Pipeline(config)  # an overlapping cron
    pipelines.append(second)
    code, output = second.wait(timeout=30)
    assert code == 2, output
    assert "is held by another run" in output
    assert f"pid {first.proc.pid} on " in output
    assert "Traceback" not in output
    assert first.running()  # the refusal came while the first still ran

    code, output = first.wait(timeout=60)
    assert code == 0, output
    judge_against_ledger(sb, tmp_path / "run", 60)
    assert sb.stats()["creates"] == 60 and sb.stats()["duplicate_creates"] == 0


def test_jobs_whose_key_is_gone_wait_for_it_with_their_own_exit_code(
    sandbox: Start, tmp_path: Path, pipelines: list[Pipeline]
) -> None:
    # 40 s jobs (2 s here): a kill leaves jobs of both keys in flight
    sb = sandbox(time_scale=SCALE, latency_mean_s=40, latency_spread=0.1, keys=(KEY, KEY2))
    manifest = write_manifest(tmp_path / "m.csv", catalog(30))
    config = write_config(tmp_path, sb.base_url, manifest)
    gone = ApiKey(KEY2).name

    def held() -> Counter[str]:
        """The jobs in flight by key, as the journal has committed them."""
        try:
            rows = journal_rows(tmp_path / "run")
        except sqlite3.Error:  # not made yet
            return Counter()
        return Counter(r["key_name"] for r in rows if r["status"] == "created")

    p = Pipeline(config)
    pipelines.append(p)
    # the kill comes once the journal holds jobs of the second key (a count at the sandbox
    # may run ahead of what a loaded machine has committed)
    assert wait_for(lambda: held()[gone] > 0 and sum(held().values()) >= 12, 30, p.running)
    p.kill()
    kept = held()
    assert kept[gone] > 0

    alone = Pipeline(config, keys=KEY)  # the second key was not given this time
    pipelines.append(alone)
    code, output = alone.wait(timeout=60)
    assert code == 7, output
    assert f"{gone} ({kept[gone]} rows)" in output
    left = [r for r in journal_rows(tmp_path / "run") if r["status"] == "created"]
    assert {r["key_name"] for r in left} == {gone}

    both = Pipeline(config)
    pipelines.append(both)
    code, output = both.wait(timeout=60)
    assert code == 0, output
    judge_against_ledger(sb, tmp_path / "run", 30)


def test_malformed_keys_stop_the_run_before_any_request(
    sandbox: Start, tmp_path: Path, pipelines: list[Pipeline]
) -> None:
    sb = sandbox(time_scale=SCALE, keys=(KEY, KEY2))
    manifest = write_manifest(tmp_path / "m.csv", catalog(10))
    config = write_config(tmp_path, sb.base_url, manifest)
    for bad in (f"{KEY},{KEY2}\nX-Injected: 1", f"{KEY},k\u00e9y"):
        p = Pipeline(config, keys=bad)
        pipelines.append(p)
        code, output = p.wait(timeout=30)
        assert code == 2, output
        assert "EACHLABS_API_KEYS: key 2 of 2 is not printable ASCII" in output
        assert KEY2 not in output and "Traceback" not in output
    assert sb.stats()["creates"] == 0 and sb.ledger() == []
    assert not (tmp_path / "run" / "journal.sqlite").exists()


def test_a_read_only_run_folder_is_refused_before_any_request(
    sandbox: Start, pipelines: list[Pipeline]
) -> None:
    sb = sandbox(time_scale=SCALE, keys=(KEY, KEY2))
    # a folder another user can read but not write: the run goes as `nobody`
    folder = Path(tempfile.mkdtemp(prefix="wanbatch-ro-"))
    try:
        folder.chmod(0o755)
        manifest = write_manifest(folder / "m.csv", catalog(5))
        config = write_config(folder, sb.base_url, manifest)
        (folder / "run").mkdir(mode=0o555)
        (folder / "run").chmod(0o555)
        p = Pipeline(config, user=65534)
        pipelines.append(p)
        code, output = p.wait(timeout=30)
        assert code == 2, output
        assert f"cannot use run folder {folder / 'run'}: Permission denied" in output
        assert "Traceback" not in output
        assert sb.ledger() == []
    finally:
        shutil.rmtree(folder)


def test_the_receiver_survives_2000_idle_connections_under_1024_descriptors(
    sandbox: Start, tmp_path: Path, pipelines: list[Pipeline]
) -> None:
    sb = sandbox(time_scale=SCALE, latency_mean_s=20, latency_spread=0.1, allow_loopback_urls=True)
    manifest = write_manifest(tmp_path / "m.csv", catalog(60))
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    data = yaml.safe_load(write_config(tmp_path, sb.base_url, manifest).read_text())
    # callbacks, not polls, end the jobs: the first fallback poll comes long after their end
    data["webhook"] = {"enabled": True, "listen_port": port, "fallback_after_s": 200}
    config = tmp_path / "hooked.yaml"
    config.write_text(yaml.safe_dump(data))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))

    p = Pipeline(config, files=1024)
    pipelines.append(p)
    assert wait_for(lambda: sb.stats()["creates"] > 0, 30, p.running)
    idle: list[socket.socket] = []
    try:
        for _ in range(2000):  # connect and say nothing, as a flood or a scanner would
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            idle.append(s)
        code, output = p.wait(timeout=120)
    finally:
        for s in idle:
            s.close()
    assert code == 0, output[-3000:]
    webhooks = sb.stats()["webhooks"]
    assert webhooks == {"delivered": 60, "failed": 0}
    assert "Traceback" not in output and len(output) < 20_000  # no flood of errors
    judge_against_ledger(sb, tmp_path / "run", 60)
