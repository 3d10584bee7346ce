"""The sandbox's HTTP face: the provider's routes, bodies and errors, with faults injected.

Routes: `POST /v1/prediction/` (with or without the slash), `GET /v1/prediction/{id}`,
`POST /v1/prediction/{id}/cancel`, `GET /v1/executions` and `GET /v2/executions`,
`GET /v1/billing/balance`, `GET /v1/models/{slug}`, `GET /v1/outputs/{id}/{i}.jpg` (the images
a job returned), `GET /samples/{name}` (inputs for demos), and `GET /_admin/stats`,
`GET /_admin/ledger` (what was billed) and `POST /_admin/balance` (a top-up).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from pipeline.core import FaultRates, SandboxSettings
from pipeline.core.schema import (
    IMAGE_FIELDS,
    MODEL,
    check_input,
    check_url,
    is_loopback_host,
)
from pipeline.sandbox import images
from pipeline.sandbox.billing import afford, billing_routes
from pipeline.sandbox.hooks import Hooks, callback
from pipeline.sandbox.inputs import InputImages
from pipeline.sandbox.listing import executions, executions_v2
from pipeline.sandbox.signing import sign_body, sign_webhook
from pipeline.sandbox.state import Job, SandboxState

__all__ = ["DroppedConnection", "create_app", "sign_body", "sign_webhook"]

_log = logging.getLogger("pipeline.sandbox")


class DroppedConnection(Exception):
    """Raised after the answer has started, so the server drops the connection mid-answer."""


class _DroppingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, DroppedConnection) and not (
            isinstance(exc, BaseExceptionGroup) and exc.subgroup(DroppedConnection) is not None
        )


class _DropResponse(Response):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"512")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"status":', "more_body": True})
        raise DroppedConnection("sandbox fault: connection dropped")


async def _trickle(body: bytes, every: float) -> AsyncIterator[bytes]:
    """A body sent one byte at a time, `every` seconds apart: a download that never times out
    on a read, yet never ends."""
    for at in range(len(body)):
        yield body[at : at + 1]
        await asyncio.sleep(every)


def _error(
    status: int, message: str, details: str = "", headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"status": "error", "message": message, "details": details}
    return JSONResponse(body, status_code=status, headers=headers)


def _authenticate(request: Request, state: SandboxState, today: bool) -> str | Response:
    """The request's key: `Authorization: Bearer` (the one way today), or `X-API-Key` in the
    seed's and the reference's shapes."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    secret = token.strip() if scheme.lower() == "bearer" else None
    if secret is None and not today:
        secret = request.headers.get("x-api-key")
    key = state.key_name(secret)
    if key is None:
        if today:
            return JSONResponse({"error": "Invalid or missing API key"}, status_code=401)
        return _error(401, "Unauthorized", "missing or invalid X-API-Key")
    return key


