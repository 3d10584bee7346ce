"""`GET /v1/executions` and (in the "today" shape) `GET /v2/executions`: executions newest
first, a key's in the reference's shape, the whole organisation's today, on the provider's clock
(`clock_offset_s`) and `listing_lag_s` behind.

Query: `limit` (1-100, default 20), `offset`, `model`, `status` (comma-separated), `from` and
`to` (creation time, RFC 3339). Each entry has `id`, `model`, `status`, `execution_cost`,
`run_time`, `created_at`, `started_at`, `completed_at`, `output`, `workflow_id` and
`workflow_execution_id`; no input (a prediction's `GET` has it). A job due to end ends (and is
billed) as the listing is read, as it would on a poll. `SandboxSettings.listing` off answers
404, as a provider without the listing would.
"""

from __future__ import annotations

import base64
import json
import time
from bisect import bisect_left, bisect_right
from datetime import UTC, datetime
from typing import Any, NamedTuple

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline.core import SandboxSettings
from pipeline.sandbox.state import Job, SandboxState

__all__ = ["V1_REFUSAL", "executions", "executions_v2"]

_RUNNING = {"created": "starting"}  # a running job's status, in the reference's words
# ("today") v1 refuses pages past this prefix, with this answer
V1_ROWS = 1000
V1_REFUSAL = (
    "V1 execution pagination is limited to 1000 rows; use GET /v2/executions with cursor pagination"
)
_V2_PARAMS = frozenset({"model", "status", "from", "to", "limit", "cursor", "error_classification"})
_V2_STATUSES = frozenset({"created", "starting", "processing", "success", "error", "cancelled"})


def _when(value: str | None, name: str) -> float | str | None:
    """An RFC 3339 instant as Unix seconds, None when absent, or the rule it breaks."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return f"{name}: not an RFC 3339 time ({value[:40]!r})"
    if moment.tzinfo is None:
        return f"{name}: an RFC 3339 time needs its offset ({value[:40]!r})"
    return moment.timestamp()


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat().replace("+00:00", "Z")


def _shown(state: SandboxState, job: Job, today: bool) -> tuple[str, bool]:
    """The job's status as the listing says it, and whether it has ended (a job due to end
    ends now, billed, as on a poll)."""
    ended = state.finish_due(job)
    status = job.status(state.now())
    if ended and job.cancelled:
        status = "cancelled"
    elif ended:
        status = ("error" if today else "failed") if job.fails else "success"
    if not today:
        status = _RUNNING.get(status, status)
    return status, ended


def _entry(
    state: SandboxState, job: Job, shown: tuple[str, bool], model: str, to_wall: float, today: bool
) -> dict[str, Any]:
    status, ended = shown
    output: Any = None
    if ended and not job.cancelled:
        output = job.failure() if job.fails else job.output_urls()
    return {
        "id": job.prediction_id,
        "model": model,
        "status": status,
        "execution_cost": state.cost(job) if ended else None,
        "run_time": state.predict_time(job) if ended else None,
        "created_at": _iso(job.created_at + to_wall),
        "started_at": _iso(job.created_at + to_wall),
        "completed_at": _iso(job.ends_at + to_wall) if ended else None,
        "output": output,
        "workflow_id": None,
        "workflow_execution_id": None,
    } | ({"requested_model": model} if today else {})


def _query(request: Request) -> dict[str, Any] | str:
    """The listing's query, checked: its values, or the first rule a value breaks."""
    params = request.query_params
    try:
        limit = int(params.get("limit", "20"))
        offset = int(params.get("offset", "0"))
    except ValueError:
        return "limit and offset: whole numbers"
    if not 1 <= limit <= 100:
        return "limit: from 1 to 100"
    if offset < 0:
        return "offset: 0 or more"
    since, until = _when(params.get("from"), "from"), _when(params.get("to"), "to")
    for bound in (since, until):
        if isinstance(bound, str):
            return bound
    statuses = {s.strip() for s in params.get("status", "").split(",") if s.strip()}
    return {
        "limit": limit,
        "offset": offset,
        "model": params.get("model"),
        "statuses": statuses,
        "since": since,
        "until": until,
    }


def _visible(state: SandboxState, settings: SandboxSettings, key: str) -> list[Job]:
    """The jobs the listing can show the key, in creation order: its own, or ("today") the
    whole organisation's; those created less than `listing_lag_s` ago are not in it yet."""
    jobs = state.everyone if settings.today else state.by_key.get(key, [])
    if settings.listing_lag_s > 0:
        shown_by = state.now() - settings.scaled(settings.listing_lag_s)
        jobs = jobs[: bisect_right(jobs, shown_by, key=lambda j: j.created_at)]
    return jobs


