"""What the journal hands back, typed: an open job's entry, and the cost books."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from pipeline.core import (
    JobSpec,
    Status,
    StoredCopy,
    located,
)


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
    sent_at: float | None = None  # when its last create was sent
    sent_seed: int | None = None  # the seed drawn for it (its input has none)
    stem: str = ""  # the name its stored images go by (see `stem`)

    @property
    def sent_inputs(self) -> dict[str, Any]:
        """The input its last create was sent with: a drawn seed where it has none."""
        if self.sent_seed is None or "seed" in self.inputs:
            return self.inputs
        return {**self.inputs, "seed": self.sent_seed}

    @property
    def spec(self) -> JobSpec:
        return JobSpec(self.job_id, self.row_number, self.inputs, self.record, self.fingerprint)


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One row as the report shows it: its job, how it ended, what was sent and the row as the
    catalog had it, and where each output is stored (None where it is not)."""

    row_number: int
    job_id: str
    status: Status
    cost_usd: float
    error_type: str | None
    error_message: str | None
    inputs: dict[str, Any]
    record: dict[str, Any]
    output_paths: tuple[str | None, ...]
    output_urls: tuple[str, ...]  # the provider's, in output order
    prediction_id: str | None = None
    review: str | None = None  # the decision recorded on the current edit
    review_note: str | None = None
    rejected_note: str | None = None  # the current edit remakes a rejected one: its note
    reused: bool = False  # its edit was carried over from an earlier run, not made in this one
    # the automatic checks on its images: each failed rule with its measure ("output 1:
    # white_background 0.12, at least 0.97"); None while no image was measured
    flags: tuple[str, ...] | None = None


def _report_row(row: sqlite3.Row) -> ReportRow:
    return ReportRow(
        row_number=row["row_number"],
        job_id=row["job_id"],
        status=Status(row["status"]),
        cost_usd=row["cost_usd"] or 0.0,
        error_type=row["error_type"],
        error_message=row["error_message"],
        inputs=json.loads(row["inputs"]) if row["inputs"] else {},
        record=json.loads(row["record"]),
        output_paths=tuple(json.loads(row["paths"])) if row["paths"] else (),
        output_urls=tuple(json.loads(row["output_urls"])) if row["output_urls"] else (),
        prediction_id=row["prediction_id"],
        review=row["review"],
        review_note=row["review_note"],
        rejected_note=rejected_note(row["history"]),
        reused=bool(row["reused"]),
        flags=_flags(row["checked"]),
    )


def _flags(text: str | None) -> tuple[str, ...] | None:
    """The failed rules of a row's measured images, each said with its measure."""
    measured = json.loads(text) if text else []
    if not measured:
        return None
    said = []
    for image in measured:
        for rule in image["f"]:
            value, bound, limit = image["c"].get(rule, (None, "min", 0))
            shown = "not measured" if value is None else f"{value:g}"
            word = "at least" if bound == "min" else "at most"
            said.append(f"output {image['i'] + 1}: {rule} {shown}, {word} {limit:g}")
    return tuple(said)


def _earlier(history: str | None) -> list[dict[str, Any]]:
    """A row's earlier outcomes, from their journaled JSON."""
    return list(json.loads(history)) if history else []


def _rejection(outcome: dict[str, Any]) -> bool:
    """Whether an earlier outcome is an edit a reviewer rejected."""
    return outcome.get("review") == "rejected"


def made_for(fingerprint: str, history: str | None) -> list[str]:
    """The inputs an edit stands for: its own, and each input whose edit a reviewer rejected
    before it was made (a night that maps the row as it was still gets the remake, never
    the rejected edit bought again)."""
    found = [fingerprint]
    for earlier in filter(_rejection, _earlier(history)):
        replaced = earlier.get("fingerprint")
        if replaced and replaced not in found:
            found.append(replaced)
    return found


def rejected_note(history: str | None) -> str | None:
    """The note on the rejected edit the current one remakes ("" without a note), or None
    when the row's last earlier outcome is no rejected edit."""
    last = _earlier(history)[-1:]
    return str(last[0].get("review_note") or "") if last and _rejection(last[0]) else None


def _copies(count: int, found: str | None, run_dir: str) -> tuple[StoredCopy | None, ...]:
    """The stored copy of each of `count` outputs, by index (None where not stored)."""
    copies: list[StoredCopy | None] = [None] * count
    for idx, path, *rest in json.loads(found or "[]"):
        if 0 <= idx < count:
            copies[idx] = StoredCopy(located(path, run_dir), *rest)
    return tuple(copies)


def stem(job_id: str, history: str | None, prediction_id: str | None = None) -> str:
    """What a row's stored images are named from: `N:prediction:job id`, N the rejected
    edits made before this one (their files are kept beside it), and the edit's prediction
    once known. The job id comes last, so no job id can spell another's with a count (`P`
    made again is not row `P-redo1`), and an edit of another run (`--fresh`) is named apart
    from this one's; `image_name` reads it back."""
    redone = sum(map(_rejection, _earlier(history)))
    return f"{redone}:{prediction_id or ''}:{job_id}"


def of_edit(stem: str, prediction_id: str | None) -> str:
    """`stem` with the edit's prediction, known once the job is made."""
    count, _, rest = stem.partition(":")
    return f"{count}:{prediction_id or ''}:{rest.partition(':')[2]}"


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
        sent_at=row["sent_at"],
        sent_seed=row["sent_seed"],
        stem=stem(row["job_id"], row["history"]),
    )
