"""approved.csv: the images a reviewer approved, as a publishing step reads them (one line
per image: the row's id, row number, prediction, output index, stored copy, the provider's
URL, the copy's sha256 and the reviewer's note). Written from the journal at the end of every
run that has approved rows, replaced whole; gone when none are approved."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from pipeline.core import APPROVED, located, to_sheet
from pipeline.journal import Journal

__all__ = ["APPROVED_COLUMNS", "write_approved"]

APPROVED_COLUMNS = ("job_id", "row", "prediction_id", "index", "path", "url", "sha256", "note")


def write_approved(journal: Journal, run_dir: Path) -> Path | None:
    """approved.csv in `run_dir` (paths absolute, or object URLs); None when no row is
    approved."""
    path = run_dir / APPROVED
    tmp = run_dir / f".{APPROVED}.tmp"
    written = 0
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(APPROVED_COLUMNS)
        for batch in journal.reviews.approved_images():
            for image in batch:
                stored = located(image.path, run_dir) if image.path else ""
                cells = [
                    image.job_id,
                    image.row_number,
                    image.prediction_id or "",
                    image.index,
                    stored,
                    image.url,
                    image.sha256 or "",
                    image.note,
                ]
                writer.writerow([to_sheet(c) for c in cells])
                written += 1
    if not written:
        tmp.unlink()
        path.unlink(missing_ok=True)
        return None
    os.replace(tmp, path)
    return path
