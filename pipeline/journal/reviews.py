"""A person's review of the edits, in the journal: the decisions a reviewer exported from the
report, recorded on their rows; a rejected edit put back to be made again (kept in the row's
history first); the approved images read back for the publishing step."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.core import Status
from pipeline.journal.file import JournalFile
from pipeline.journal.rows import rejected_note
from pipeline.journal.tables import _CLEARED_OUTCOME, _FAILED, _PATHS, in_chunks

__all__ = ["ApprovedImage", "Redo", "ReviewTarget", "Reviews"]


@dataclass(frozen=True, slots=True)
class ReviewTarget:
    """A row a decision names, as the journal holds it: whether the decision still applies
    to its edit (`prediction_id`), and whether it was already judged."""

    row_number: int
    job_id: str
    fingerprint: str | None
    status: Status
    prediction_id: str | None
    review: str | None  # the decision on the row's current edit, if any
    inputs: dict[str, Any]
    record: dict[str, Any]
    redone: bool  # its current edit was made because an earlier one was rejected


@dataclass(frozen=True, slots=True)
class Redo:
    """A rejected edit to be made again: the row, the reviewer's note and what it sends now."""

    row_number: int
    note: str
    inputs: dict[str, Any]
    fingerprint: str  # of `inputs`: what the state store records the remake under
    # the row whose remake this row shares (rows that shared the rejected edit share its
    # remake, made once), or None for the row that is sent
    follows: int | None = None
    by: str = "review"  # who rejected the edit: a person ("review"), or the checks ("checks")


@dataclass(frozen=True, slots=True)
class ApprovedImage:
    """An approved row's output, as a publishing step reads it."""

    job_id: str
    row_number: int
    prediction_id: str | None
    index: int
    path: str | None  # the stored copy (as the journal holds it), None when not stored
    url: str
    sha256: str | None
    note: str
    cost_usd: float = 0.0  # the image's share of its job's cost
    checks_failed: tuple[str, ...] | None = None  # the rules it failed (None: not measured)


