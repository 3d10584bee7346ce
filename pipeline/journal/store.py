"""The journal: every job's state in SQLite (WAL) in the run folder; the only module on SQLite.

One row per manifest row, keyed by row number. A job goes pending -> creating (journaled before
the create is sent) -> created (prediction id journaled before the first poll) -> succeeded or
failed; a bad row is rejected at once. After a crash, `creating` means "a create may have been
paid for" and `created` means "re-attach by polling". Writes from many workers are grouped into
one durable transaction by `GroupCommit`, so a commit costs one fsync whatever the concurrency.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio

from pipeline.core import (
    UPLOAD_TOKEN,
    JobOutcome,
    JobSpec,
    JournalDamaged,
    PriorSuccess,
    Rejected,
    Status,
    StoredCopy,
)

__all__ = [
    "TRANSIENT_ERRORS",
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
    "NoteAmbiguous",
    "NoteCancel",
    "StoreImage",
    "Update",
    "unique",
]

# Failures that say nothing about the row itself: `wanbatch retry` runs these by default.
TRANSIENT_ERRORS = frozenset(
    {"server_error", "transport", "rate_limited", "protocol", "timeout", "job_error"}
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    row_number INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE,
    fingerprint TEXT,
    inputs TEXT,
    record TEXT NOT NULL,
    status TEXT NOT NULL,
    prediction_id TEXT,
    key_name TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    ambiguous INTEGER NOT NULL DEFAULT 0,
    output_urls TEXT,
    images INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    predict_time_s REAL,
    error_type TEXT,
    error_message TEXT,
    started_at REAL,
    created_at REAL,
    finished_at REAL,
    reused INTEGER NOT NULL DEFAULT 0,
    history TEXT,
    error_code TEXT,
    cancel_accepted INTEGER,
    follows INTEGER,
    provider_cost_usd REAL,
    priced_cost_usd REAL,
    unconfirmed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_open ON jobs(status, row_number);
CREATE INDEX IF NOT EXISTS jobs_fingerprint ON jobs(fingerprint) WHERE fingerprint IS NOT NULL;
CREATE TABLE IF NOT EXISTS images (
    row_number INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    url TEXT NOT NULL,
    state TEXT NOT NULL,
    path TEXT,
    sha256 TEXT,
    bytes INTEGER,
    width INTEGER,
    height INTEGER,
    format TEXT,
    error TEXT,
    PRIMARY KEY (row_number, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS images_state ON images(state, row_number);
"""
# columns added since the first journals: a journal made before them gets them on opening
_ADDED = {
    "error_code": "TEXT",
    "cancel_accepted": "INTEGER",
    "follows": "INTEGER",
    "provider_cost_usd": "REAL",
    "priced_cost_usd": "REAL",
    "unconfirmed": "INTEGER NOT NULL DEFAULT 0",
}
# a job that may exist at the provider with no end seen: its cost may be billed
_UNCONFIRMED = "(status IN ('creating', 'created') OR unconfirmed = 1)"

# made once: json.dumps with any argument of its own builds a new encoder on every call
_RECORD = json.JSONEncoder(default=str, ensure_ascii=False).encode
_INPUTS = json.JSONEncoder(ensure_ascii=False).encode

# REAL values are written with 15 significant digits: every one here is rounded well below that
_RESULT_COLUMNS = (
    """row_number, record, inputs, history, json_object(
    'job_id', job_id, 'row_number', row_number, 'status', status,
    'prediction_id', prediction_id,
    'output_urls', json(COALESCE(NULLIF(output_urls, ''), '[]')),
    'images', images, 'cost_usd', cost_usd, 'provider_cost_usd', provider_cost_usd,
    'priced_cost_usd', COALESCE(priced_cost_usd, cost_usd),
    'unconfirmed', json(CASE WHEN """
    + _UNCONFIRMED
    + """ THEN 'true' ELSE 'false' END),
    'predict_time_s', predict_time_s,
    'latency_s', CASE WHEN started_at AND finished_at THEN round(finished_at - started_at, 4) END,
    'attempts', attempts, 'ambiguous_creates', ambiguous,
    'possible_duplicate_charge', json(CASE WHEN ambiguous > 0 THEN 'true' ELSE 'false' END),
    'reused', json(CASE WHEN reused THEN 'true' ELSE 'false' END),
    'error_type', error_type, 'error_code', error_code, 'error_message', error_message,
    'cancel_accepted', json(CASE cancel_accepted WHEN 1 THEN 'true' WHEN 0 THEN 'false' END),
    'created_at', CASE WHEN created_at THEN CAST(created_at * 1000000 AS INTEGER) END,
    'finished_at', CASE WHEN finished_at THEN CAST(finished_at * 1000000 AS INTEGER) END,
    'key', key_name
) AS outcome, (
    SELECT json_object(
        'path', json_group_array(path), 'sha256', json_group_array(sha256),
        'bytes', json_group_array(bytes), 'width', json_group_array(width),
        'height', json_group_array(height), 'state', json_group_array(state)
    ) FROM (SELECT * FROM images WHERE images.row_number = jobs.row_number ORDER BY idx)
) AS stored"""
)

