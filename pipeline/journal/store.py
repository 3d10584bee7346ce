"""The journal: every job's state in SQLite (WAL) in the run folder; the only module on SQLite.

One row per manifest row, keyed by row number. A job goes pending -> creating (journaled before
the create is sent) -> created (prediction id journaled before the first poll) -> succeeded or
failed; a bad row is rejected at once. After a crash, `creating` means "a create may have been
paid for" and `created` means "re-attach by polling". Writes from many workers are grouped into
one durable transaction by `GroupCommit`, so a commit costs one fsync whatever the concurrency.
"""

from __future__ import annotations

from pipeline.journal.ingest import Ingest
from pipeline.journal.reports import Reports

__all__ = ["Journal"]


class Journal(Ingest, Reports):
    """The journal: its file (`JournalFile`), rows into it (`Ingest`) and read back
    (`Reports`); one object, opened by the run and closed by it."""
