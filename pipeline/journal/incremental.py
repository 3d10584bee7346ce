"""The incremental state store: which inputs already succeeded, across runs and run folders.

A row's fingerprint (the model plus the canonical input it sends) names what was paid for; a
run with `incremental.enabled` looks each new row up here and, when that exact input already
succeeded, carries the earlier outputs over instead of sending it again. The store is a small
SQLite file the config names, so the nightly runs of one catalog share it; it is the only place
besides the journal that touches SQLite.

A run holds the store for its whole life (`fcntl.flock` on `<state>.lock`, released by the OS
however the process ends): two runs at once would each look an input up before the other has
recorded it, and both would pay for it. A second run is refused before it sends anything.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import astuple
from pathlib import Path
from typing import Any

from pipeline.core import ConfigError, PriorSuccess, StoredCopy
from pipeline.journal.tables import in_chunks

__all__ = ["StateStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS succeeded (
    fingerprint TEXT PRIMARY KEY,
    prediction_id TEXT,
    output_urls TEXT NOT NULL,
    predict_time_s REAL,
    finished_at REAL,
    run_dir TEXT NOT NULL,
    copies TEXT
);
CREATE TABLE IF NOT EXISTS catalog (
    job_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    status TEXT NOT NULL,
    prediction_id TEXT,
    review TEXT,
    path TEXT,
    seen_at REAL NOT NULL,
    removed_in TEXT
);
"""


