"""What a crash costs: `wanbatch run` killed with SIGKILL at random instants, then resumed.

Starts the sandbox (in this process, on loopback, with lost create answers), runs `python -m
pipeline run` on a generated manifest, kills it at `--kills` random instants (each after a
random number of new creates, plus a random delay so it lands anywhere: between a create's
send, its answer and its journaling), resumes after each kill, lets the last run finish, and
judges the run folder against the sandbox's billing ledger:

- rows lost: manifest rows without exactly one final result (goal 0);
- duplicate creates: creates of an input beyond its first (goal 0 with the listing: every lost
  answer, at run time or left by a kill, is found in the key's executions listing and adopted),
  and per kill;
- unflagged duplicates: inputs created more often than once plus their counted ambiguous
  creates (goal 0);
- cost recorded against billed: what the results hold against what the sandbox billed (equal
  when nothing is created twice);
- how each lost create was settled (`create_resolution`), and the orphans the summary lists.

Each run is made with the listing and without it (`--listing both`, the default): without it a
lost create is created again and flagged, as before the listing was used.

`--shape today` speaks the provider as its docs say today (Bearer, the organisation's listing
by cursor, another application's traffic in it with `--org-traffic`), once per provider clock
offset (`--offsets`, seconds ahead of ours) and listing lag (`--lags`, provider seconds);
`--same N` rows repeat one unseeded input and `--gone N` rows name an image that is gone.
Besides the figures above it prints the jobs two rows share (goal 0) and how the gone rows
failed (goal: once each, `input_rejected`).

    python scripts/bench_crash.py --kills 20 --rows 1000 --time-scale 0.05 --lost-create 0.02
    python scripts/bench_crash.py --shape today --kills 4 --rows 300 --lost-create 0.08 \
        --offsets 20,300 --lags 3,30 --org-traffic 0.3 --same 30 --gone 6 --listing on
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from pipeline.core.schema import MODEL, fingerprint
from pipeline.sandbox import FaultRates, SandboxServer, SandboxSettings
from pipeline.sandbox.state import ORG_MATE


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--keys", type=int, default=1)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--time-scale", type=float, default=0.05)
    parser.add_argument("--lost-create", type=float, default=0.02)
    parser.add_argument(
        "--early-502", type=float, default=0.0, help="creates answered 502 before anything is made"
    )
    parser.add_argument("--seed", type=int, default=20261125)
    parser.add_argument(
        "--listing",
        choices=("on", "off", "both"),
        default="both",
        help="the provider's executions listing (off: it answers 404, as a provider without it)",
    )
    parser.add_argument("--shape", choices=("seed", "reference", "today"), default="seed")
    parser.add_argument("--offsets", default="0", help="provider clock offsets, s, comma-separated")
    parser.add_argument("--lags", default="0", help="listing lags, provider s, comma-separated")
    parser.add_argument("--org-traffic", type=float, default=0.0)
    parser.add_argument("--same", type=int, default=0, help="rows of one unseeded input")
    parser.add_argument("--gone", type=int, default=0, help="rows whose image is gone")
    parser.add_argument(
        "--kill-delay",
        type=float,
        default=0.25,
        help="the most seconds between seeing the next create and the kill (drawn uniformly); "
        "small values aim the kills at the moments right after a create's answer",
    )
    return parser.parse_args()


def _write_inputs(folder: Path, base_url: str, args: argparse.Namespace) -> Path:
    manifest = folder / "manifest.csv"
    root = base_url.removesuffix("/v1")
    with manifest.open("w", encoding="utf-8") as out:
        out.write("sku,prompt,img_url\n")
        for i in range(1, args.rows + 1):
            if i <= args.same:
                out.write(f"SKU-{i},white background,https://cdn.example.com/p/same.jpg\n")
            elif i <= args.same + args.gone:
                out.write(f"SKU-{i},edit number {i},{root}/gone/{i}.jpg\n")
            else:
                out.write(f"SKU-{i},edit number {i},https://cdn.example.com/p/{i}.jpg\n")
    config = {
        "api": {"base_url": base_url, "time_scale": args.time_scale},
        "polling": {"job_timeout_s": 300},
        "retries": {"max_attempts": 8},
        "manifest": {
            "path": str(manifest),
            "id_column": "sku",
            "allow_loopback_urls": args.gone > 0,
        },
        "output": {"dir": str(folder / "run")},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _start(config: Path, log: Path, keys: tuple[str, ...]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EACHLABS_API_KEYS": ",".join(keys)}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", str(config)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait(check: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not check():
        time.sleep(0.005)


def _journal(run_dir: Path) -> dict[str, int]:
    """The lost creates counted against each input as it was sent (its seed drawn included)."""
    db = sqlite3.connect(f"file:{run_dir / 'journal.sqlite'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    counted: Counter[str] = Counter()
    try:
        for row in db.execute("SELECT inputs, sent_seed, ambiguous FROM jobs"):
            inputs = json.loads(row["inputs"] or "{}")
            if row["sent_seed"] is not None and "seed" not in inputs:
                inputs["seed"] = row["sent_seed"]
            counted[fingerprint(MODEL, inputs)] += int(row["ambiguous"])
    finally:
        db.close()
    return counted


def _billed(ledger: list[dict[str, Any]]) -> float:
    return round(sum(e.get("cost_usd") or 0.0 for e in ledger if e["event"] == "ended"), 6)


def _one(args: argparse.Namespace, listing: bool, offset: float, lag: float) -> dict[str, Any]:
    """One run, killed `--kills` times and finished, judged against the sandbox's ledger."""
    rng = random.Random(args.seed)
    keys = tuple(f"bench-crash-key-{i + 1}" for i in range(args.keys))
    settings = SandboxSettings(
        keys=keys,
        time_scale=args.time_scale,
        latency_mean_s=10,
        latency_spread=0.3,
        seed=args.seed,
        image_scale=0.05,
        faults=FaultRates(lost_create=args.lost_create, early_502=args.early_502),
        listing=listing,
        api_shape=args.shape,
        clock_offset_s=offset,
        listing_lag_s=lag,
        org_traffic=args.org_traffic,
        allow_loopback_urls=args.gone > 0,
        fetch_inputs=args.gone > 0,
    )
    with tempfile.TemporaryDirectory() as tmp, SandboxServer(settings) as sb:
        folder = Path(tmp)
        config = _write_inputs(folder, sb.base_url, args)
        log = folder / "runs.log"
        kills = 0
        started = time.monotonic()
        while kills < args.kills:
            proc = _start(config, log, keys)
            target = sb.stats()["creates"] + rng.randint(1, 2 * args.rows // (3 * args.kills) + 2)
            _wait(lambda t=target: sb.stats()["creates"] >= t, proc, 60)  # type: ignore[misc]
            time.sleep(rng.uniform(0, args.kill_delay))
            if proc.poll() is not None:
                break  # it finished before this kill
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            kills += 1
        final = _start(config, log, keys)
        code = final.wait(timeout=900)
        elapsed = time.monotonic() - started

        results = pq.read_table(folder / "run" / "results.parquet").to_pylist()
        summary = json.loads((folder / "run" / "summary.json").read_text(encoding="utf-8"))
        numbers = Counter(r["row_number"] for r in results)
        final_ok = {r["row_number"] for r in results if r["status"] in ("succeeded", "failed")}
        lost = sum(1 for n in range(1, args.rows + 1) if numbers[n] != 1 or n not in final_ok)
        ledger = [e for e in sb.ledger() if e.get("key") != ORG_MATE]  # ours alone
        created = Counter(e["fingerprint"] for e in ledger if e["event"] == "created")
        lost_answers = sum(1 for e in ledger if e["event"] == "answer_lost")
        duplicates = sum(created.values()) - len(created)
        counted = _journal(folder / "run")
        unflagged = sum(max(0, n - 1 - counted[fp]) for fp, n in created.items())
        pids = Counter(r["prediction_id"] for r in results if r["prediction_id"])
        gone = [r for r in results if "/gone/" in (r["img_urls"] or [""])[0]]
        orphans = {o["prediction_id"] for o in summary["orphans"]}
        org = {e["prediction_id"] for e in sb.ledger() if e.get("key") == ORG_MATE}
        resolutions = Counter(r["create_resolution"] for r in results if r["create_resolution"])
        recorded = round(sum(r["cost_usd"] for r in results), 6)
    return {
        "shape": args.shape,
        "clock_offset_s": offset,
        "listing_lag_s": lag,
        "listing": "on" if listing else "off",
        "rows": args.rows,
        "kills": kills,
        "final_exit_code": code,
        "rows_lost": lost,
        "creates": sum(created.values()),
        "lost_create_answers": lost_answers,
        "duplicate_creates": duplicates,
        "duplicates_per_kill": round(duplicates / max(1, kills), 3),
        "flagged_duplicates": duplicates - unflagged,
        "unflagged_duplicates": unflagged,
        "jobs_shared_by_rows": sum(n - 1 for n in pids.values()),
        "gone_rows_failed": dict(Counter(f"{r['error_type']} after {r['attempts']}" for r in gone)),
        "possible_duplicate_charges": summary["possible_duplicate_charges"],
        "resolutions": dict(sorted(resolutions.items())),
        "cost_recorded_usd": recorded,
        "cost_billed_usd": _billed(ledger),
        "orphans": len(orphans),
        "org_mate_orphans": len(orphans & org),
        "wall_s": round(elapsed, 1),
    }


def main() -> None:
    args = _arguments()
    modes = {"on": (True,), "off": (False,), "both": (True, False)}[args.listing]
    offsets = [float(v) for v in args.offsets.split(",")]
    lags = [float(v) for v in args.lags.split(",")]
    for listing, offset, lag in itertools.product(modes, offsets, lags):
        figures = _one(args, listing, offset, lag)
        for name, value in figures.items():
            print(f"{name:28} {value}")
        print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