class _Sandbox:
    def __init__(self, settings: SandboxSettings, state: SandboxState) -> None:
        self.settings = settings
        self.state = state
        self._tasks: set[asyncio.Task[None]] = set()
        self.inputs = InputImages(settings)
        self.hooks = Hooks(settings, state)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.inputs.aclose()
        await self.hooks.aclose()

    # -- helpers --------------------------------------------------------------------------

    async def _maybe_slow(self, faults: FaultRates) -> None:
        if self.state.chance(faults.slow):
            await asyncio.sleep(self.settings.scaled(faults.slow_s))

    def _server_fault(self, rate: float) -> Response | None:
        if self.state.chance(rate):
            status = 503 if self.state.chance(0.5) else 500
            return _error(status, "Internal error", "sandbox fault: try again later")
        return None

    def authenticate(self, request: Request) -> str | Response:
        return _authenticate(request, self.state, self.settings.today)

    # -- routes ---------------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        key = self.authenticate(request)
        if isinstance(key, Response):
            return key
        try:
            raw = await request.body()
        except ClientDisconnect:  # the client went away mid-request: nothing was created
            return Response(status_code=499)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.state.refuse_invalid(key, "body is not JSON")
            return _error(400, "Invalid request", "the body must be a JSON object")
        problem = self._check_body(body)
        if problem is not None:
            status, message = problem
            if status == 400:
                self.state.refuse_invalid(key, message)
            return _error(status, "Invalid request" if status == 400 else "Not found", message)
        faults = self.state.faults(key)
        await self._maybe_slow(faults)
        refusal = self.state.admit(key)
        if refusal is not None:
            retry_after = f"{max(refusal.retry_after, 0.001):.3f}"
            return _error(429, "Too many requests", refusal.reason, {"Retry-After": retry_after})
        if fault := self._server_fault(faults.create_5xx):
            return fault
        if self.state.chance(faults.early_502):  # as a lost answer looks, but nothing was made
            return _error(502, "Bad gateway", "sandbox fault: the gateway failed first")
        short = afford(self.state, key, int(body["input"].get("n", 1)))
        if short is not None:
            return JSONResponse({"error": short[1]}, status_code=short[0])
        job = self.state.accept(
            key,
            body["model"],
            body["input"],
            body.get("webhook_url"),
            str(request.base_url),
            body.get("webhook_secret"),
            fallback=bool(body.get("fallback_selector")),
        )
        self._fetch_inputs(job)
        self._schedule_end(job)
        if self.state.chance(faults.lost_create):
            self.state.note_lost_answer(job)
            if self.state.chance(0.5):
                return _error(502, "Bad gateway", "sandbox fault: upstream answer lost")
            return _DropResponse()
        return JSONResponse(
            {
                "status": "success",
                "message": "Prediction created",
                "predictionID": job.prediction_id,
            }
        )

    def _check_body(self, body: Any) -> tuple[int, str] | None:
        if not isinstance(body, dict):
            return 400, "the body must be a JSON object"
        known = {"model", "input", "webhook_url", "webhook_secret", "version"}
        if self.settings.today:
            known.add("fallback_selector")
        unknown = set(body) - known
        if unknown:
            return 400, f"unknown body fields: {', '.join(sorted(unknown))}"
        model = body.get("model")
        if not isinstance(model, str):
            return 400, "model: is required"
        if model != MODEL:
            return 404, f"unknown model {model!r}"
        inputs = body.get("input")
        if isinstance(inputs, str):
            return 400, "input: must be a JSON object, not a string of JSON"
        if not isinstance(inputs, dict):
            return 400, "input: is required and must be an object"
        violations = check_input(inputs, allow_loopback=self.settings.allow_loopback_urls)
        if violations:
            return 400, "; ".join(str(v) for v in violations)
        webhook = body.get("webhook_url")
        if webhook is not None and (
            rule := check_url(webhook, allow_loopback=self.settings.allow_loopback_urls)
        ):
            return 400, f"webhook_url: {rule}"
        return None

    def _own_job(self, request: Request) -> Job | Response:
        """The job the path names, if the request's key created it; else the refusal."""
        key = self.authenticate(request)
        if isinstance(key, Response):
            return key
        job = self.state.jobs.get(request.path_params["prediction_id"])
        # today, any key of the organisation reads its predictions
        if job is None or (job.key != key and not self.settings.today):
            return _error(404, "Not found", "unknown prediction id")
        return job

    async def poll(self, request: Request) -> Response:
        job = self._own_job(request)
        if isinstance(job, Response):
            return job
        faults = self.state.faults(job.key)
        await self._maybe_slow(faults)
        if fault := self._server_fault(faults.poll_5xx):
            return fault
        if self.state.chance(faults.poll_reset):
            return _DropResponse()
        if self.state.chance(faults.garbled_poll):
            headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
            return Response(b'{"status": "processing"} and not gzip', headers=headers)
        answer = self._job_body(job)
        if job.ended:
            job.terminal_polls += 1
        if "metrics" in answer and self.state.chance(faults.nonsense_metrics):
            # what Python's json writes for them, as a careless provider might
            nonsense = self.state.pick([math.nan, math.inf, 1e300])
            answer["metrics"] = {**answer["metrics"], "predict_time": nonsense}
            return Response(json.dumps(answer), media_type="application/json")
        return JSONResponse(answer)

    def _job_body(self, job: Job) -> dict[str, Any]:
        """A poll's answer, in the shape `api_shape` names."""
        body = self._seed_body(job)
        if self.settings.api_shape == "reference":
            body = _reference_shape(job, body)
        elif self.settings.today:
            body["id"] = job.prediction_id
            if job.served_by is not None and job.ended:
                body["fallback"] = {"requested_model": MODEL, "served_model": job.served_by}
        if self.settings.prediction_input:
            body["input"] = job.inputs
        return body

    def _seed_body(self, job: Job) -> dict[str, Any]:
        pid = job.prediction_id
        if not self.state.finish_due(job):
            return {"status": job.status(self.state.now()), "predictionID": pid}
        metrics: dict[str, Any] = {"predict_time": self.state.predict_time(job)}
        if self.settings.report_cost:
            metrics["cost"] = self.state.cost(job)
        if job.cancelled:
            return {"status": "cancelled", "predictionID": pid, "output": None, "metrics": metrics}
        if job.fails and self.settings.legacy_errors:
            details = f"sandbox fault: job error ({job.error_code})"
            return {
                "status": "error",
                "predictionID": pid,
                "output": None,
                "message": "Generation failed",
                "details": details,
                "metrics": metrics,
            }
        if job.fails:
            failure = job.failure()
            return {"status": "error", "predictionID": pid, "output": failure, "metrics": metrics}
        urls = job.output_urls()
        return {"status": "success", "predictionID": pid, "output": urls, "metrics": metrics}

    async def cancel(self, request: Request) -> Response:
        """A cancel: answered as accepted while the job runs (it may still lose the race to its
        own end, see `SandboxState.cancel`); for a job that has ended, 409 or, as a provider
        that does not say "too late", the same 200."""
        job = self._own_job(request)
        if isinstance(job, Response):
            return job
        if self.state.cancel(job):
            if job.ends_at > self.state.now():
                self._schedule_end(job)  # its callback, when the cancel takes a while
        elif self.settings.late_cancel == 409:
            return _error(409, "Conflict", "the prediction has ended already")
        if self.settings.api_shape == "reference":
            pid = job.prediction_id
            answer = {"status": "cancelled", "message": "Prediction canceled successfully"}
            return JSONResponse({**answer, "predictionID": pid})
        return JSONResponse({"status": "success", "message": "Prediction cancelled"})

    async def output(self, request: Request) -> Response:
        job = self.state.jobs.get(request.path_params["prediction_id"])
        index = int(request.path_params["index"])
        if job is None or not job.ended or job.fails or job.cancelled or not 0 <= index < job.n:
            return _error(404, "Not found", "no such output")
        urls = [str(job.inputs[f]) for f in IMAGE_FIELDS if job.inputs.get(f)]
        last = await self.inputs.image(urls[-1])
        first = last if len(urls) == 1 else await self.inputs.image(urls[0])
        size = images.target_size(
            str(job.inputs.get("size", "2K")), last.size, self.settings.image_scale
        )
        seed = int(job.inputs.get("seed", int(job.fingerprint[:8], 16)))
        faults = self.state.faults(job.key)
        fault = images.edit_fault(job.prediction_id, index, faults.edits())
        body = await asyncio.to_thread(images.render_output, first, size, seed, index, fault)
        if len(body) < self.settings.output_bytes:
            body = images.pad_jpeg(body, self.settings.output_bytes)
        if self.state.chance(faults.bad_output):
            body = bytes(len(body))  # as long as the image, but zeros
        elif self.state.chance(faults.truncated_output):
            body = body[: len(body) // 2]
        headers = {"Cache-Control": "max-age=86400"}
        if self.state.chance(faults.trickle_output):
            headers["Content-Length"] = str(len(body))
            slowly = _trickle(body, self.settings.scaled(faults.slow_s))
            return StreamingResponse(slowly, media_type="image/jpeg", headers=headers)
        return Response(body, media_type="image/jpeg", headers=headers)

    # -- inputs, fetched as the provider fetches them ------------------------------------------

    def _fetch_inputs(self, job: Job) -> None:
        """With `fetch_inputs`, fetch the job's loopback inputs in the background; the job
        cannot end before they are judged, and fails if one cannot be had."""
        if not (self.settings.fetch_inputs and self.settings.allow_loopback_urls):
            return
        urls = [str(job.inputs[f]) for f in IMAGE_FIELDS if job.inputs.get(f)]
        wanted = [
            u
            for u in urls
            if is_loopback_host(urlsplit(u).hostname or "")
            and not urlsplit(u).path.startswith("/samples/")
        ]
        if wanted:
            job.inputs_ready = False
            task = asyncio.ensure_future(self._judge_inputs(job, wanted))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _judge_inputs(self, job: Job, urls: list[str]) -> None:
        try:
            for url in urls:
                problem, size = await self.inputs.fetch(url)
                self.state.note_input(job, url, problem, size)
                if problem is not None:
                    break
        finally:
            job.inputs_ready = True
        if self.state.now() >= job.ends_at:
            self._on_end(job)  # its end came while the inputs were fetched

    async def sample(self, request: Request) -> Response:
        body = await asyncio.to_thread(images.sample_png, request.path_params["name"])
        if body is None:
            return _error(404, "Not found", "no such sample")
        return Response(body, media_type="image/png")

    async def stats(self, request: Request) -> Response:
        return JSONResponse(self.state.stats())

    async def ledger(self, request: Request) -> Response:
        return PlainTextResponse("\n".join(self.state.ledger_lines()) + "\n")

    # -- job ends and webhooks --------------------------------------------------------------

    def _schedule_end(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        delay = max(0.0, job.ends_at - self.state.now())
        loop.call_later(delay, self._on_end, job)

    def _on_end(self, job: Job) -> None:
        if not self.state.finish_due(job):
            return  # its inputs are still being fetched (that ends it), or a cancel moved it
        if job.webhook_url and not job.hooked:
            job.hooked = True
            task = asyncio.ensure_future(
                self.hooks.send(
                    job, *callback(self.settings, job, self._seed_body(job), self._job_body(job))
                )
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def create_app(settings: SandboxSettings, state: SandboxState | None = None) -> Starlette:
    """The sandbox as an ASGI app; `state` is made from settings unless given (tests pass one)."""
    sandbox = _Sandbox(settings, state or SandboxState(settings))
    logging.getLogger("uvicorn.error").addFilter(_DroppingFilter())

    async def listing(request: Request) -> Response:
        key = sandbox.authenticate(request)
        if isinstance(key, Response):
            return key
        return executions(request, sandbox.state, settings, key, MODEL)

    async def listing_v2(request: Request) -> Response:
        key = sandbox.authenticate(request)
        if isinstance(key, Response):
            return key
        return executions_v2(request, sandbox.state, settings, key, MODEL)

    routes = [
        Route("/v1/prediction", sandbox.create, methods=["POST"]),
        Route("/v1/prediction/", sandbox.create, methods=["POST"]),
        Route("/v1/prediction/{prediction_id}", sandbox.poll, methods=["GET"]),
        Route("/v1/outputs/{prediction_id}/{index:int}.jpg", sandbox.output, methods=["GET"]),
        Route("/samples/{name}", sandbox.sample, methods=["GET"]),
        Route("/v1/prediction/{prediction_id}/cancel", sandbox.cancel, methods=["POST"]),
        Route("/v1/executions", listing, methods=["GET"]),
        Route("/v2/executions", listing_v2, methods=["GET"]),
        *billing_routes(sandbox.authenticate, sandbox.state, settings),
        Route("/_admin/stats", sandbox.stats, methods=["GET"]),
        Route("/_admin/ledger", sandbox.ledger, methods=["GET"]),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await sandbox.aclose()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.sandbox = sandbox
    return app


def _reference_shape(job: Job, body: dict[str, Any]) -> dict[str, Any]:
    """A poll's answer in the seed's shape, as the API reference gives it (`failed`, `id`,
    `logs`, `urls`)."""
    pid = job.prediction_id
    status = {"error": "failed", "created": "starting"}.get(body["status"], body["status"])
    shaped: dict[str, Any] = {"id": pid, "status": status, "output": body.get("output")}
    failure = body.get("output") if isinstance(body.get("output"), dict) else None
    shaped["logs"] = f"{failure['error_code']}: {failure['error_message']}" if failure else ""
    if "metrics" in body:
        shaped["metrics"] = body["metrics"]
    get = f"{job.base_url}v1/prediction/{pid}"
    shaped["urls"] = {"get": get, "cancel": f"{get}/cancel"}
    return shaped