_OPEN = (Status.PENDING.value, Status.CREATING.value, Status.CREATED.value)
# the images a job asks for, from its journaled input (a rejected row has none)
_WANTED = "COALESCE(json_extract(inputs, '$.n'), 1)"


@dataclass(frozen=True, slots=True)
class CostBooks:
    """The run's cost as the provider's word and as ours: `confirmed_usd` is what the results
    record (each job's end seen by a poll); `provider_usd` the part the provider stated
    (`metrics.cost`), `priced_usd` our price times images; `mismatched` jobs where the two
    differ. `unconfirmed` jobs may exist with no end seen, `unconfirmed_images` the most they
    may have made; `ambiguous_images` the most that lost creates may have made."""

    confirmed_usd: float
    provider_usd: float
    priced_usd: float
    mismatched: int
    unconfirmed: int
    unconfirmed_images: int
    ambiguous_images: int
    creating_images: int = 0  # of rows left `creating`: a create sent, its answer not seen

    def possibly_billed_usd(self, price_per_image_usd: float) -> float:
        """The most the provider may have billed beyond `confirmed_usd`."""
        images = self.unconfirmed_images + self.ambiguous_images
        return round(images * price_per_image_usd, 6)

    def lost_spend_usd(self, price_per_image_usd: float) -> float:
        """What creates whose answers were lost (counted, or left `creating` by a crash) may
        have been billed: spent, as far as a budget knows. A job that is journaled `created`
        is not in it: its next poll books it, and its row's reservation covers it."""
        return round((self.ambiguous_images + self.creating_images) * price_per_image_usd, 6)


# no create of the row's inputs is out
_UNSENT = (Status.PENDING.value, Status.REJECTED.value, Status.SKIPPED.value)


@dataclass(frozen=True, slots=True)
class Entry:
    """A job as the journal holds it: what to send and how far it got."""

    row_number: int
    job_id: str
    fingerprint: str
    inputs: dict[str, Any]
    record: dict[str, Any]
    status: Status
    prediction_id: str | None
    key_name: str | None
    attempts: int
    ambiguous: int
    started_at: float | None

    @property
    def spec(self) -> JobSpec:
        return JobSpec(self.job_id, self.row_number, self.inputs, self.record, self.fingerprint)


class Update:
    """One change to one job; applied inside a transaction."""

    def apply(self, db: sqlite3.Connection) -> None:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class MarkCreating(Update):
    row_number: int
    attempt: int
    key_name: str
    at: float

    def apply(self, db: sqlite3.Connection) -> None:
        db.execute(
            "UPDATE jobs SET status=?, attempts=?, key_name=?, started_at=COALESCE(started_at, ?)"
            " WHERE row_number=?",
            (Status.CREATING.value, self.attempt, self.key_name, self.at, self.row_number),
        )


@dataclass(frozen=True, slots=True)
class MarkCreated(Update):
    row_number: int
    prediction_id: str
    key_name: str
    at: float

    def apply(self, db: sqlite3.Connection) -> None:
        db.execute(
            "UPDATE jobs SET status=?, prediction_id=?, key_name=?, created_at=?"
            " WHERE row_number=?",
            (Status.CREATED.value, self.prediction_id, self.key_name, self.at, self.row_number),
        )


@dataclass(frozen=True, slots=True)
class NoteAmbiguous(Update):
    """A create whose answer was lost: it may have made (and billed) a job we cannot see."""

    row_number: int

    def apply(self, db: sqlite3.Connection) -> None:
        db.execute("UPDATE jobs SET ambiguous=ambiguous+1 WHERE row_number=?", (self.row_number,))


@dataclass(frozen=True, slots=True)
class MarkPending(Update):
    """Nothing was created (e.g. the key was refused): the row goes back to be done later."""

    row_number: int

    def apply(self, db: sqlite3.Connection) -> None:
        db.execute(
            "UPDATE jobs SET status=? WHERE row_number=?", (Status.PENDING.value, self.row_number)
        )


@dataclass(frozen=True, slots=True)
class Finish(Update):
    """A job's end. Its cost is the provider's figure where a poll gave one, our price times
    images beside it. A cancel asked for earlier (a run stopped for good) is judged by the end
    a poll saw: accepted only when the job ended `cancelled`."""

    row_number: int
    outcome: JobOutcome
    price_per_image_usd: float

    def apply(self, db: sqlite3.Connection) -> None:
        o = self.outcome
        images = len(o.output_urls) if o.status is Status.SUCCEEDED else 0
        price = self.price_per_image_usd
        db.execute(
            "UPDATE jobs SET status=:status, prediction_id=COALESCE(:pid, prediction_id),"
            " output_urls=:urls, images=:images, cost_usd=:cost,"
            " provider_cost_usd=:provider, priced_cost_usd=:priced, unconfirmed=:unconfirmed,"
            " predict_time_s=:took, error_type=:type, error_message=:message,"
            " finished_at=:at, error_code=:code, cancel_accepted=CASE"
            " WHEN :accepted IS NOT NULL THEN :accepted"
            " WHEN cancel_accepted IS NULL OR :ended IS NULL THEN cancel_accepted"
            " ELSE :ended = 'cancelled' END WHERE row_number=:row",
            {
                "status": o.status.value,
                "pid": o.prediction_id,
                "urls": json.dumps(list(o.output_urls)),
                "images": images,
                "cost": o.cost(price),
                "provider": o.provider_cost_usd,
                "priced": o.priced(price),
                "unconfirmed": int(o.unconfirmed),
                "took": o.predict_time_s,
                "type": o.error_type,
                "message": o.error_message,
                "at": o.finished_at,
                "code": o.error_code,
                "accepted": o.cancel_accepted,
                "ended": o.ended,
                "row": self.row_number,
            },
        )
        if o.status is Status.SUCCEEDED:  # its outputs, to be downloaded and stored
            db.execute("DELETE FROM images WHERE row_number=?", (self.row_number,))
            db.executemany(
                "INSERT INTO images(row_number, idx, url, state) VALUES(?, ?, ?, 'pending')",
                [(self.row_number, i, url) for i, url in enumerate(o.output_urls)],
            )


