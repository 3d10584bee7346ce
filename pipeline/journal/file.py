"""The journal file itself: SQLite (WAL) in the run folder, where the run's state is kept."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.core import (
    JournalDamaged,
)
from pipeline.journal.rows import Entry, _entry
from pipeline.journal.tables import _ADDED, _ADDED_IMAGES, _OPEN, _SCHEMA, in_chunks
from pipeline.journal.updates import Update


class JournalFile:
    """The journal file: opening (and adding columns an older journal lacks), its meta values,
    the state changes applied to it and the open jobs read from it. Synchronous; every call
    takes the lock (callers use threads)."""

    def __init__(self, path: Path, *, readonly: bool = False, share_seeded: bool = False) -> None:
        """Open (or create) the journal; `readonly` only reads it (`wanbatch status`, while
        a run may hold it), never changing the file. `share_seeded` (manifest.dedupe): rows
        with the same seeded input share one job."""
        self.path = path
        self._lock = threading.Lock()
        self.share_seeded = share_seeded
        if readonly:
            self._db = sqlite3.connect(
                f"{path.absolute().as_uri()}?mode=ro", uri=True, check_same_thread=False
            )
            self._db.row_factory = sqlite3.Row
            self._shadow_added()
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        try:
            with self._lock:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA busy_timeout=10000")
                self._db.executescript(_SCHEMA)
                have = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
                for name, kind in _ADDED.items():
                    if name not in have:
                        self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
                have = {r[1] for r in self._db.execute("PRAGMA table_info(images)")}
                for name, kind in _ADDED_IMAGES.items():
                    if name not in have:
                        self._db.execute(f"ALTER TABLE images ADD COLUMN {name} {kind}")
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise JournalDamaged(f"journal {path} cannot be opened as a database: {exc}") from None

    @property
    def db(self) -> sqlite3.Connection:
        """The connection, for the journal's parts (each takes `lock` around its use)."""
        return self._db

    @property
    def lock(self) -> threading.Lock:
        return self._lock

    def known_predictions(self, ids: Collection[str]) -> set[str]:
        """Which of these prediction ids are a row's job in the journal."""
        known = set[str]()
        with self._lock:
            for chunk, marks in in_chunks(list(ids)):
                rows = self._db.execute(
                    f"SELECT prediction_id FROM jobs WHERE prediction_id IN ({marks})", chunk
                )
                known.update(str(r[0]) for r in rows)
        return known

    def _shadow_added(self) -> None:
        """A journal read as it is, made before some columns were added: a temporary view
        of its jobs with each missing column at its default (the file is not changed)."""
        try:
            have = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
        except sqlite3.DatabaseError:
            return  # damaged: its readers say so
        missing = [name for name in _ADDED if have and name not in have]
        if missing:
            added = ", ".join(
                f"{'0' if 'DEFAULT 0' in _ADDED[name] else 'NULL'} AS {name}" for name in missing
            )
            self._db.execute(f"CREATE TEMP VIEW jobs AS SELECT *, {added} FROM main.jobs")
        have = {r[1] for r in self._db.execute("PRAGMA table_info(images)")}
        missing = [name for name in _ADDED_IMAGES if have and name not in have]
        if missing:
            added = ", ".join(f"NULL AS {name}" for name in missing)
            self._db.execute(f"CREATE TEMP VIEW images AS SELECT *, {added} FROM main.images")

    def damage(self) -> str | None:
        """What SQLite's integrity check finds wrong with the file, or None when it is sound.
        Its quick form: every page and record is read and checked, but not each index against
        its table, a third of the time (0.5 s for a million jobs)."""
        try:
            with self._lock:
                found = [str(r[0]) for r in self._db.execute("PRAGMA quick_check(5)")]
        except sqlite3.DatabaseError as exc:
            return str(exc)
        return None if found == ["ok"] else "; ".join(found)

    def image_pages(
        self, select: str, where: str, params: tuple[Any, ...], batch_size: int
    ) -> Iterator[list[sqlite3.Row]]:
        """Images (`select` from `images i`) matching `where`, in row and image order, a batch
        at a time (keyset paging, as `_pages` does for jobs)."""
        after = (0, -1)
        while True:
            with self._lock:
                batch = self._db.execute(
                    f"{select} WHERE ({where}) AND (i.row_number, i.idx) > (?, ?)"
                    " ORDER BY i.row_number, i.idx LIMIT ?",
                    (*params, *after, batch_size),
                ).fetchall()
            if not batch:
                return
            yield batch
            after = (batch[-1]["row_number"], batch[-1]["idx"])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get_meta(self, name: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, values: dict[str, str]) -> None:
        with self._lock, self.transaction():
            self._db.executemany(
                "INSERT INTO meta(name, value) VALUES(?, ?)"
                " ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                list(values.items()),
            )

    def last_row(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(row_number) FROM jobs").fetchone()
        return int(row[0] or 0)

    def open_entries(self, rows: Collection[int]) -> list[Entry]:
        """The jobs of `rows` that are not finished, in row order (a lost worker's jobs)."""
        wanted = sorted(rows)
        found: list[Entry] = []
        for chunk, marks in in_chunks(wanted):
            with self._lock:
                found += [
                    _entry(r)
                    for r in self._db.execute(
                        f"SELECT * FROM jobs WHERE status IN (?, ?, ?) AND row_number IN"
                        f" ({marks}) ORDER BY row_number",
                        (*_OPEN, *chunk),
                    )
                ]
        return found

    def open_jobs(self, after_row: int, limit: int) -> list[Entry]:
        """Jobs not finished, in row order, after `after_row`."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE status IN (?, ?, ?) AND row_number > ?"
                " AND follows IS NULL ORDER BY row_number LIMIT ?",
                (*_OPEN, after_row, limit),
            ).fetchall()
        return [_entry(r) for r in rows]

    def apply(self, updates: Sequence[Update]) -> None:
        with self._lock, self.transaction():
            for update in updates:
                update.apply(self._db)

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self._db = db

        def __enter__(self) -> None:
            self._db.execute("BEGIN IMMEDIATE")

        def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
            self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")

    def transaction(self) -> JournalFile._Tx:
        return JournalFile._Tx(self._db)
