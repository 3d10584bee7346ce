"""The journal: every job's state in SQLite (WAL) in the run folder; the only module on SQLite.

One row per manifest row, keyed by row number. A job goes pending -> creating (journaled before
the create is sent) -> created (prediction id journaled before the first poll) -> succeeded or
failed; a bad row is rejected at once. After a crash, `creating` means "a create may have been
paid for" and `created` means "re-attach by polling". Writes from many workers are grouped into
one durable transaction by `GroupCommit`, so a commit costs one fsync whatever the concurrency.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.core import JOURNAL, RunFolderError
from pipeline.journal.checks import Checks
from pipeline.journal.file import JournalFile
from pipeline.journal.ingest import Ingest
from pipeline.journal.reports import Reports
from pipeline.journal.reviews import Reviews

__all__ = ["Journal", "reading"]


class Journal(JournalFile):
    """The journal: its file, and its parts on that file: rows into it (`intake`), read back
    (`reports`), a person's review of the edits (`reviews`) and the automatic checks'
    (`checks`); opened by the run and closed by it."""

    def __init__(self, path: Path, *, readonly: bool = False, share_seeded: bool = False) -> None:
        super().__init__(path, readonly=readonly, share_seeded=share_seeded)
        self.intake = Ingest(self)
        self.reports = Reports(self)
        self.reviews = Reviews(self)
        self.checks = Checks(self)


@contextmanager
def reading(run_dir: Path) -> Iterator[Journal]:
    """A run folder's journal opened read-only (`wanbatch status`, `wanbatch report`, while a
    run may hold it), closed after; RunFolderError when there is none, or when it cannot be
    read as a database."""
    path = run_dir / JOURNAL
    if not path.is_file():
        raise RunFolderError(f"{run_dir} holds no run (no {JOURNAL})")
    journal = Journal(path, readonly=True)
    try:
        yield journal
    except sqlite3.DatabaseError as exc:
        raise RunFolderError(f"journal {path} cannot be read: {exc}") from None
    finally:
        journal.close()
