"""The small typed values the stages pass to each other."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pipeline.core.schema import fingerprint

__all__ = [
    "DECISION_COLUMNS",
    "FINISHED",
    "MAY_BE_BILLED",
    "OPEN",
    "REVIEWS",
    "Decision",
    "JobOutcome",
    "JobSpec",
    "PriorSuccess",
    "Rejected",
    "Status",
    "StoredCopy",
    "fingerprint",
]


class Status(StrEnum):
    PENDING = "pending"  # not sent yet
    CREATING = "creating"  # a create was (maybe) sent; no prediction id known
    CREATED = "created"  # prediction id journaled; being polled
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"  # never sent: the manifest row breaks the input schema
    SKIPPED = "skipped"  # never sent on purpose: blank where manifest.skip_if_blank says


# the groups every part counts by, declared here alone
OPEN = (Status.PENDING, Status.CREATING, Status.CREATED)  # still to be sent, or to be seen to end
FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.REJECTED, Status.SKIPPED)  # nothing to do
MAY_BE_BILLED = (Status.CREATING, Status.CREATED)  # a create may have reached the provider

# how a create whose answer was lost was settled (the `create_resolution` column), declared
# here alone: its job found at the provider by its input, seed included (`adopted`); shown
# never made, and created again (`recreated`); or not known (`unresolved`: a duplicate may be
# billed)
RESOLUTIONS = ("adopted", "recreated", "unresolved")
# a person's word on an edited row (the `review` column), declared here alone
REVIEWS = ("approved", "rejected")
# a decisions file's columns, as the report's review page writes them (`retry --rejected`)
DECISION_COLUMNS = ("job_id", "row", "prediction_id", "decision", "note")


@dataclass(frozen=True, slots=True)
class Decision:
    """One line of a decisions file: a reviewer's word on a row's edit. `prediction_id`
    names the edit that was judged (None when the file does not say); `line` is where the
    file says it, for messages."""

    row_number: int
    job_id: str | None
    decision: str  # one of REVIEWS
    note: str
    prediction_id: str | None
    line: int


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A valid manifest row: the API input it sends, and the row as the user wrote it."""

    job_id: str
    row_number: int
    inputs: dict[str, Any]
    record: dict[str, Any]
    fingerprint: str

    @property
    def images_requested(self) -> int:
        return int(self.inputs.get("n", 1))


@dataclass(frozen=True, slots=True)
class Rejected:
    """A manifest row that is never sent: it breaks a rule (a `rejected` result), or it is
    `skipped` (blank where manifest.skip_if_blank says: not work, not a failure)."""

    job_id: str
    row_number: int
    record: dict[str, Any]
    reason: str
    skipped: bool = False


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """How one job ended (succeeded or failed), as the worker saw it.

    `ended` is the provider's terminal status when a poll saw it (success, error, cancelled):
    the provider's word on the job's end and cost. Without it, `unconfirmed` says whether a job
    may exist at the provider that nobody saw end (it may be billed)."""

    status: Status
    prediction_id: str | None = None
    output_urls: tuple[str, ...] = ()
    predict_time_s: float | None = None
    error_type: str | None = None
    error_message: str | None = None
    finished_at: float = 0.0
    error_code: str | None = None  # the provider's, for a failed prediction
    # a cancel was asked for it at the provider: did the job end `cancelled` (None: not asked)
    cancel_accepted: bool | None = None
    provider_cost_usd: float | None = None  # the provider's own figure (`metrics.cost`)
    ended: str | None = None  # the terminal status a poll saw
    unconfirmed: bool = False
    served_by: str | None = None  # the backup model of a fallback chain that served it

    def priced(self, price_per_image_usd: float) -> float:
        """Our price times the images returned."""
        images = len(self.output_urls) if self.status is Status.SUCCEEDED else 0
        return round(images * price_per_image_usd, 6)

    def cost(self, price_per_image_usd: float) -> float:
        """What the job cost: the provider's word where it gave one, else our price."""
        if self.provider_cost_usd is not None:
            return round(self.provider_cost_usd, 6)
        return self.priced(price_per_image_usd)


@dataclass(frozen=True, slots=True)
class PriorSuccess:
    """A job that succeeded in some run: what an incremental run carries over for its input."""

    fingerprint: str
    prediction_id: str | None
    output_urls: tuple[str, ...]
    predict_time_s: float | None
    finished_at: float | None
    run_dir: str
    # per output, where its stored copy is (path or URL, sha256, bytes, width, height, format),
    # or None when it was not stored
    copies: tuple[StoredCopy | None, ...] = ()
    # a reviewer's approval of this edit, kept beside it (a rejected edit is forgotten)
    approved: bool = False
    review_note: str | None = None


@dataclass(frozen=True, slots=True)
class StoredCopy:
    """An output image kept by an earlier run: an absolute path or an object URL."""

    path: str
    sha256: str
    bytes: int
    width: int
    height: int
    format: str