@dataclass(frozen=True, slots=True)
class StoreImage(Update):
    """An output image downloaded, verified and stored."""

    row_number: int
    index: int
    path: str
    sha256: str
    size: int
    width: int
    height: int
    format: str

    def apply(self, db: sqlite3.Connection) -> None:
        db.execute(
            "UPDATE images SET state='stored', path=?, sha256=?, bytes=?, width=?, height=?,"
            " format=?, error=NULL WHERE row_number=? AND idx=?",
            (
                self.path,
                self.sha256,
                self.size,
                self.width,
                self.height,
                self.format,
                self.row_number,
                self.index,
            ),
        )


@dataclass(frozen=True, slots=True)
class FailImage(Update):
    """An output image that could not be downloaded or stored this time: why."""

    row_number: int
    index: int
    error: str

    def apply(self, db: sqlite3.Connection) -> None:
        db.execute(
            "UPDATE images SET state='failed', error=? WHERE row_number=? AND idx=?",
            (self.error, self.row_number, self.index),
        )


@dataclass(frozen=True, slots=True)
class NoteCancel(Update):
    """A cancel was asked for the job's prediction; whether the provider accepted it. A job
    that a poll saw end before this note is judged by that end (accepted only if it ended
    cancelled), never by the cancel's answer."""

    row_number: int
    accepted: bool

    def apply(self, db: sqlite3.Connection) -> None:
        db.execute(
            "UPDATE jobs SET cancel_accepted=CASE WHEN status IN (:creating, :created)"
            " THEN :accepted ELSE status = :failed AND error_type IN ('cancelled', 'timeout')"
            " END WHERE row_number=:row",
            {
                "creating": Status.CREATING.value,
                "created": Status.CREATED.value,
                "failed": Status.FAILED.value,
                "accepted": int(self.accepted),
                "row": self.row_number,
            },
        )


def unique(item: JobSpec | Rejected, known: dict[str, int]) -> JobSpec | Rejected:
    """The item, or its rejection when another row has its job id already (`known`: job id
    -> the row that has it first, updated)."""
    first = known.get(item.job_id)
    if first is not None and first != item.row_number:
        return Rejected(
            f"{item.job_id}#row-{item.row_number}",
            item.row_number,
            item.record,
            f"row {item.row_number}: id {item.job_id!r} repeats row {first} "
            "(each row needs its own id)",
        )
    known[item.job_id] = item.row_number
    return item


def _copies(count: int, found: str | None, run_dir: str) -> tuple[StoredCopy | None, ...]:
    """The stored copy of each of `count` outputs, by index (None where not stored)."""
    copies: list[StoredCopy | None] = [None] * count
    for idx, path, *rest in json.loads(found or "[]"):
        if 0 <= idx < count:
            where = path if "://" in path or Path(path).is_absolute() else str(Path(run_dir, path))
            copies[idx] = StoredCopy(where, *rest)
    return tuple(copies)


def _entry(row: sqlite3.Row) -> Entry:
    return Entry(
        row_number=row["row_number"],
        job_id=row["job_id"],
        fingerprint=row["fingerprint"],
        inputs=json.loads(row["inputs"]),
        record=json.loads(row["record"]),
        status=Status(row["status"]),
        prediction_id=row["prediction_id"],
        key_name=row["key_name"],
        attempts=row["attempts"],
        ambiguous=row["ambiguous"],
        started_at=row["started_at"],
    )


