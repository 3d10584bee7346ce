"""What a run leaves behind, written from the journal in one step at its end: results.parquet,
the failures manifest, images.parquet, approved.csv and report.html. A failure of the report
leaves the rest standing (`wanbatch report` writes it again); any other is said in `problem`,
and loses nothing: the journal holds every row."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from pipeline.core import IMAGES, RESULTS
from pipeline.journal import Journal
from pipeline.outputs.approved import write_approved
from pipeline.outputs.html_report import write_report
from pipeline.outputs.results import ResultLayout, write_failures, write_images, write_results

__all__ = ["Wrote", "write_outputs"]

_log = structlog.get_logger("pipeline.outputs.writing")


@dataclass(frozen=True, slots=True)
class Wrote:
    failures: Path | None  # the failures manifest, when there are failed or rejected rows
    problem: str | None = None  # why the results are not whole, if they are not


def write_outputs(
    journal: Journal,
    layout: ResultLayout,
    run_dir: Path,
    price: float,
    report_columns: Sequence[str] = (),
) -> Wrote:
    """Every output file of the run folder from the journal (in a thread: it is all I/O)."""
    written = write_results(journal, layout, run_dir / RESULTS)
    problem = None
    if written.problem is not None:
        problem = (
            f"the manifest's own columns could not all be read again for the results "
            f"({written.problem}): some are empty"
        )
    failures = write_failures(journal, layout, run_dir)
    write_images(journal, layout, run_dir / IMAGES, price)
    write_approved(journal, run_dir)
    try:
        write_report(journal, run_dir, layout.id_column, report_columns)
    except (OSError, ValueError):  # the results stand without it; `wanbatch report` redoes it
        _log.exception("report_failed")
    return Wrote(failures, problem)
