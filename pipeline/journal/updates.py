"""The state changes a run makes to the journal, each applied in one durable transaction
(grouped by `GroupCommit`): a job's way pending -> creating -> created -> its end, and its
images."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass

from pipeline.core import (
    JobOutcome,
    Status,
)


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
    seed: int | None = None  # drawn for this create (the row's input has none)

    def apply(self, db: sqlite3.Connection) -> None:
        db.execute(
            "UPDATE jobs SET status=?, attempts=?, key_name=?, started_at=COALESCE(started_at, ?),"
            " sent_at=?, sent_seed=? WHERE row_number=?",
            (
                Status.CREATING.value,
                self.attempt,
                self.key_name,
                self.at,
                self.at,
                self.seed,
                self.row_number,
            ),
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
class NoteResolution(Update):
    """How a create whose answer was lost was settled (one of RESOLUTIONS)."""

    row_number: int
    resolution: str

    def apply(self, db: sqlite3.Connection) -> None:
        db.execute(
            "UPDATE jobs SET resolution=?, resolved=resolved+? WHERE row_number=?",
            (self.resolution, int(self.resolution != "unresolved"), self.row_number),
        )


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
            " finished_at=:at, error_code=:code, served_by=:served, cancel_accepted=CASE"
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
                "served": o.served_by,
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