class Journal:
    """Synchronous access to the journal file; every call takes the lock (callers use threads)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        """Open (or create) the journal; `readonly` only reads it (`wanbatch status`, while
        a run may hold it), never changing the file."""
        self.path = path
        self._lock = threading.Lock()
        self.share_seeded = False  # manifest.dedupe: rows with the same seeded input share one job
        if readonly:
            self._db = sqlite3.connect(
                f"{path.absolute().as_uri()}?mode=ro", uri=True, check_same_thread=False
            )
            self._db.row_factory = sqlite3.Row
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
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise JournalDamaged(f"journal {path} cannot be opened as a database: {exc}") from None

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

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- meta -------------------------------------------------------------------------------

    def get_meta(self, name: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, values: dict[str, str]) -> None:
        with self._lock, self._transaction():
            self._db.executemany(
                "INSERT INTO meta(name, value) VALUES(?, ?)"
                " ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                list(values.items()),
            )

    # -- ingest -----------------------------------------------------------------------------

    def last_row(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(row_number) FROM jobs").fetchone()
        return int(row[0] or 0)

    def ingest(
        self,
        batch: Sequence[JobSpec | Rejected],
        meta: dict[str, str],
        prior: Mapping[str, PriorSuccess] | None = None,
    ) -> list[tuple[int, str, int, str]]:
        """Add manifest rows (and ingest progress in `meta`) in one transaction. A repeated
        job id is rejected, naming the row that has it first. A row whose fingerprint is in
        `prior` is journaled as succeeded with the earlier outputs, reused, at no cost; the
        outputs whose stored copies are gone are returned, to be fetched again."""
        with self._lock, self._transaction():
            fetch = self._insert(batch, prior or {})
            self._db.executemany(
                "INSERT INTO meta(name, value) VALUES(?, ?)"
                " ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                list(meta.items()),
            )
        return fetch

    def reconcile(
        self, batch: Sequence[JobSpec | Rejected], prior: Mapping[str, PriorSuccess] | None = None
    ) -> Counter[str]:
        """`--force`: journal the manifest as it is now, a batch at a time. A row never sent
        (pending or rejected) takes its current inputs (`updated` when they changed); a row
        already sent keeps what was sent (`changed_after_sent` when the manifest now says
        otherwise); a new row is added (`added`). See `drop_unseen` for rows that went away."""
        found: Counter[str] = Counter()
        if not batch:
            return found
        prior = prior or {}
        with self._lock, self._transaction():
            db = self._db
            db.execute("CREATE TEMP TABLE IF NOT EXISTS seen(row_number INTEGER PRIMARY KEY)")
            db.executemany(
                "INSERT OR IGNORE INTO seen VALUES (?)", [(i.row_number,) for i in batch]
            )
            held = {
                r["row_number"]: r
                for r in db.execute(
                    "SELECT row_number, status, record FROM jobs WHERE row_number BETWEEN ? AND ?",
                    (batch[0].row_number, batch[-1].row_number),
                )
            }
            known = self._known_ids({item.job_id for item in batch})
            added, updates, reused = [], [], []
            for item in batch:
                old = held.get(item.row_number)
                if old is None:
                    added.append(item)
                    continue
                changed = _RECORD(item.record) != old["record"]
                if old["status"] in _UNSENT:
                    taken = unique(item, known)
                    row = self._ingest_row(taken, prior)
                    updates.append((*row[1:], item.row_number))
                    reused.append(taken)
                    found["updated"] += changed
                else:
                    found["changed_after_sent"] += changed
            db.executemany(
                "UPDATE jobs SET job_id=?, fingerprint=?, inputs=?, record=?, status=?,"
                " error_type=?, error_message=?, prediction_id=?, output_urls=?, images=?,"
                " predict_time_s=?, finished_at=?, reused=?, follows=NULL WHERE row_number=?",
                updates,
            )
            db.executemany("DELETE FROM images WHERE row_number=?", [(u[-1],) for u in updates])
            self._reused_images(reused, prior)  # fetched by the run (they are pending)
            if self.share_seeded:  # rows taken as they are now share a seeded input as new ones do
                leaders = self._leaders(reused, prior)
                db.executemany(
                    "UPDATE jobs SET follows=? WHERE row_number=? AND status=?",
                    [(lead, row, Status.PENDING.value) for row, lead in leaders.items()],
                )
            self._insert(added, prior)
            found["added"] += len(added)
        return found

    def drop_unseen(self) -> Counter[str]:
        """After `reconcile` has seen the whole manifest: rows it no longer has. One never sent
        and without a trace is dropped (`dropped`); one that may have been paid for is kept
        (`kept`), and if it was not finished it ends failed (`not_in_manifest`), never sent."""
        unseen = "row_number NOT IN (SELECT row_number FROM seen)"
        with self._lock, self._transaction():
            db = self._db
            db.execute("CREATE TEMP TABLE IF NOT EXISTS seen(row_number INTEGER PRIMARY KEY)")
            dropped = db.execute(
                f"DELETE FROM jobs WHERE {unseen} AND status IN (?, ?, ?) AND ambiguous=0"
                " AND history IS NULL",
                _UNSENT,
            ).rowcount
            kept = db.execute(f"SELECT COUNT(*) FROM jobs WHERE {unseen}").fetchone()[0]
            db.execute(
                # a `creating` row's create may have been billed: it counts as ambiguous
                f"UPDATE jobs SET ambiguous=ambiguous+(status=:creating), status=:failed,"
                " error_type='not_in_manifest', error_message='the row is no longer in the"
                f" manifest (--force)', finished_at=:now WHERE {unseen}"
                " AND status IN (:pending, :creating)",
                {
                    "creating": Status.CREATING.value,
                    "pending": Status.PENDING.value,
                    "failed": Status.FAILED.value,
                    "now": time.time(),
                },
            )
            db.execute("DROP TABLE seen")
        return Counter(dropped=dropped, kept=int(kept))

    def _known_ids(self, ids: Collection[str]) -> dict[str, int]:
        """Which of these job ids the journal has, and on which row."""
        listed = list(ids)
        known: dict[str, int] = {}
        for start in range(0, len(listed), 500):
            chunk = listed[start : start + 500]
            marks = ",".join("?" * len(chunk))
            known.update(
                self._db.execute(
                    f"SELECT job_id, row_number FROM jobs WHERE job_id IN ({marks})", chunk
                ).fetchall()
            )
        return known

    def _insert(
        self, batch: Sequence[JobSpec | Rejected], prior: Mapping[str, PriorSuccess]
    ) -> list[tuple[int, str, int, str]]:
        known = self._known_ids({item.job_id for item in batch})
        items = [unique(item, known) for item in batch]
        leaders = self._leaders(items, prior) if self.share_seeded else {}
        rows = [(*self._ingest_row(i, prior), leaders.get(i.row_number)) for i in items]
        self._db.executemany(
            "INSERT INTO jobs(row_number, job_id, fingerprint, inputs, record, status,"
            " error_type, error_message, prediction_id, output_urls, images,"
            " predict_time_s, finished_at, reused, follows)"
            " VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        return self._reused_images(items, prior)

    def _reused_images(
        self, items: Sequence[JobSpec | Rejected], prior: Mapping[str, PriorSuccess]
    ) -> list[tuple[int, str, int, str]]:
        """The images of rows reused from an earlier run: its stored copies where they are
        still there, else pending (row, job id, index, URL returned) to be fetched again."""
        rows, fetch = [], []
        for item in items:
            done = prior.get(item.fingerprint) if isinstance(item, JobSpec) else None
            if done is None:
                continue
            for idx, url in enumerate(done.output_urls):
                copy = done.copies[idx] if idx < len(done.copies) else None
                if copy is None:
                    rows.append((item.row_number, idx, url, "pending", *[None] * 6))
                    fetch.append((item.row_number, item.job_id, idx, url))
                else:
                    rows.append((item.row_number, idx, url, "stored", *astuple(copy)))
        self._db.executemany(
            "INSERT OR REPLACE INTO images(row_number, idx, url, state, path, sha256, bytes,"
            " width, height, format) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        return fetch

    def _leaders(
        self, items: Sequence[JobSpec | Rejected], prior: Mapping[str, PriorSuccess]
    ) -> dict[int, int]:
        """Rows whose exact input, seed included, an earlier row of this run already sends:
        the row each follows. Without a seed, each row is a new draw and is sent."""
        seeded = [
            i
            for i in items
            if isinstance(i, JobSpec) and "seed" in i.inputs and i.fingerprint not in prior
        ]
        if not seeded:
            return {}
        prints = list({i.fingerprint for i in seeded})
        first: dict[str, int] = {}
        for start in range(0, len(prints), 500):
            chunk = prints[start : start + 500]
            marks = ",".join("?" * len(chunk))
            first.update(
                self._db.execute(
                    f"SELECT fingerprint, MIN(row_number) FROM jobs WHERE fingerprint IN ({marks})"
                    " AND follows IS NULL AND status != ? GROUP BY fingerprint",
                    (*chunk, Status.REJECTED.value),
                ).fetchall()
            )
        follows: dict[int, int] = {}
        for item in seeded:
            leader = first.setdefault(item.fingerprint, item.row_number)
            if leader != item.row_number:
                follows[item.row_number] = leader
        return follows

    def settle_followers(self) -> None:
        """Rows that share a seeded input with an earlier row take its end: its outputs (and
        stored images), reused and at no cost, or its failure. Those whose leader has not
        ended wait for a later run."""
        done, failed = Status.SUCCEEDED.value, Status.FAILED.value
        with self._lock, self._transaction():
            db = self._db
            db.execute(
                "UPDATE jobs SET status=l.status, prediction_id=l.prediction_id,"
                " output_urls=l.output_urls, images=l.images, cost_usd=0, reused=1,"
                " predict_time_s=l.predict_time_s, finished_at=l.finished_at"
                " FROM (SELECT row_number AS lead, status, prediction_id, output_urls, images,"
                " predict_time_s, finished_at FROM jobs WHERE status=?) AS l"
                " WHERE jobs.follows = l.lead AND jobs.status=?",
                (done, Status.PENDING.value),
            )
            db.execute(
                "UPDATE jobs SET status=l.status, error_type=l.error_type,"
                " error_code=l.error_code, finished_at=l.finished_at,"
                " error_message='shares its input with row ' || l.lead || ', which failed: '"
                " || COALESCE(l.error_message, '')"
                " FROM (SELECT row_number AS lead, status, error_type, error_code, error_message,"
                " finished_at FROM jobs WHERE status=?) AS l"
                " WHERE jobs.follows = l.lead AND jobs.status=?",
                (failed, Status.PENDING.value),
            )
            db.execute(
                "INSERT OR REPLACE INTO images(row_number, idx, url, state, path, sha256, bytes,"
                " width, height, format, error) SELECT f.row_number, i.idx, i.url, i.state,"
                " i.path, i.sha256, i.bytes, i.width, i.height, i.format, i.error"
                " FROM jobs f JOIN images i ON i.row_number = f.follows WHERE f.status=?",
                (done,),
            )

    @staticmethod
    def _ingest_row(item: JobSpec | Rejected, prior: Mapping[str, PriorSuccess]) -> tuple[Any, ...]:
        """The INSERT values of one row: what it is, then its outcome so far."""
        record = _RECORD(item.record)
        if isinstance(item, Rejected):  # never sent: a rule broken, or skipped on purpose
            status = Status.SKIPPED if item.skipped else Status.REJECTED
            kind = None if item.skipped else "invalid_row"
            rejected = (item.row_number, item.job_id, None, None, record, status.value)
            return (*rejected, kind, item.reason, None, None, 0, None, None, 0)
        inputs = _INPUTS(item.inputs)
        head = (item.row_number, item.job_id, item.fingerprint, inputs, record)
        done = prior.get(item.fingerprint)
        if done is None:
            return (*head, Status.PENDING.value, None, None, None, None, 0, None, None, 0)
        return (
            *head,
            Status.SUCCEEDED.value,
            None,
            None,
            done.prediction_id,
            json.dumps(list(done.output_urls)),
            len(done.output_urls),
            done.predict_time_s,
            done.finished_at,
            1,
        )

    # -- work -------------------------------------------------------------------------------

    def open_entries(self, rows: Collection[int]) -> list[Entry]:
        """The jobs of `rows` that are not finished, in row order (a lost worker's jobs)."""
        wanted = sorted(rows)
        found: list[Entry] = []
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            with self._lock:
                found += [
                    _entry(r)
                    for r in self._db.execute(
                        f"SELECT * FROM jobs WHERE status IN (?, ?, ?) AND row_number IN"
                        f" ({','.join('?' * len(chunk))}) ORDER BY row_number",
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
        with self._lock, self._transaction():
            for update in updates:
                update.apply(self._db)

    # -- reprocessing ----------------------------------------------------------------------------

    def requeue(self, error_types: Collection[str] | None) -> dict[str, int]:
        """Put failed rows (of `error_types`, or all) back to be run again, keeping each
        outcome in the row's history; how many per error type. A timed-out job keeps its
        prediction id and is polled again: it may still end, and it was paid for."""
        query = "SELECT * FROM jobs WHERE status=?"
        params: list[Any] = [Status.FAILED.value]
        if error_types is not None:
            query += f" AND error_type IN ({','.join('?' * len(error_types))})"
            params += list(error_types)
        requeued: dict[str, int] = {}
        with self._lock, self._transaction():
            for row in self._db.execute(query, params).fetchall():
                history = json.loads(row["history"]) if row["history"] else []
                history.append(
                    {
                        "status": row["status"],
                        "error_type": row["error_type"],
                        "error_message": row["error_message"],
                        "prediction_id": row["prediction_id"],
                        "attempts": row["attempts"],
                        "finished_at": row["finished_at"],
                    }
                )
                # a timed-out job that the provider did not cancel may still end, and was paid
                reattach = (
                    row["error_type"] == "timeout"
                    and row["prediction_id"] is not None
                    and not row["cancel_accepted"]
                )
                self._db.execute(
                    "UPDATE jobs SET status=?, prediction_id=?, created_at=?, started_at=?,"
                    " output_urls=NULL, images=0, cost_usd=0, predict_time_s=NULL, error_type=NULL,"
                    " error_message=NULL, error_code=NULL, cancel_accepted=NULL, finished_at=NULL,"
                    " provider_cost_usd=NULL, priced_cost_usd=NULL, unconfirmed=0,"
                    " history=? WHERE row_number=?",
                    (
                        (Status.CREATED if reattach else Status.PENDING).value,
                        row["prediction_id"] if reattach else None,
                        row["created_at"] if reattach else None,
                        row["started_at"] if reattach else None,
                        json.dumps(history),
                        row["row_number"],
                    ),
                )
                kind = str(row["error_type"])
                requeued[kind] = requeued.get(kind, 0) + 1
        return requeued

    def failed_types(self) -> dict[str, int]:
        """Failed rows per error type."""
        with self._lock:
            rows = self._db.execute(
                "SELECT error_type, COUNT(*) FROM jobs WHERE status=? GROUP BY error_type",
                (Status.FAILED.value,),
            ).fetchall()
        return {str(kind): int(count) for kind, count in rows}

    def waiting_on_keys(self) -> dict[str, int]:
        """Jobs created and not seen to end, per key that created them: only that key can see
        them end."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key_name, COUNT(*) FROM jobs WHERE status=? GROUP BY key_name",
                (Status.CREATED.value,),
            ).fetchall()
        return {str(key): int(count) for key, count in rows}

    def by_key(self) -> dict[str, dict[str, float]]:
        """Per key that sent a create: jobs, of which succeeded, and their cost."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key_name, COUNT(*), SUM(status = ?), COALESCE(SUM(cost_usd), 0)"
                " FROM jobs WHERE key_name IS NOT NULL AND reused = 0 GROUP BY key_name",
                (Status.SUCCEEDED.value,),
            ).fetchall()
        return {
            str(key): {"jobs": int(jobs), "succeeded": int(ok), "cost_usd": round(cost, 6)}
            for key, jobs, ok, cost in rows
        }

    # -- reading back -------------------------------------------------------------------------

    def new_successes(self, run_dir: str) -> Iterator[list[PriorSuccess]]:
        """This run folder's own successes (not reused ones), in batches, for the state store,
        with the stored copies of their outputs (local paths made absolute)."""
        columns = (
            "row_number, fingerprint, prediction_id, output_urls, predict_time_s, finished_at,"
            " (SELECT json_group_array(json_array(idx, path, sha256, bytes, width, height,"
            " format)) FROM images WHERE images.row_number = jobs.row_number"
            " AND state = 'stored') AS copies"
        )
        where = ("status=? AND reused=0", (Status.SUCCEEDED.value,))
        for batch in self._pages(columns, *where):
            yield [
                PriorSuccess(
                    r["fingerprint"],
                    r["prediction_id"],
                    urls := tuple(json.loads(r["output_urls"] or "[]")),
                    r["predict_time_s"],
                    r["finished_at"],
                    run_dir,
                    _copies(len(urls), r["copies"], run_dir),
                )
                for r in batch
            ]

    def has_uploads(self) -> bool:
        """Whether a row still to be sent has an input uploaded to `assets.upload_to`."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM jobs WHERE status IN (?, ?, ?) AND inputs LIKE ? LIMIT 1",
                (*_OPEN, f'%"{UPLOAD_TOKEN}%'),
            ).fetchone()
        return row is not None

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {str(status): int(count) for status, count in rows}

    def totals(self) -> dict[str, float]:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(images), 0), COALESCE(SUM(cost_usd), 0),"
                " COALESCE(SUM(ambiguous), 0), COALESCE(SUM(attempts), 0),"
                " COALESCE(SUM(reused), 0) FROM jobs"
            ).fetchone()
        return {
            "rows": row[0],
            "images": row[1],
            "cost_usd": round(row[2], 6),
            "ambiguous_creates": row[3],
            "attempts": row[4],
            "reused": row[5],
        }

    def cost_books(self) -> CostBooks:
        """What the run's cost rests on: confirmed by the provider, or possibly billed."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(cost_usd), 0), COALESCE(SUM(provider_cost_usd), 0),"
                " COALESCE(SUM(COALESCE(priced_cost_usd, cost_usd)), 0),"
                " COALESCE(SUM(provider_cost_usd IS NOT NULL"
                "  AND abs(provider_cost_usd - priced_cost_usd) > 5e-7), 0),"
                f" COALESCE(SUM({_UNCONFIRMED}), 0),"
                f" COALESCE(SUM(CASE WHEN {_UNCONFIRMED} THEN {_WANTED} ELSE 0 END), 0),"
                f" COALESCE(SUM(ambiguous * {_WANTED}), 0),"
                f" COALESCE(SUM(CASE WHEN status = 'creating' THEN {_WANTED} ELSE 0 END), 0)"
                " FROM jobs"
            ).fetchone()
        return CostBooks(
            round(row[0], 6), round(row[1], 6), round(row[2], 6), *(int(v) for v in row[3:])
        )

    def recent_creates(self, since: float) -> dict[str, list[float]]:
        """Per key, the wall times (oldest first) of creates answered, or sent when no answer
        was journaled, after `since`: what the provider's window may still hold of them."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key_name, COALESCE(created_at, started_at) AS at FROM jobs"
                " WHERE key_name IS NOT NULL AND COALESCE(created_at, started_at) > ?"
                " ORDER BY at",
                (since,),
            ).fetchall()
        recent: dict[str, list[float]] = {}
        for key, at in rows:
            recent.setdefault(str(key), []).append(float(at))
        return recent

    def failed_records(self, batch_size: int = 5000) -> Iterator[list[sqlite3.Row]]:
        """The manifest records of the failed and rejected jobs, in row order, in batches (for
        the failures manifest); found through the status index, not by reading every job."""
        failed = (Status.FAILED.value, Status.REJECTED.value)
        return self._pages("row_number, record", "status IN (?, ?)", failed, batch_size)

    def images_to_fetch(self, pending_only: bool = False) -> list[tuple[int, str, int, str]]:
        """Output images of succeeded jobs not stored yet (pending, or failed before, unless
        `pending_only`): row number, job id, index, URL."""
        states = ("pending",) if pending_only else ("pending", "failed")
        with self._lock:
            rows = self._db.execute(
                "SELECT i.row_number, j.job_id, i.idx, i.url FROM images i"
                " JOIN jobs j ON j.row_number = i.row_number"
                f" WHERE i.state IN ({','.join('?' * len(states))}) AND j.status = ?"
                " ORDER BY i.row_number, i.idx",
                (*states, Status.SUCCEEDED.value),
            ).fetchall()
        return [(int(r[0]), str(r[1]), int(r[2]), str(r[3])) for r in rows]

    def stored_copies(self, batch_size: int = 5000) -> Iterator[list[tuple[int, int, str]]]:
        """The images journaled as stored (row, index, where), in batches."""
        select = "SELECT i.row_number, i.idx, i.path FROM images i"
        for batch in self._image_pages(select, "i.state = 'stored'", (), batch_size):
            yield [(int(r[0]), int(r[1]), str(r[2])) for r in batch]

    def unstore(self, images: Sequence[tuple[int, int]]) -> None:
        """Images whose stored copy is gone: pending again, to be fetched once more."""
        with self._lock, self._transaction():
            self._db.executemany(
                "UPDATE images SET state='pending', path=NULL, sha256=NULL, bytes=NULL,"
                " width=NULL, height=NULL, format=NULL, error='its stored copy was gone'"
                " WHERE row_number=? AND idx=?",
                images,
            )

    def image_states(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM images GROUP BY state").fetchall()
        return {str(state): int(count) for state, count in rows}

    def image_rows(self, batch_size: int = 5000) -> Iterator[list[sqlite3.Row]]:
        """Every output image of a succeeded job, in row and image order, in batches."""
        select = (
            "SELECT i.*, j.job_id, j.prediction_id, j.record, j.reused, j.cost_usd, j.images"
            " FROM images i JOIN jobs j ON j.row_number = i.row_number"
        )
        yield from self._image_pages(select, "j.status = ?", (Status.SUCCEEDED.value,), batch_size)

    def _image_pages(
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

    def result_rows(self, batch_size: int = 5000) -> Iterator[list[sqlite3.Row]]:
        """Every job in row order, in batches, for the results file: `outcome` is the job's own
        columns as one JSON object, built by SQLite under the results' names (timestamps in
        epoch microseconds), beside the `record`, `inputs` and `history` the writer maps.
        Building that object here costs a tenth of doing it in Python, row by row."""
        return self._pages(_RESULT_COLUMNS, "1", (), batch_size)

    def _pages(
        self, columns: str, where: str, params: tuple[Any, ...], batch_size: int = 5000
    ) -> Iterator[list[sqlite3.Row]]:
        """The jobs matching `where`, in row order, a batch at a time (keyset paging)."""
        after = 0
        while True:
            with self._lock:
                batch = self._db.execute(
                    f"SELECT {columns} FROM jobs WHERE ({where}) AND row_number > ?"
                    " ORDER BY row_number LIMIT ?",
                    (*params, after, batch_size),
                ).fetchall()
            if not batch:
                return
            yield batch
            after = batch[-1]["row_number"]

    # -- internals ----------------------------------------------------------------------------

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self._db = db

        def __enter__(self) -> None:
            self._db.execute("BEGIN IMMEDIATE")

        def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
            self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")

    def _transaction(self) -> Journal._Tx:
        return Journal._Tx(self._db)


class Commits(Protocol):
    """Where a worker's updates go: the journal's `GroupCommit`, or, on a Ray worker, the
    driver's through the worker's outbox. `write` returns once its updates are durable;
    `post` returns at once with an event set when they are."""

    async def write(self, *updates: Update) -> None: ...

    def post(self, *updates: Update) -> asyncio.Event: ...


class _Batch:
    """Updates that share one commit; `done` is set once they are durable (or failed)."""

    __slots__ = ("done", "updates")

    def __init__(self) -> None:
        self.updates: list[Update] = []
        self.done = asyncio.Event()


class GroupCommit:
    """Many writers, one transaction. `await write(...)` returns once its updates are durable
    and has them committed at once; `post(...)` queues updates that may wait up to `lazy_s`
    for a commit they can share, and returns an event set once they are durable.

    It sits on every job's path, so it is built on asyncio's own events and timer and one
    committing thread: anyio's events and `to_thread` cost several times more CPU per commit.
    """

    def __init__(self, journal: Journal, *, lazy_s: float = 0.2) -> None:
        self._journal = journal
        self._lazy_s = lazy_s
        self._batch = _Batch()
        self._go = asyncio.Event()  # a commit is wanted: a writer waits, or lazy_s has passed
        self._timer: asyncio.TimerHandle | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="journal-commit")
        self._failure: BaseException | None = None
        self.commits = 0

    async def write(self, *updates: Update) -> None:
        await self.durable(self.post(*updates))

    def post(self, *updates: Update) -> asyncio.Event:
        self._check()
        batch = self._batch
        if self._timer is None:  # the first update of a batch waits at most lazy_s
            self._timer = asyncio.get_running_loop().call_later(self._lazy_s, self._go.set)
        batch.updates.extend(updates)
        return batch.done

    async def durable(self, done: asyncio.Event) -> None:
        """Wait until posted updates are durable."""
        if not done.is_set():
            self._go.set()
            await done.wait()
        self._check()

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def run(self) -> None:
        """The committing task; runs until cancelled, then commits what is queued."""
        try:
            while True:
                await self._go.wait()
                self._go.clear()
                await self._flush()
        finally:
            with anyio.CancelScope(shield=True):
                await self._flush()
            self._thread.shutdown(wait=False)

    async def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = self._batch
        if not batch.updates:
            return
        self._batch = _Batch()
        loop = asyncio.get_running_loop()
        try:
            with anyio.CancelScope(shield=True):  # a commit under way is seen to its end
                await loop.run_in_executor(self._thread, self._journal.apply, batch.updates)
            self.commits += 1
        except sqlite3.Error as exc:
            self._failure = exc
        finally:
            batch.done.set()
