"""`wanbatch status RUN_DIR`: a run folder as its journal tells it, read-only and without
sending anything: whether a run holds it now, rows by state, cost and images so far, and the
rows whose jobs wait on a key this environment does not give.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core import OPEN, ApiKey
from pipeline.journal import reading
from pipeline.runs.folder import Holder, holder_of

__all__ = ["FolderStatus", "folder_status"]


@dataclass(frozen=True, slots=True)
class FolderStatus:
    run_dir: Path
    holder: Holder | None  # the run holding the folder now
    by_status: dict[str, int]
    rows: int
    images: int
    cost_usd: float
    possible_duplicate_charges: int
    ingest_complete: bool
    images_by_state: dict[str, int]
    waiting_on_keys: dict[str, int]  # key name -> jobs in flight it alone can see end
    missing_keys: dict[str, int] = field(default_factory=dict)  # of those, keys not given
    reviews: dict[str, int] = field(default_factory=dict)  # approved, rejected, to_review
    checks: dict[str, Any] = field(default_factory=dict)  # Journal.check_counts

    @property
    def finished(self) -> bool:
        open_rows = sum(self.by_status.get(s.value, 0) for s in OPEN)
        return self.ingest_complete and open_rows == 0

    @property
    def state(self) -> str:
        """finished, running (a run holds the folder now), or stopped (resumable)."""
        if self.finished:
            return "finished"
        if self.holder is not None:
            return "running"
        return "stopped"


def folder_status(run_dir: Path, keys: list[ApiKey]) -> FolderStatus:
    """RunFolderError when `run_dir` holds no journal (or one that cannot be read)."""
    with reading(run_dir) as journal:
        totals, counts = journal.reports.totals(), journal.reports.counts()
        waiting, images = journal.reports.waiting_on_keys(), journal.reports.image_states()
        complete = journal.get_meta("ingest_complete") == "1"
        reviews = journal.reviews.review_counts()
        checks = journal.checks.check_counts()
    given = {k.name for k in keys}
    holder = holder_of(run_dir)
    return FolderStatus(
        run_dir=run_dir,
        holder=holder,
        by_status=counts,
        rows=int(totals["rows"]),
        images=int(totals["images"]),
        cost_usd=float(totals["cost_usd"]),
        possible_duplicate_charges=int(totals["possible_duplicate_charges"]),
        ingest_complete=complete,
        images_by_state=images,
        waiting_on_keys=waiting,
        # a run holding the folder polls its own jobs: only a stopped run's keys can be missing
        missing_keys={}
        if holder is not None
        else {k: n for k, n in waiting.items() if k not in given},
        reviews=reviews,
        checks=checks,
    )
