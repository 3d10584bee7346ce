"""Catalog scale: a generated Parquet manifest of a million rows, read, validated and journaled
as a run does, then the start-up of a resume on that run folder.

Prints the rows, the ingest time and rate, the peak RSS of this process (reading, validating
and journaling), and the resume start-up time: opening the journal, checking the run folder's
identity, reading the totals and the first page of open jobs, which is what `run` does before
its first create. Then it writes the results file of all those rows, as a run's end does, and
prints how long that took and the peak RSS after it.

    python scripts/bench_scale.py --rows 1000000
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import parse_config
from pipeline.journal import Journal
from pipeline.manifest import Manifest
from pipeline.runner import _check_identity
from pipeline.writer import ResultLayout, write_results


def _write_manifest(path: Path, rows: int) -> None:
    chunk = 100_000
    schema = pa.schema([("sku", pa.string()), ("prompt", pa.string()), ("img_url", pa.string())])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        manifest_path = folder / "catalog.parquet"
        _write_manifest(manifest_path, args.rows)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        config = parse_config(
            {
                "manifest": {"path": str(manifest_path), "id_column": "sku"},
                "output": {"dir": str(folder / "run")},
            },
            folder,
        )
        manifest = Manifest(config.manifest, model=config.api.model, allow_loopback=False)
        journal = Journal(config.output.dir / "journal.sqlite")
        _check_identity(journal, config, force=False)
        started = time.perf_counter()
        ingested = 0
        for batch in manifest.batches(start_row=1):
            journal.ingest(batch, {"ingested_rows": str(batch[-1].row_number)})
            ingested += len(batch)
        journal.set_meta({"ingest_complete": "1"})
        ingest_s = time.perf_counter() - started
        journal.close()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        started = time.perf_counter()
        journal = Journal(config.output.dir / "journal.sqlite")
        manifest = Manifest(config.manifest, model=config.api.model, allow_loopback=False)
        _check_identity(journal, config, force=False)
        journal.totals()
        first_page = journal.open_jobs(0, 1000)
        resume_s = time.perf_counter() - started
        # the end of a run: every row written out, a page at a time
        started = time.perf_counter()
        layout = ResultLayout(
            "sku",
            manifest.mapper.columns,
            manifest.extra_columns,
            manifest.columns,
            manifest.kind,
            manifest.path,
        )
        written = write_results(journal, layout, folder / "results.parquet")
        results_s = time.perf_counter() - started
        peak_results = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        journal.close()
        size_mb = (config.output.dir / "journal.sqlite").stat().st_size / 2**20
    print(f"rows                      {ingested}")
    print(f"ingest_s                  {ingest_s:.1f}")
    print(f"ingest_rows_per_s         {ingested / ingest_s:,.0f}")
    print(f"journal_mb                {size_mb:.0f}")
    print(f"peak_rss_mb_before        {rss_before:.0f}")
    print(f"peak_rss_mb               {peak:.0f}")
    print(f"resume_startup_s          {resume_s:.2f}")
    print(f"first_page_jobs           {len(first_page)}")
    print(f"results_rows              {written}")
    print(f"results_s                 {results_s:.1f}")
    print(f"peak_rss_mb_after_results {peak_results:.0f}")


if __name__ == "__main__":
    main()
