"""`GET /v1/executions`: a key's executions, newest first, in the provider's reference shape.

Query: `limit` (1-100, default 20), `offset`, `model`, `status` (comma-separated), `from` and
`to` (creation time, RFC 3339). Each entry has `id`, `model`, `status`, `execution_cost`,
`run_time`, `created_at`, `started_at`, `completed_at`, `output`, `workflow_id` and
`workflow_execution_id`; no input (a prediction's `GET` has it). A job due to end ends (and is
billed) as the listing is read, as it would on a poll. `SandboxSettings.listing` off answers
404, as a provider without the listing would.
"""

from __future__ import annotations

import time
from bisect import bisect_left, bisect_right
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline.sandbox.settings import SandboxSettings
from pipeline.sandbox.state import Job, SandboxState

__all__ = ["executions"]

_RUNNING = {"created": "starting"}  # a running job's status, in the reference's words


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


def _entry(state: SandboxState, job: Job, model: str, to_wall: float) -> dict[str, Any]:
    ended = state.finish_due(job)
    status = job.status(state.now())
    output: Any = None
    if ended:
        if job.cancelled:
            status = "cancelled"
        elif job.fails:
            status, output = "failed", job.failure()
        else:
            status, output = "success", job.output_urls()
    return {
        "id": job.prediction_id,
        "model": model,
        "status": _RUNNING.get(status, status),
        "execution_cost": state.cost(job) if ended else None,
        "run_time": state.predict_time(job) if ended else None,
        "created_at": _iso(job.created_at + to_wall),
        "started_at": _iso(job.created_at + to_wall),
        "completed_at": _iso(job.ends_at + to_wall) if ended else None,
        "output": output,
        "workflow_id": None,
        "workflow_execution_id": None,
    }


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


def executions(
    request: Request, state: SandboxState, settings: SandboxSettings, key: str, model: str
) -> Response:
    """The listing of `key`'s executions (the request's key, authenticated)."""
    if not settings.listing:
        return JSONResponse({"error": "Not found"}, status_code=404)
    query = _query(request)
    if isinstance(query, str):
        return JSONResponse({"error": query}, status_code=400)
    to_wall = time.time() - state.now()
    jobs = state.by_key.get(key, []) if query["model"] in (None, model) else []
    since, until, statuses = query["since"], query["until"], query["statuses"]
    if since is not None:  # a key's jobs are kept in creation order
        jobs = jobs[bisect_left(jobs, since - to_wall, key=lambda j: j.created_at) :]
    if until is not None:
        jobs = jobs[: bisect_right(jobs, until - to_wall, key=lambda j: j.created_at)]
    found = [_entry(state, j, model, to_wall) for j in reversed(jobs)]  # newest first
    if statuses:
        found = [e for e in found if e["status"] in statuses]
    page = found[query["offset"] : query["offset"] + query["limit"]]
    return JSONResponse(
        {
            "executions": page,
            "total_count": len(found),
            "offset": query["offset"],
            "limit": query["limit"],
        }
    )