class Reviews:
    """Decisions in, rejected edits requeued, approved images out."""

    def __init__(self, file: JournalFile) -> None:
        self._file = file
        self._db = file.db
        self._lock = file.lock

    def review_targets(self, rows: Collection[int]) -> dict[int, ReviewTarget]:
        """The rows named by a decisions file, by row number (rows the journal lacks are
        missing from the answer)."""
        found: dict[int, ReviewTarget] = {}
        wanted = sorted(set(rows))
        for chunk, marks in in_chunks(wanted):
            with self._lock:
                got = self._db.execute(
                    "SELECT row_number, job_id, fingerprint, status, prediction_id, review,"
                    f" inputs, record, history FROM jobs WHERE row_number IN ({marks})",
                    chunk,
                ).fetchall()
            for r in got:
                found[r["row_number"]] = ReviewTarget(
                    row_number=r["row_number"],
                    job_id=r["job_id"],
                    fingerprint=r["fingerprint"],
                    status=Status(r["status"]),
                    prediction_id=r["prediction_id"],
                    review=r["review"],
                    inputs=json.loads(r["inputs"]) if r["inputs"] else {},
                    record=json.loads(r["record"]),
                    redone=rejected_note(r["history"]) is not None,
                )
        return found

    def rows_of(self, job_ids: Collection[str]) -> dict[str, int]:
        """The row each of these job ids is on in this run (ids it lacks are missing)."""
        found: dict[str, int] = {}
        for chunk, marks in in_chunks(sorted(set(job_ids))):
            with self._lock:
                found.update(
                    self._db.execute(
                        f"SELECT job_id, row_number FROM jobs WHERE job_id IN ({marks})", chunk
                    ).fetchall()
                )
        return found

    def sharing(self, predictions: Collection[str]) -> dict[str, list[int]]:
        """The succeeded rows whose edit is each of `predictions` (rows that share an edit:
        the same seeded input, or the same reused one), in row order."""
        found: dict[str, list[int]] = {}
        for chunk, marks in in_chunks(sorted(set(predictions))):
            with self._lock:
                got = self._db.execute(
                    "SELECT prediction_id, row_number FROM jobs WHERE status=?"
                    f" AND prediction_id IN ({marks}) ORDER BY row_number",
                    (Status.SUCCEEDED.value, *chunk),
                ).fetchall()
            for prediction, row in got:
                found.setdefault(prediction, []).append(int(row))
        return found

    def record_review(self, approved: Sequence[tuple[int, str]], redo: Sequence[Redo]) -> None:
        """In one transaction: approvals (row, note) recorded on their rows; each rejected edit
        moved into its row's history (status, prediction, outputs and stored copies, seed,
        prompt, the decision and note) and the row put back to be sent with its new input."""
        with self._lock, self._file.transaction():
            self._db.executemany(
                "UPDATE jobs SET review='approved', review_note=? WHERE row_number=?",
                [(note or None, row) for row, note in approved],
            )
            for item in redo:
                self._redo(item)

    def _redo(self, item: Redo) -> None:
        db = self._db
        row = db.execute(
            "SELECT status, prediction_id, attempts, finished_at, output_urls, inputs, history,"
            f" cost_usd, fingerprint, {_PATHS} AS paths, {_FAILED} AS failed FROM jobs"
            " WHERE row_number=?",
            (item.row_number,),
        ).fetchone()
        history = json.loads(row["history"]) if row["history"] else []
        sent = json.loads(row["inputs"]) if row["inputs"] else {}
        history.append(
            {
                "status": row["status"],
                "error_type": None,
                "error_message": None,
                "prediction_id": row["prediction_id"],
                "attempts": row["attempts"],
                "finished_at": row["finished_at"],
                "cost_usd": row["cost_usd"],
                "output_urls": json.loads(row["output_urls"] or "[]"),
                "output_paths": json.loads(row["paths"] or "[]"),
                "prompt": sent.get("prompt"),
                "seed": sent.get("seed"),
                # the input the rejected edit was made for: its remake replaces it there
                "fingerprint": row["fingerprint"],
                "review": "rejected",
                "review_note": item.note or None,
                "rejected_by": item.by,
                "checks_failed": json.loads(row["failed"]) if row["failed"] else None,
            }
        )
        db.execute("DELETE FROM images WHERE row_number=?", (item.row_number,))
        db.execute(
            "UPDATE jobs SET status=?, inputs=?, fingerprint=?, prediction_id=NULL, key_name=NULL,"
            f" created_at=NULL, started_at=NULL, {_CLEARED_OUTCOME}, reused=0, follows=?,"
            " review=NULL, review_note=NULL, history=? WHERE row_number=?",
            (
                Status.PENDING.value,
                json.dumps(item.inputs, ensure_ascii=False),
                item.fingerprint,
                item.follows,
                json.dumps(history, ensure_ascii=False),
                item.row_number,
            ),
        )

    def review_counts(self) -> dict[str, int]:
        """Where the review stands: edits approved, rows whose edit was rejected (and made
        again, or being made), and edits no person has judged yet."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(status=:done AND review='approved'), 0),"
                " COALESCE(SUM(EXISTS(SELECT 1 FROM json_each(jobs.history)"
                " WHERE json_extract(json_each.value, '$.review') = 'rejected'"
                " AND COALESCE(json_extract(json_each.value, '$.rejected_by'), 'review')"
                " = 'review')), 0),"
                " COALESCE(SUM(status=:done AND review IS NULL), 0) FROM jobs",
                {"done": Status.SUCCEEDED.value},
            ).fetchone()
        return {"approved": int(row[0]), "rejected": int(row[1]), "to_review": int(row[2])}

    def edits_made(self) -> int:
        """Successes the journal has ever held: rows succeeded now, and each edit a reviewer
        rejected since (its row went back to be made again). It only grows, which the run
        folder's check against the results file relies on."""
        with self._lock:
            row = self._db.execute(
                "SELECT (SELECT COUNT(*) FROM jobs WHERE status=?) + (SELECT COUNT(*) FROM jobs,"
                " json_each(jobs.history) WHERE jobs.history IS NOT NULL"
                " AND json_extract(json_each.value, '$.review') = 'rejected')",
                (Status.SUCCEEDED.value,),
            ).fetchone()
        return int(row[0])

    def approved_images(self, batch_size: int = 5000) -> Iterator[list[ApprovedImage]]:
        """The outputs of approved rows, in row and output order, a batch at a time."""
        select = (
            "SELECT j.job_id, i.row_number, j.prediction_id, j.review_note, i.idx, i.path,"
            " i.url, i.sha256, i.state, j.cost_usd, j.images, j.reused, i.checks_failed"
            " FROM images i JOIN jobs j ON j.row_number = i.row_number"
        )
        for got in self._file.image_pages(select, "j.review = 'approved'", (), batch_size):
            yield [
                ApprovedImage(
                    r["job_id"],
                    r["row_number"],
                    r["prediction_id"],
                    r["idx"],
                    r["path"] if r["state"] == "stored" else None,
                    r["url"],
                    r["sha256"],
                    r["review_note"] or "",
                    0.0 if r["reused"] else round(r["cost_usd"] / max(1, r["images"]), 6),
                    None if r["checks_failed"] is None else tuple(json.loads(r["checks_failed"])),
                )
                for r in got
            ]
