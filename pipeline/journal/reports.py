"""Reading the journal back: failures requeued, counts, totals, costs, and the rows the outputs
are written from."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Iterator, Sequence
from typing import Any

from pipeline.core import (
    UPLOAD_TOKEN,
    PriorSuccess,
    Status,
)
from pipeline.journal.file import JournalFile
from pipeline.journal.rows import CostBooks, ReportRow, _copies, _report_row, made_for, stem
from pipeline.journal.tables import (
    _CHECKED,
    _CLEARED_OUTCOME,
    _OPEN,
    _PATHS,
    _RESULT_COLUMNS,
    _UNCONFIRMED,
    _WANTED,
)


class Reports:
    """What the journal says back: failures put back for `retry`, counts and totals, the
    cost books, and the rows, images and copies the outputs are written from."""

    def __init__(self, file: JournalFile) -> None:
        self._file = file
        self._db = file.db
        self._lock = file.lock

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
        with self._lock, self._file.transaction():
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
                    f" {_CLEARED_OUTCOME}, history=? WHERE row_number=?",
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

    def new_successes(self, run_dir: str) -> Iterator[list[PriorSuccess]]:
        """This run folder's own successes (not reused ones), in batches, for the state store,
        with the stored copies of their outputs (local paths made absolute)."""
        columns = (
            "row_number, fingerprint, prediction_id, output_urls, predict_time_s, finished_at,"
            " history, (SELECT json_group_array(json_array(idx, path, sha256, bytes, width,"
            " height, format)) FROM images WHERE images.row_number = jobs.row_number"
            " AND state = 'stored') AS copies"
        )
        where = ("status=? AND reused=0", (Status.SUCCEEDED.value,))
        for batch in self._pages(columns, *where):
            yield [
                PriorSuccess(
                    printed,
                    r["prediction_id"],
                    urls := tuple(json.loads(r["output_urls"] or "[]")),
                    r["predict_time_s"],
                    r["finished_at"],
                    run_dir,
                    _copies(len(urls), r["copies"], run_dir),
                )
                for r in batch
                for printed in made_for(r["fingerprint"], r["history"])
            ]

    def catalog_rows(self) -> Iterator[list[tuple[Any, ...]]]:
        """Each row's product as the state store keeps it (job id, status, prediction, review,
        first stored image's path), in batches; rows named only by their row (a skipped row
        whose id another row has) are not products."""
        columns = (
            "row_number, job_id, status, prediction_id, review, (SELECT path FROM images WHERE"
            " images.row_number = jobs.row_number AND state = 'stored' ORDER BY idx LIMIT 1)"
            " AS path"
        )
        for batch in self._pages(columns, "job_id NOT LIKE '%#row-%'", ()):
            yield [
                (r["job_id"], r["status"], r["prediction_id"], r["review"], r["path"])
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
                "SELECT COUNT(*), COALESCE(SUM(images), 0),"
                " COALESCE(SUM(cost_usd + earlier_cost_usd), 0),"
                " COALESCE(SUM(ambiguous), 0), COALESCE(SUM(attempts), 0),"
                " COALESCE(SUM(reused), 0), COALESCE(SUM(ambiguous - resolved), 0) FROM jobs"
            ).fetchone()
        return {
            "rows": row[0],
            "images": row[1],
            "cost_usd": round(row[2], 6),
            "ambiguous_creates": row[3],
            "attempts": row[4],
            "reused": row[5],
            # lost creates not resolved at the provider: each may have been billed twice
            "possible_duplicate_charges": row[6],
        }

    def cost_books(self) -> CostBooks:
        """What the run's cost rests on: confirmed by the provider, or possibly billed."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(cost_usd + earlier_cost_usd), 0),"
                " COALESCE(SUM(provider_cost_usd), 0),"
                " COALESCE(SUM(COALESCE(priced_cost_usd, cost_usd)), 0),"
                " COALESCE(SUM(provider_cost_usd IS NOT NULL"
                "  AND abs(provider_cost_usd - priced_cost_usd) > 5e-7), 0),"
                f" COALESCE(SUM({_UNCONFIRMED}), 0),"
                f" COALESCE(SUM(CASE WHEN {_UNCONFIRMED} THEN {_WANTED} ELSE 0 END), 0),"
                f" COALESCE(SUM((ambiguous - resolved) * {_WANTED}), 0),"
                f" COALESCE(SUM(CASE WHEN status = '{Status.CREATING}' THEN {_WANTED} ELSE 0 END),"
                " 0)"
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
        columns = "row_number, record, status, error_type, error_message"
        return self._pages(columns, "status IN (?, ?)", failed, batch_size)

    def images_to_fetch(self, pending_only: bool = False) -> list[tuple[int, str, int, str]]:
        """Output images of succeeded jobs not stored yet (pending, or failed before, unless
        `pending_only`): row number, the name its files go by (the job id, with `-redoN` for
        an edit made again after N rejections, so a rejected edit's files are kept), index,
        URL."""
        states = ("pending",) if pending_only else ("pending", "failed")
        with self._lock:
            rows = self._db.execute(
                "SELECT i.row_number, j.job_id, j.history, i.idx, i.url, j.prediction_id"
                " FROM images i"
                " JOIN jobs j ON j.row_number = i.row_number"
                f" WHERE i.state IN ({','.join('?' * len(states))}) AND j.status = ?"
                " ORDER BY i.row_number, i.idx",
                (*states, Status.SUCCEEDED.value),
            ).fetchall()
        return [(int(r[0]), stem(str(r[1]), r[2], r[5]), int(r[3]), str(r[4])) for r in rows]

    def stored_copies(self, batch_size: int = 5000) -> Iterator[list[tuple[int, int, str]]]:
        """The images journaled as stored (row, index, where), in batches."""
        select = "SELECT i.row_number, i.idx, i.path FROM images i"
        for batch in self._file.image_pages(select, "i.state = 'stored'", (), batch_size):
            yield [(int(r[0]), int(r[1]), str(r[2])) for r in batch]

    def unstore(self, images: Sequence[tuple[int, int]]) -> None:
        """Images whose stored copy is gone: pending again, to be fetched once more."""
        with self._lock, self._file.transaction():
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
        yield from self._file.image_pages(
            select, "j.status = ?", (Status.SUCCEEDED.value,), batch_size
        )

    def result_rows(self, batch_size: int = 5000) -> Iterator[list[sqlite3.Row]]:
        """Every job in row order, in batches, for the results file: `outcome` is the job's own
        columns as one JSON object, built by SQLite under the results' names (timestamps in
        epoch microseconds), beside the `record`, `inputs` and `history` the writer maps.
        Building that object here costs a tenth of doing it in Python, row by row."""
        return self._pages(_RESULT_COLUMNS, "1", (), batch_size)

    def report_rows(self, batch_size: int = 5000) -> Iterator[list[ReportRow]]:
        """Every job in row order, in batches, typed as the report shows it."""
        columns = (
            "row_number, job_id, status, cost_usd, error_type, error_message, inputs, record,"
            f" output_urls, prediction_id, history, review, review_note, reused,"
            f" {_PATHS} AS paths, {_CHECKED} AS checked"
        )
        for batch in self._pages(columns, "1", (), batch_size):
            yield [_report_row(row) for row in batch]

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