class StateStore:
    def __init__(self, path: Path, *, hold: bool = False) -> None:
        """Open (or create) the store; ConfigError, before anything is sent, when it cannot be
        used as one. `hold`: a run's, held until `close()`; refused while another run holds
        it (an estimate only reads)."""
        self.path = path
        self._held: int | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if hold:
                self._held = _hold(path)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            self._release()
            raise ConfigError(f"incremental.state {path} cannot be opened: {exc}") from None
        self._lock = threading.Lock()
        try:
            with self._lock:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA busy_timeout=30000")  # other runs may share the store
                self._db.executescript(_SCHEMA)
                have = {row[1] for row in self._db.execute("PRAGMA table_info(succeeded)")}
                if "copies" not in have:  # a store made before stored images were kept
                    self._db.execute("ALTER TABLE succeeded ADD COLUMN copies TEXT")
                if "review" not in have:  # a store made before approvals were kept
                    self._db.execute("ALTER TABLE succeeded ADD COLUMN review TEXT")
                    self._db.execute("ALTER TABLE succeeded ADD COLUMN review_note TEXT")
        except sqlite3.Error as exc:
            self._db.close()
            self._release()
            raise ConfigError(
                f"incremental.state {path} cannot be used as the state store ({exc}); "
                "restore it, or name a new file"
            ) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._release()

    def _release(self) -> None:
        if self._held is not None:
            os.close(self._held)  # the lock goes with the descriptor
            self._held = None

    def lookup(self, fingerprints: Sequence[str]) -> dict[str, PriorSuccess]:
        """The earlier successes among `fingerprints`."""
        found: dict[str, PriorSuccess] = {}
        unique = list(dict.fromkeys(fingerprints))
        with self._lock:
            for chunk, marks in in_chunks(unique):
                for row in self._db.execute(
                    "SELECT fingerprint, prediction_id, output_urls, predict_time_s, finished_at,"
                    f" run_dir, copies, review, review_note FROM succeeded"
                    f" WHERE fingerprint IN ({marks})",
                    chunk,
                ):
                    copies = tuple(
                        None if c is None else StoredCopy(*c) for c in json.loads(row[6] or "[]")
                    )
                    found[row[0]] = PriorSuccess(
                        row[0],
                        row[1],
                        tuple(json.loads(row[2])),
                        row[3],
                        row[4],
                        row[5],
                        copies,
                        row[7] == "approved",
                        row[8],
                    )
        return found

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """The store held for one write transaction (other runs' reads wait for it), rolled
        back whole if it fails."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def record(self, successes: Iterable[PriorSuccess]) -> int:
        """Remember successes (the latest one wins for an input); how many were written."""
        rows = [
            (
                s.fingerprint,
                s.prediction_id,
                json.dumps(list(s.output_urls)),
                s.predict_time_s,
                s.finished_at,
                s.run_dir,
                json.dumps([None if c is None else astuple(c) for c in s.copies]),
            )
            for s in successes
        ]
        if not rows:
            return 0
        with self._writing() as db:
            db.executemany(
                "INSERT INTO succeeded(fingerprint, prediction_id, output_urls, predict_time_s,"
                " finished_at, run_dir, copies) VALUES(?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(fingerprint) DO UPDATE SET"
                # another edit of the input: the decision on the earlier one is not its
                " review=CASE WHEN prediction_id IS excluded.prediction_id THEN review END,"
                " review_note=CASE WHEN prediction_id IS excluded.prediction_id"
                " THEN review_note END, prediction_id=excluded.prediction_id,"
                " output_urls=excluded.output_urls, predict_time_s=excluded.predict_time_s,"
                " finished_at=excluded.finished_at, run_dir=excluded.run_dir,"
                " copies=excluded.copies",
                rows,
            )
        return len(rows)

    def approve(self, edits: Iterable[tuple[str, str | None]]) -> int:
        """Keep approvals (prediction id, note) beside their edits, for every input an edit
        stands for (its own, and those whose rejected edit it replaced), so that a later
        night that reuses it has it approved; how many were kept."""
        rows = [(note, prediction) for prediction, note in edits]
        with self._writing() as db:
            return sum(
                db.execute(
                    "UPDATE succeeded SET review='approved', review_note=? WHERE prediction_id=?",
                    row,
                ).rowcount
                for row in rows
            )

    def forget(self, edits: Iterable[tuple[str, str]]) -> int:
        """Forget rejected edits (fingerprint, prediction id), so that no later run carries a
        rejected edit over; an input whose remembered edit is another one keeps it. How many
        were forgotten."""
        pairs = list(edits)
        with self._writing() as db:
            return sum(
                db.execute(
                    "DELETE FROM succeeded WHERE fingerprint=? AND prediction_id=?", pair
                ).rowcount
                for pair in pairs
            )

    def present(self, run_id: str, rows: Iterable[tuple[Any, ...]]) -> None:
        """Tonight's catalog: each (job id, run folder, status, prediction id, review, stored
        path, time) seen by run `run_id`, a product removed earlier coming back included."""
        with self._writing() as db:
            db.executemany(
                "INSERT INTO catalog(job_id, run_id, run_dir, status, prediction_id, review,"
                " path, seen_at) VALUES(?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(job_id) DO UPDATE"
                " SET run_id=excluded.run_id, run_dir=excluded.run_dir,"
                " status=excluded.status, prediction_id=excluded.prediction_id,"
                " review=excluded.review, path=excluded.path, seen_at=excluded.seen_at,"
                " removed_in=NULL",
                [(r[0], run_id, *r[1:]) for r in rows],
            )

    def known_products(self, job_ids: Sequence[str]) -> set[str]:
        """Which of these ids an earlier night's catalog had."""
        found: set[str] = set()
        with self._lock:
            for chunk, marks in in_chunks(list(dict.fromkeys(job_ids))):
                found.update(
                    r[0]
                    for r in self._db.execute(
                        f"SELECT job_id FROM catalog WHERE job_id IN ({marks})", chunk
                    )
                )
        return found

    def removed(self, run_id: str) -> list[dict[str, Any]]:
        """The products an earlier run saw that run `run_id` (whose whole catalog is
        `present`) does not have: marked removed by it once, and listed again for it (a
        resume of the same run lists the same ones)."""
        with self._lock:
            self._db.execute(
                "UPDATE catalog SET removed_in=? WHERE run_id != ? AND removed_in IS NULL",
                (run_id, run_id),
            )
            found = self._db.execute(
                "SELECT job_id, run_dir, status, prediction_id, review, path, seen_at"
                " FROM catalog WHERE removed_in=? ORDER BY job_id",
                (run_id,),
            )
            names = [d[0] for d in found.description]
            return [dict(zip(names, row, strict=True)) for row in found.fetchall()]

    def latencies(self, limit: int) -> list[float]:
        """The predict times of the latest `limit` successes (what earlier runs learned)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT predict_time_s FROM succeeded WHERE predict_time_s > 0"
                " ORDER BY finished_at DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [float(r[0]) for r in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM succeeded").fetchone()[0])


def _hold(path: Path) -> int:
    """The store's lock, taken for this process: its descriptor. ConfigError when another run
    holds it, naming that run."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "a run starting"
        os.close(fd)
        raise ConfigError(
            f"incremental.state {path} is in use by another run ({holder}): two runs on one "
            "state store would each pay for the inputs they share. Run them one after the "
            "other, or give each catalog a state store of its own"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    return fd
