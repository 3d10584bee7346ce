"""The small typed values the stages pass to each other."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pipeline.schema import fingerprint

__all__ = [
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
    """A manifest row that breaks a rule; it becomes a `rejected` result with no API call."""

    job_id: str
    row_number: int
    record: dict[str, Any]
    reason: str


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """How one job ended (succeeded or failed), as the worker saw it."""

    status: Status
    prediction_id: str | None = None
    output_urls: tuple[str, ...] = ()
    predict_time_s: float | None = None
    error_type: str | None = None
    error_message: str | None = None
    finished_at: float = 0.0
    error_code: str | None = None  # the provider's, for a failed prediction
    cancel_accepted: bool | None = None  # asked to cancel it at the provider: was it accepted


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


@dataclass(frozen=True, slots=True)
class StoredCopy:
    """An output image kept by an earlier run: an absolute path or an object URL."""

    path: str
    sha256: str
    bytes: int
    width: int
    height: int
    format: str
