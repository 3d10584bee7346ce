"""removed.csv: the products an earlier night's run had and tonight's export has not (with a
state store), so that a publishing step can take them down: each one's id, the run folder
that last had it, its last edit (prediction, stored image) and whether it was approved.
Replaced whole at the end of every run that read its whole manifest; gone when none."""

from __future__ import annotations

import csv
import datetime
import os
from pathlib import Path
from typing import Any

from pipeline.core import located, to_sheet

__all__ = ["REMOVED_COLUMNS", "write_removed"]

REMOVED_COLUMNS = (
    "job_id",
    "last_run",
    "last_seen",
    "last_status",
    "prediction_id",
    "path",
    "approved",
)


def write_removed(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """removed.csv at `path` from the state store's removed products; None when there are
    none (and any earlier file is gone)."""
    if not rows:
        path.unlink(missing_ok=True)
        return None
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(REMOVED_COLUMNS)
        for row in rows:
            seen = datetime.datetime.fromtimestamp(row["seen_at"], datetime.UTC)
            stored = located(row["path"], Path(row["run_dir"])) if row["path"] else ""
            writer.writerow(
                to_sheet(c)
                for c in [
                    row["job_id"],
                    row["run_dir"],
                    seen.isoformat(timespec="seconds"),
                    row["status"],
                    row["prediction_id"] or "",
                    stored,
                    "yes" if row["review"] == "approved" else "no",
                ]
            )
    os.replace(tmp, path)
    return path
