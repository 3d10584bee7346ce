"""The catalog in: rows read, mapped to the provider's input and checked, inputs judged.

manifest.py    CSV, TSV and Parquet manifests (and DataFrames) read in batches
rowmap.py      a row to a JobSpec or a Rejected naming its field and rule
inputs.py      local and bucket inputs read, judged and uploaded; public ones probed
estimating.py  `wanbatch estimate`'s count: what a run would send, cost and take
names.py       the names a config gives, checked against the header before anything is read
decisions.py   a reviewer's decisions file (`retry --rejected`), read and checked
where.py       `manifest.where`: the row filter's own small parser (no Python evaluated)
urls.py        an image cell tidied into what a person would send, or why it cannot be
layouts.py     `wanbatch init`: an export recognised by its header, and its starter config
shape.py       exports not read in place (a workbook, Parquet parts, a row per image), copied
feeding.py     the catalog read into the journal: a run's ingest, and --force's reconcile
"""

from __future__ import annotations

from pipeline.intake.decisions import read_decisions, refused
from pipeline.intake.estimating import Estimate, count_rows, plan_sends
from pipeline.intake.feeding import Reuse, feed, reconcile
from pipeline.intake.inputs import Uploads
from pipeline.intake.layouts import read_header, recognise, starter_config
from pipeline.intake.manifest import Manifest
from pipeline.intake.shape import shape_catalog

__all__ = [
    "Estimate",
    "Manifest",
    "Reuse",
    "Uploads",
    "count_rows",
    "feed",
    "plan_sends",
    "read_decisions",
    "read_header",
    "recognise",
    "reconcile",
    "refused",
    "shape_catalog",
    "starter_config",
]
