"""Rows into the journal, and the manifest as it is now reconciled with it."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import astuple, replace
from typing import Any

from pipeline.core import (
    JobSpec,
    PriorSuccess,
    Rejected,
    Status,
)
from pipeline.journal.file import JournalFile
from pipeline.journal.rows import stem
from pipeline.journal.tables import _INPUTS, _RECORD, _UNSENT, in_chunks


def unique(item: JobSpec | Rejected, known: dict[str, int]) -> JobSpec | Rejected:
    """The item, or its rejection when another row has its job id already (`known`: job id
    -> the row that has it first, updated)."""
    first = known.get(item.job_id)
    if _skips(item):
        # a skipped row is never judged for its id (a product's imageless variants share
        # one): when another row has it, the skipped one is named by its row
        if first is None:
            known[item.job_id] = -item.row_number  # held, but given up to a row that is sent
            return item
        return replace(item, job_id=_by_row(item))
    if first is not None and first < 0:  # held by a skipped row, which gives it up
        first = None
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


def _skips(item: JobSpec | Rejected) -> bool:
    return isinstance(item, Rejected) and item.skipped


def _by_row(item: JobSpec | Rejected) -> str:
    return f"{item.job_id}#row-{item.row_number}"


class Ingest:
    """The manifest into the journal: new rows journaled (deduplicated by job id, and by
    seeded input when `manifest.dedupe`), reused successes of earlier runs, and a changed
    manifest reconciled with what the journal holds."""

    def __init__(self, file: JournalFile) -> None:
        self._file = file
        self._db = file.db
        self._lock = file.lock

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
        with self._lock, self._file.transaction():
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
        with self._lock, self._file.transaction():
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
            self._carry_approvals(reused, prior)
            self._reused_images(reused, prior)  # fetched by the run (they are pending)
            if (
                self._file.share_seeded
            ):  # rows taken as they are now share a seeded input as new ones do
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
        with self._lock, self._file.transaction():
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
        known: dict[str, int] = {}
        for chunk, marks in in_chunks(list(ids)):
            known.update(
                self._db.execute(
                    f"SELECT job_id, CASE WHEN status=? THEN -row_number ELSE row_number END"
                    f" FROM jobs WHERE job_id IN ({marks})",
                    (Status.SKIPPED.value, *chunk),
                ).fetchall()
            )
        return known

    def _give_up_ids(self, sent: set[str], skipped_hold: dict[str, int]) -> None:
        """Journaled skipped rows (`skipped_hold`: id -> row) that hold an id a row sent now
        takes are named by their row instead (`<id>#row-<n>`)."""
        held = [(row, job_id) for job_id, row in skipped_hold.items() if job_id in sent]
        self._db.executemany(
            "UPDATE jobs SET job_id = job_id || '#row-' || row_number WHERE row_number=?"
            " AND job_id=?",
            held,
        )

    def _insert(
        self, batch: Sequence[JobSpec | Rejected], prior: Mapping[str, PriorSuccess]
    ) -> list[tuple[int, str, int, str]]:
        known = self._known_ids({item.job_id for item in batch})
        skipped_hold = {job_id: -row for job_id, row in known.items() if row < 0}
        items = [unique(item, known) for item in batch]
        sent = {i.job_id for i in items if not _skips(i)}
        items = [
            replace(i, job_id=_by_row(i)) if _skips(i) and i.job_id in sent else i for i in items
        ]
        self._give_up_ids(sent, skipped_hold)
        leaders = self._leaders(items, prior) if self._file.share_seeded else {}
        rows = [(*self._ingest_row(i, prior), leaders.get(i.row_number)) for i in items]
        self._db.executemany(
            "INSERT INTO jobs(row_number, job_id, fingerprint, inputs, record, status,"
            " error_type, error_message, prediction_id, output_urls, images,"
            " predict_time_s, finished_at, reused, follows)"
            " VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        self._carry_approvals(items, prior)
        return self._reused_images(items, prior)

    def _carry_approvals(
        self, items: Sequence[JobSpec | Rejected], prior: Mapping[str, PriorSuccess]
    ) -> None:
        """Rows that reuse an edit a reviewer approved (on an earlier night) are approved."""
        carried = [
            (done.review_note, item.row_number)
            for item in items
            if isinstance(item, JobSpec)
            and (done := prior.get(item.fingerprint)) is not None
            and done.approved
        ]
        self._db.executemany(
            "UPDATE jobs SET review='approved', review_note=? WHERE row_number=?", carried
        )

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
                    named = stem(item.job_id, None, done.prediction_id)
                    fetch.append((item.row_number, named, idx, url))
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
        for chunk, marks in in_chunks(prints):
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
        with self._lock, self._file.transaction():
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
                " FROM jobs f JOIN images i ON i.row_number = f.follows"
                " JOIN jobs l ON l.row_number = f.follows WHERE f.status=?"
                # a follower keeps the images of its own edit: the leader's remake, made after
                # a review, is never copied onto a row that still holds the edit it shared
                " AND f.prediction_id IS l.prediction_id",
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
