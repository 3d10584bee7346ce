"""What a run leaves behind: the images kept, and the files written from the journal.

downloads.py    output images downloaded, checked and stored (a folder or a bucket)
results.py      results.parquet, images.parquet and the failures manifest
approved.py     approved.csv: the approved images, for the publishing step
removed.py      removed.csv: products an earlier night had and tonight's export has not
html_report.py  report.html
summary.py      the run's summary (RunSummary) and summary.json
closing.py      the closing summary's rows, for the terminal
writing.py      every output file of a run from the journal, at its end
publishing.py   `wanbatch publish`: approved edits copied for a channel, named for the catalog
tagging.py      the AI tag (IPTC DigitalSourceType in XMP) written into a copy and read back
"""

from __future__ import annotations

from pipeline.outputs.approved import write_approved
from pipeline.outputs.closing import checks_said, summary_rows
from pipeline.outputs.downloads import CopyCheck, Downloader, open_store, recheck_copies
from pipeline.outputs.html_report import write_report
from pipeline.outputs.publishing import PUBLISHED, Published, publish
from pipeline.outputs.removed import write_removed
from pipeline.outputs.results import (
    RESULTS_ROWS,
    RESULTS_RUN_ID,
    RESULTS_SUCCEEDED,
    ResultLayout,
    write_failures,
    write_images,
    write_results,
)
from pipeline.outputs.summary import Asked, RunSummary, finish_line, write_summary
from pipeline.outputs.writing import Wrote, write_outputs

__all__ = [
    "PUBLISHED",
    "RESULTS_ROWS",
    "RESULTS_RUN_ID",
    "RESULTS_SUCCEEDED",
    "Asked",
    "CopyCheck",
    "Downloader",
    "Published",
    "ResultLayout",
    "RunSummary",
    "Wrote",
    "checks_said",
    "finish_line",
    "open_store",
    "publish",
    "recheck_copies",
    "summary_rows",
    "write_approved",
    "write_failures",
    "write_images",
    "write_outputs",
    "write_removed",
    "write_report",
    "write_results",
    "write_summary",
]
