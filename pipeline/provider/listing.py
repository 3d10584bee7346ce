"""The provider's executions listing, read in one place: a change of its shape at the real
provider is a change here.

`GET /v2/executions` (the provider's docs of 2026-12): query `model` (slug), `status`
(comma-separated: `created`, `starting`, `success`, `error`), `from` and `to` (creation time,
RFC 3339), `limit` (1-100) and an opaque `cursor`; answer `{"executions": [...], "has_more",
"next_cursor"}`, newest first. `GET /v1/executions`, deprecated, takes `offset` for the cursor
and answers `total_count`; today it refuses pages past a 1,000-row prefix, so it is read only
where v2 is missing (404), and never past that prefix. Entries: `id`, `model`, `status`,
`execution_cost`, `run_time`, `created_at`, `started_at`, `completed_at`, `output`, ... No
input in the listing. Today the listing is the organisation's: an entry may be another key's,
another application's or another run's. What a listing says of a job is a hint: a poll of the
job confirms its end (and reads its outputs and cost in the prediction's own shape). An entry
that cannot be read (no id, an id that is not one, no status) is skipped and counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipeline.core import ProtocolViolation
from pipeline.provider.readings import MAX_JOB_COST_USD, reading

__all__ = [
    "ENDED",
    "V1_ROWS",
    "V2_STATUSES",
    "Execution",
    "Page",
    "listing_query",
    "read_listing",
]

# the statuses of an execution that has ended, in the reference's words and the seed's
ENDED = ("success", "failed", "error", "cancelled", "canceled")
# the status filters v2 takes (its docs name these four)
V2_STATUSES = ("created", "starting", "success", "error")
V1_ROWS = 1000  # v1 refuses pages past this prefix today
_PREDICTION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass(frozen=True, slots=True)
class Execution:
    """One entry of the listing: its prediction id, its status, what it cost (when the
    provider says) and when it was created (Unix seconds, when the provider says)."""

    prediction_id: str
    status: str
    cost_usd: float | None
    created_at: float | None


@dataclass(frozen=True, slots=True)
class Page:
    """One page read: its entries, the next page's cursor (v2) or None at the end, how many
    entries could not be read, and (v1) how many the whole listing holds."""

    entries: list[Execution]
    next_cursor: str | None
    malformed: int
    total: int | None = None


def listing_query(
    model: str,
    statuses: tuple[str, ...],
    since: float | None,
    limit: int,
    offset: int | None = 0,
    until: float | None = None,
    cursor: str | None = None,
) -> dict[str, str]:
    """The query of one page: `model`'s executions in `statuses` (any, when empty) created
    from `since` (to `until`, when given); `offset` for v1, `cursor` for v2 (None: v2)."""
    query = {"model": model, "limit": str(limit)}
    if since is not None:
        query["from"] = _rfc3339(since)
    if offset is not None:
        query["offset"] = str(offset)
    elif cursor is not None:
        query["cursor"] = cursor
    if statuses:
        query["status"] = ",".join(statuses)
    if until is not None:
        query["to"] = _rfc3339(until)
    return query


def _rfc3339(moment: float) -> str:
    text = datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def read_listing(answer: dict[str, Any], *, v2: bool) -> Page:
    """One page's entries, oldest last as given; entries that cannot be read are counted."""
    entries = answer.get("executions")
    if not isinstance(entries, list):
        raise ProtocolViolation("listing: the answer has no list of executions", status=200)
    found, malformed = [], 0
    for entry in entries:
        pid = entry.get("id") if isinstance(entry, dict) else None
        status = entry.get("status") if isinstance(entry, dict) else None
        if not (isinstance(pid, str) and _PREDICTION_ID.fullmatch(pid) and ".." not in pid):
            malformed += 1
            continue
        if not isinstance(status, str) or not isinstance(entry, dict):
            malformed += 1
            continue
        cost = reading(entry.get("execution_cost"), MAX_JOB_COST_USD)
        found.append(Execution(pid, status, cost, _unix(entry)))
    if v2:
        cursor = answer.get("next_cursor")
        more = answer.get("has_more") is True and isinstance(cursor, str) and bool(cursor)
        return Page(found, cursor if more else None, malformed)
    total = answer.get("total_count")
    count = total if isinstance(total, int) and not isinstance(total, bool) else None
    return Page(found, None, malformed, count)


def _unix(entry: dict[str, Any]) -> float | None:
    value = entry.get("created_at")
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None
