"""The provider's executions listing, read in one place: a change of its shape at the real
provider is a change here.

`GET /v1/executions`, as the API reference gives it: query `model` (slug), `status`
(comma-separated), `from` and `to` (creation time, RFC 3339), `limit` (1-100) and `offset`;
answer `{"executions": [{"id", "model", "status", "execution_cost", "run_time", "created_at",
"started_at", "completed_at", "output", ...}], "total_count", "offset", "limit"}`, newest
first. No input in the listing. What a listing says of a job is a hint: a poll of the job
confirms its end (and reads its outputs and cost in the prediction's own shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipeline.core import ProtocolViolation
from pipeline.provider.readings import MAX_JOB_COST_USD, reading

__all__ = ["ENDED", "Execution", "listing_query", "read_listing"]

# the statuses of an execution that has ended, in the reference's words and the seed's
ENDED = ("success", "failed", "error", "cancelled", "canceled")


@dataclass(frozen=True, slots=True)
class Execution:
    """One entry of the listing: its prediction id, its status, what it cost (when the
    provider says) and when it was created (Unix seconds, when the provider says)."""

    prediction_id: str
    status: str
    cost_usd: float | None
    created_at: float | None


def listing_query(
    model: str,
    statuses: tuple[str, ...],
    since: float,
    limit: int,
    offset: int = 0,
    until: float | None = None,
) -> dict[str, str]:
    """The query of one page: `model`'s executions in `statuses` (any, when empty) created
    from `since` (to `until`, when given)."""
    query = {"model": model, "from": _rfc3339(since), "limit": str(limit), "offset": str(offset)}
    if statuses:
        query["status"] = ",".join(statuses)
    if until is not None:
        query["to"] = _rfc3339(until)
    return query


def _rfc3339(moment: float) -> str:
    text = datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def read_listing(answer: dict[str, Any]) -> tuple[list[Execution], int]:
    """The entries of one page, and how many the whole listing holds. Entries without an id
    or a status are left out (a job of ours is polled on its schedule all the same)."""
    entries = answer.get("executions")
    if not isinstance(entries, list):
        raise ProtocolViolation("listing: the answer has no list of executions", status=200)
    total = answer.get("total_count")
    found = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        pid, status = entry.get("id"), entry.get("status")
        if not isinstance(pid, str) or not isinstance(status, str):
            continue
        cost = reading(entry.get("execution_cost"), MAX_JOB_COST_USD)
        found.append(Execution(pid, status, cost, _unix(entry)))
    count = total if isinstance(total, int) and not isinstance(total, bool) else len(found)
    return found, count


def _unix(entry: dict[str, Any]) -> float | None:
    value = entry.get("created_at")
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None