Shown = tuple[Job, tuple[str, bool]]  # a job the listing selects, with its status and end


class _Selected(NamedTuple):
    query: dict[str, Any]
    found: list[Shown]  # newest first
    to_wall: float  # from the sandbox's clock to the provider's

    def entries(self, state: SandboxState, page: list[Shown], model: str, today: bool) -> list[Any]:
        """The page's entries, built for the jobs shown only (a listing may select thousands)."""
        return [_entry(state, job, shown, model, self.to_wall, today) for job, shown in page]


def _matching(
    request: Request, state: SandboxState, settings: SandboxSettings, key: str, model: str
) -> _Selected | Response:
    """The query, and the jobs it selects with their statuses, newest first; or the refusal."""
    if not settings.listing:
        return JSONResponse({"error": "Not found"}, status_code=404)
    query = _query(request)
    if isinstance(query, str):
        return JSONResponse({"error": query}, status_code=400)
    # the provider's clock: `clock_offset_s` ahead of this machine's
    to_wall = time.time() + settings.clock_offset_s - state.now()
    jobs = _visible(state, settings, key) if query["model"] in (None, model) else []
    since, until, statuses = query["since"], query["until"], query["statuses"]
    if since is not None:  # kept in creation order
        jobs = jobs[bisect_left(jobs, since - to_wall, key=lambda j: j.created_at) :]
    if until is not None:
        jobs = jobs[: bisect_right(jobs, until - to_wall, key=lambda j: j.created_at)]
    found = [(j, _shown(state, j, settings.today)) for j in reversed(jobs)]
    if statuses:
        found = [(j, shown) for j, shown in found if shown[0] in statuses]
    return _Selected(query, found, to_wall)


def executions(
    request: Request, state: SandboxState, settings: SandboxSettings, key: str, model: str
) -> Response:
    """`GET /v1/executions` for the request's key (authenticated): `offset` pages; in the
    "today" shape none past the 1,000-row prefix."""
    matched = _matching(request, state, settings, key, model)
    if isinstance(matched, Response):
        return matched
    query, found = matched.query, matched.found
    offset, limit = query["offset"], query["limit"]
    if settings.today and offset > V1_ROWS - limit:
        return JSONResponse({"error": V1_REFUSAL}, status_code=400)
    page = matched.entries(state, found[offset : offset + limit], model, settings.today)
    return JSONResponse(
        {"executions": page, "total_count": len(found), "offset": offset, "limit": limit}
    )


def executions_v2(
    request: Request, state: SandboxState, settings: SandboxSettings, key: str, model: str
) -> Response:
    """`GET /v2/executions` ("today" shape): the same filters, paged by an opaque cursor that
    names the last entry given (so jobs created meanwhile move no page)."""
    if not settings.today:
        return JSONResponse({"error": "Not found"}, status_code=404)
    unknown = set(request.query_params) - _V2_PARAMS
    statuses = {s.strip() for s in request.query_params.get("status", "").split(",")}
    if unknown or not statuses <= _V2_STATUSES | {""}:
        shown = ", ".join(sorted(unknown | (statuses - _V2_STATUSES - {""})))
        return JSONResponse({"error": f"unknown query values: {shown}"}, status_code=400)
    matched = _matching(request, state, settings, key, model)
    if isinstance(matched, Response):
        return matched
    query, found = matched.query, matched.found
    cursor = request.query_params.get("cursor")
    start = 0
    if cursor:
        try:
            at, pid = json.loads(base64.urlsafe_b64decode(cursor.encode()))
            after = (float(at), str(pid))
        except (ValueError, TypeError):
            return JSONResponse({"error": "cursor: not one this listing gave"}, status_code=400)
        # newest first: the first entry older than the cursor's
        start = next(
            (i for i, (j, _) in enumerate(found) if (j.created_at, j.prediction_id) < after),
            len(found),
        )
    page = found[start : start + query["limit"]]
    more = start + len(page) < len(found)
    last = page[-1][0] if page else None
    token = (
        base64.urlsafe_b64encode(json.dumps([last.created_at, last.prediction_id]).encode())
        if more and last is not None
        else None
    )
    return JSONResponse(
        {
            "executions": matched.entries(state, page, model, settings.today),
            "has_more": more,
            "next_cursor": token.decode() if token else None,
            "limit": query["limit"],
        }
    )
