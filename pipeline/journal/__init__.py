"""The journal: every row's state in SQLite in the run folder, the run's memory across crashes.

file.py         the file: opening, meta values, updates applied, open jobs read
updates.py      the state changes (pending -> creating -> created -> an end; images)
commit.py       group commit: many slots' updates, one durable transaction
ingest.py       the manifest's rows in, deduplicated; a changed manifest reconciled
reports.py      read back: failures requeued, counts, totals, costs, rows for the outputs
reviews.py      a reviewer's decisions recorded, rejected edits requeued, approved images read
checks.py       the automatic checks' measures recorded, and what they decide
rows.py         the typed rows handed back (Entry, CostBooks)
tables.py       the tables, and the columns the readers take
incremental.py  the incremental state across nightly runs (StateStore)
"""

from __future__ import annotations

from pipeline.journal.checks import CheckTarget, Measured
from pipeline.journal.commit import Commits, GroupCommit
from pipeline.journal.incremental import StateStore
from pipeline.journal.ingest import unique
from pipeline.journal.reviews import ApprovedImage, Redo, ReviewTarget
from pipeline.journal.rows import CostBooks, Entry, ReportRow, of_edit, stem
from pipeline.journal.store import Journal, reading
from pipeline.journal.tables import in_chunks
from pipeline.journal.updates import (
    FailImage,
    Finish,
    MarkCreated,
    MarkCreating,
    MarkPending,
    NoteAmbiguous,
    NoteCancel,
    NoteResolution,
    StoreImage,
    Update,
)

__all__ = [
    "ApprovedImage",
    "CheckTarget",
    "Commits",
    "CostBooks",
    "Entry",
    "FailImage",
    "Finish",
    "GroupCommit",
    "Journal",
    "MarkCreated",
    "MarkCreating",
    "MarkPending",
    "Measured",
    "NoteAmbiguous",
    "NoteCancel",
    "NoteResolution",
    "Redo",
    "ReportRow",
    "ReviewTarget",
    "StateStore",
    "StoreImage",
    "Update",
    "in_chunks",
    "of_edit",
    "reading",
    "stem",
    "unique",
]
