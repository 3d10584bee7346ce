"""The run folder's file names, declared once: whoever writes or reads one names it from here
(`tests/test_architecture.py` finds any typed again as text)."""

from __future__ import annotations

__all__ = [
    "APPROVED",
    "FAILURES",
    "IMAGES",
    "JOURNAL",
    "LOCK",
    "REMOVED",
    "REPORT",
    "RESULTS",
    "RUN_LOG",
    "RUN_RECORD",
    "SANDBOX_LEDGER",
    "SUMMARY",
    "THUMBS",
]

JOURNAL = "journal.sqlite"  # every row's state: the run's memory across crashes
LOCK = "run.lock"  # who holds the folder (one run at a time)
RUN_RECORD = "run.json"  # how the folder's config was given (its path, the --set overrides)
RUN_LOG = "run.log"
RESULTS = "results.parquet"
IMAGES = "images.parquet"
FAILURES = "failures"  # failures.csv, .tsv or .parquet: as the manifest came
SUMMARY = "summary.json"
REPORT = "report.html"
THUMBS = "report-thumbs"  # the report's thumbnails (a folder)
APPROVED = "approved.csv"
REMOVED = "removed.csv"
SANDBOX_LEDGER = "sandbox-ledger.jsonl"  # what the embedded sandbox billed
