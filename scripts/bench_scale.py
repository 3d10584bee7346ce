"""Catalog scale: a generated Parquet manifest of a million rows, read, validated and journaled
as a run does; then a real resume of that run folder.

Each phase runs in a process of its own, so each peak RSS is that phase's alone (generating the
manifest would otherwise count in the ingest's peak):

1. manifest: writes the Parquet manifest.
2. ingest: reads, validates and journals every row, as a run's ingest thread does; prints the
   time, the rate and the peak RSS.
3. resume: `wanbatch run`'s own code (`pipeline.runs.runner.run`) on that run folder, against the
   embedded sandbox, with a budget that stops it after a few creates. Prints the start-up (from
   the call to the first create's answer), the peak RSS of the whole run, and how long its end
   took: writing the results file of every row.

    python scripts/bench_scale.py --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import RunConfig, parse_config
from pipeline.intake import Manifest
from pipeline.journal import Journal
from pipeline.runs import configure_logging, run
from pipeline.runs.identity import check_identity
from pipeline.sandbox import open_embedded

_CREATES = 10  # the budget lets this many creates through, then the run stops (exit 5)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _config(folder: Path) -> RunConfig:
    return parse_config(
        {
            "api": {"base_url": "sandbox", "price_per_image_usd": 0.03},
            "manifest": {"path": str(folder / "catalog.parquet"), "id_column": "sku"},
            "output": {"dir": str(folder / "run")},
            "budget": {"max_cost_usd": 0.03 * _CREATES},
            "sandbox": {"time_scale": 0.01, "image_scale": 0.05},
        },
        folder,
    )


def _write_manifest(folder: Path, rows: int) -> dict[str, Any]:
    chunk = 100_000
    schema = pa.schema([("sku", pa.string()), ("prompt", pa.string()), ("img_url", pa.string())])
    path = folder / "catalog.parquet"
    with pq.ParquetWriter(path, schema) as out:
        for start in range(0, rows, chunk):
            ids = range(start, min(rows, start + chunk))
            out.write_table(
                pa.table(
                    {
                        "sku": [f"SKU-{i:08d}" for i in ids],
                        "prompt": [f"put product {i} on a white background" for i in ids],
                        "img_url": [f"https://cdn.example.com/catalog/{i}.jpg" for i in ids],
                    },
                    schema=schema,
                )
            )
    return {"manifest_mb": path.stat().st_size / 2**20}


def _ingest(folder: Path) -> dict[str, Any]:
    config = _config(folder)
    config.output.dir.mkdir(parents=True)
    manifest = Manifest(config.manifest, model=config.api.model, allow_loopback=False)
    journal = Journal(config.output.dir / "journal.sqlite")
    check_identity(journal, config, force=False)
    started = time.perf_counter()
    ingested = 0
    for batch in manifest.batches(start_row=1):
        journal.intake.ingest(batch, {"ingested_rows": str(batch[-1].row_number)})
        ingested += len(batch)
    journal.set_meta({"ingest_complete": "1"})
    seconds = time.perf_counter() - started
    journal.close()
    return {
        "rows": ingested,
        "ingest_s": seconds,
        "ingest_peak_rss_mb": _peak_mb(),
        "journal_mb": (config.output.dir / "journal.sqlite").stat().st_size / 2**20,
    }


def _resume(folder: Path) -> dict[str, Any]:
    config = _config(folder)
    configure_logging(None)
    called = time.time()
    summary = anyio.run(lambda: run(config, [], handle_signals=False, embedded=open_embedded))
    ended = time.time()
    created = pq.read_table(summary.results_path, columns=["created_at"])["created_at"]
    first_create = pc.min(created).as_py().timestamp()
    return {
        "exit_code": int(summary.exit_code),
        "creates": summary.stats.creates_sent,
        "resume_first_create_s": first_create - called,
        "resume_run_s": ended - called,
        "results_rows": pq.ParquetFile(summary.results_path).metadata.num_rows,
        "resume_peak_rss_mb": _peak_mb(),
    }


_PHASES = {"manifest": _write_manifest, "ingest": _ingest, "resume": _resume}


def _phase(name: str, folder: Path, rows: int) -> dict[str, Any]:
    """Run one phase in a fresh interpreter; its figures come back as JSON on its last line."""
    command = [sys.executable, __file__, "--phase", name, "--rows", str(rows), "--dir", str(folder)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp one)")
    parser.add_argument("--phase", choices=sorted(_PHASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase is not None:
        figures = _PHASES[args.phase](
            *((args.dir, args.rows) if args.phase == "manifest" else (args.dir,))
        )
        print(json.dumps(figures))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        figures = {}
        for name in ("manifest", "ingest", "resume"):
            figures.update(_phase(name, folder, args.rows))
    print(f"rows                      {figures['rows']}")
    print(f"manifest_mb               {figures['manifest_mb']:.0f}")
    print(f"ingest_s                  {figures['ingest_s']:.1f}")
    print(f"ingest_rows_per_s         {figures['rows'] / figures['ingest_s']:,.0f}")
    print(f"ingest_peak_rss_mb        {figures['ingest_peak_rss_mb']:.0f}")
    print(f"journal_mb                {figures['journal_mb']:.0f}")
    # the real run on the journaled folder: start-up to its first create, then its end
    print(f"resume_first_create_s     {figures['resume_first_create_s']:.2f}")
    print(
        f"resume_creates            {figures['creates']} (budget stop, exit {figures['exit_code']})"
    )
    print(f"resume_run_s              {figures['resume_run_s']:.1f}")
    print(f"results_rows              {figures['results_rows']}")
    print(f"resume_peak_rss_mb        {figures['resume_peak_rss_mb']:.0f}")


if __name__ == "__main__":
    main()
