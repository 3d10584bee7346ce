"""The provider's calls, and the one place where transport errors and provider answers are
translated into `pipeline.core.errors`.

One `httpx.AsyncClient` per run: explicit timeouts, a pool sized to the run's slots (so no
request waits, or is cancelled, in the pool's queue), the environment's proxies and CA bundle
(`HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY`, `SSL_CERT_FILE`), HTTP/2 when asked. Unit tests give
it an `httpx.MockTransport`; everything else is the same code. A prediction id comes from the
provider and goes back into a URL path: it must look like one, and it is percent-encoded.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import structlog

from pipeline import __version__
from pipeline.core import (
    TRANSIENT_ERROR_CODES,
    ApiError,
    ApiKey,
    BalanceShort,
    Forbidden,
    InvalidInput,
    NotFound,
    ProtocolViolation,
    RateLimited,
    ServerError,
    SystemClock,
    TransportFailure,
    Unauthorized,
    UnsafePredictionId,
    tls_context,
)
from pipeline.provider.listing import (
    V1_ROWS,
    V2_STATUSES,
    Execution,
    listing_query,
    read_listing,
)
from pipeline.provider.readings import MAX_JOB_COST_USD, MAX_PREDICT_TIME_S, reading

_log = structlog.get_logger("pipeline.provider.client")

__all__ = [
    "EachlabsClient",
    "Health",
    "Listed",
    "Prediction",
    "check_prediction_id",
    "parse_retry_after",
]

_PAGE = 100  # executions a listing page holds at most (the largest `limit`)
# A gateway error means the request may have reached the provider and been carried out.
_AMBIGUOUS_STATUSES = (502, 504)
# Raised before the request left: the provider cannot have seen it.
_NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.ProxyError,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
)
# statuses of a prediction still running; any other unknown one is taken as running too
_RUNNING = frozenset({"created", "starting", "queued", "processing", "in_queue", "running"})
_unknown_seen: set[str] = set()
# What a prediction id may hold: it goes back into request paths
_PREDICTION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass(frozen=True, slots=True)
class Prediction:
    """One poll's answer: `running`, `success` (with outputs), `error` (with the provider's
    error code and message; `transient` when its advice is to retry) or `cancelled`.
    `cost_usd` is the provider's own figure for the job (`metrics.cost`), when it gives one."""

    prediction_id: str
    status: str
    output_urls: tuple[str, ...] = ()
    predict_time_s: float | None = None
    message: str = ""
    error_code: str | None = None
    cost_usd: float | None = None
    served_by: str | None = None  # the backup model of a fallback chain that served it

    @property
    def terminal(self) -> bool:
        return self.status != "running"

    @property
    def transient(self) -> bool:
        return self.error_code in TRANSIENT_ERROR_CODES


@dataclass(frozen=True, slots=True)
class Listed:
    """A window of the executions listing: its entries newest first, whether that is all of
    them (else the page budget or v1's prefix ended the read), the entries that could not be
    read, and the pages it took."""

    entries: list[Execution]
    whole: bool
    malformed: int
    pages: int


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: whole seconds, a decimal or an HTTP date.
    None when absent or unreadable (the caller falls back to backoff)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def _describe(response: httpx.Response) -> str:
    """What an error answer says: `{"status": "error", "message", "details"}`, or the fuller
    reference's `{"error": "..."}`; never parsed for meaning."""
    try:
        body = json.loads(response.content)
    except ValueError:
        return response.content[:200].decode("utf-8", "replace") or response.reason_phrase
    if isinstance(body, dict):
        parts = [str(body.get(k)) for k in ("message", "details", "error") if body.get(k)]
        return ": ".join(parts)[:500] or response.reason_phrase
    return response.reason_phrase


def _name(exc: BaseException) -> str:
    """How a transport failure is named in messages: the lower library's words, no secrets."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _certificate_refused(exc: BaseException) -> bool:
    """Whether a connection failed because the server's certificate was not trusted."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _path(prediction_id: str) -> str:
    return f"prediction/{quote(check_prediction_id(prediction_id), safe='')}"


def _failure(answer: dict[str, Any]) -> tuple[str | None, str]:
    """A failed prediction's error code and message: `output.error_code`/`error_message`, or
    the older string `output` or `message`/`details`, or the reference's `logs`. Never parsed
    for meaning."""
    output = answer.get("output")
    if isinstance(output, dict):
        code = output.get("error_code")
        message = output.get("error_message")
        return (str(code) if code else None), str(message or code or "the provider failed it")
    parts = [str(answer[k]) for k in ("message", "details", "error", "logs") if answer.get(k)]
    if isinstance(output, str) and output:
        parts.insert(0, output)
    return None, ": ".join(parts)[:500] or "the provider reported an error"


def check_prediction_id(value: object) -> str:
    """`value` when it looks like a prediction id; UnsafePredictionId otherwise."""
    if isinstance(value, str) and _PREDICTION_ID.fullmatch(value) and ".." not in value:
        return value
    shown = repr(value)[:60] + ("..." if len(repr(value)) > 60 else "")
    raise UnsafePredictionId(
        f"the provider gave a prediction id that is not one ({shown}): letters, digits and "
        "._:- only, at most 128; the job may exist and be billed",
        status=200,
        ambiguous=True,
    )


class Health:
    """Whether the provider answers at all: since when every request has failed with a
    transport error or a 5xx (None while it answers), on the running loop's clock."""

    def __init__(self) -> None:
        self.failing_since: float | None = None
        self._clock = SystemClock()

    def answered(self) -> None:
        self.failing_since = None

    def failed(self) -> None:
        if self.failing_since is None:
            self.failing_since = self._clock.now()

    def down_for(self) -> float:
        """Seconds every request has failed, 0 while it answers."""
        since = self.failing_since
        return 0.0 if since is None else self._clock.now() - since


class EachlabsClient:
    """Creates and polls predictions; every failure comes out as an `ApiError` subclass."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        max_connections: int = 16,
        http2: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        auth: str = "bearer",
        fallback_selector: str | None = None,
    ) -> None:
        self.model = model
        self.health = Health()
        self._bearer = auth == "bearer"
        self._fallback = fallback_selector
        # the cursor-paged listing sits beside the versioned base URL; without one, v1 alone
        base = base_url.rstrip("/")
        self._v2 = base.removesuffix("/v1") + "/v2/executions" if base.endswith("/v1") else None
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout, pool=connect_timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            http2=http2,
            trust_env=True,
            verify=tls_context(),
            transport=transport,
            follow_redirects=False,
            headers={"User-Agent": f"wanbatch/{__version__}"},
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def create(
        self,
        key: ApiKey,
        inputs: dict[str, Any],
        *,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
    ) -> str:
        """Start a prediction; its id. Errors whose `ambiguous` is set may have created it."""
        body: dict[str, Any] = {"model": self.model, "input": inputs}
        if self._fallback is not None:
            body["fallback_selector"] = self._fallback
        if webhook_url is not None:
            body["webhook_url"] = webhook_url
            if webhook_secret is not None:
                body["webhook_secret"] = webhook_secret
        answer = await self._send("POST", "prediction/", key, body, creating=True)
        return check_prediction_id(answer.get("predictionID"))  # a missing one too: final

    async def get(self, key: ApiKey, prediction_id: str) -> Prediction:
        """One poll. Every terminal status the provider documents ends the job: `success`,
        `error` or `failed` (the reference's word for it), `cancelled`."""
        answer = await self._send("GET", _path(prediction_id), key, None, creating=False)
        status = answer.get("status")
        metrics = answer.get("metrics")
        metrics = metrics if isinstance(metrics, dict) else {}
        seconds = reading(metrics.get("predict_time"), MAX_PREDICT_TIME_S)
        cost = reading(metrics.get("cost"), MAX_JOB_COST_USD)
        fallback = answer.get("fallback")
        served = fallback.get("served_model") if isinstance(fallback, dict) else None
        served = served[:200] if isinstance(served, str) and served else None
        if status == "success":
            output = answer.get("output")
            if isinstance(output, str):
                output = [output]
            if not isinstance(output, list) or not all(isinstance(u, str) for u in output):
                raise ProtocolViolation("a successful poll has no list of output URLs", status=200)
            urls = tuple(output)
            return Prediction(
                prediction_id, "success", urls, seconds, cost_usd=cost, served_by=served
            )
        if status in ("error", "failed"):
            code, message = _failure(answer)
            return Prediction(prediction_id, "error", (), seconds, message, code, cost)
        if status in ("cancelled", "canceled"):
            said = "cancelled at the provider"
            return Prediction(prediction_id, "cancelled", (), seconds, said, cost_usd=cost)
        if not isinstance(status, str) or not status:
            raise ProtocolViolation(f"poll answered without a status ({status!r})", status=200)
        if status not in _RUNNING and status not in _unknown_seen:
            _unknown_seen.add(status)  # any other status means running: said once a run
            _log.warning("unknown_status", status=status[:40], taken_as="running")
        return Prediction(prediction_id, "running")

    async def executions(
        self,
        key: ApiKey,
        statuses: tuple[str, ...],
        since: float | None,
        *,
        until: float | None = None,
        pages: int,
    ) -> Listed:
        """The executions of our model in `statuses` (any, when empty) created from `since` to
        `until` (Unix seconds on the provider's clock), newest first, at most `pages` pages of
        100: by v2's cursor, or by v1's offset where v2 is missing (404) and never past v1's
        1,000-row prefix. NotFound when the provider has no listing at all."""
        if self._v2 is not None:
            try:
                return await self._read_pages(key, statuses, since, until, pages, v2=True)
            except NotFound:
                self._v2 = None  # v1 from now on
                _log.info("listing_v1", hint="the provider has no /v2/executions: v1's offset")
        return await self._read_pages(key, statuses, since, until, pages, v2=False)

    async def _read_pages(
        self,
        key: ApiKey,
        statuses: tuple[str, ...],
        since: float | None,
        until: float | None,
        pages: int,
        *,
        v2: bool,
    ) -> Listed:
        """Up to `pages` pages of the listing: v2's, following its cursor, or v1's by offset
        within its prefix."""
        path = str(self._v2) if v2 else "executions"
        wanted = tuple(s for s in statuses if s in V2_STATUSES) if v2 else statuses
        found: list[Execution] = []
        malformed = offset = 0
        cursor: str | None = None
        for read in range(1, pages + 1):
            if not v2 and offset > V1_ROWS - _PAGE:
                return Listed(found, False, malformed, read - 1)
            at = None if v2 else offset
            query = listing_query(self.model, wanted, since, _PAGE, at, until, cursor)
            answer = await self._send("GET", path, key, None, what="listing", params=query)
            page = read_listing(answer, v2=v2)
            found.extend(page.entries)
            malformed += page.malformed
            got = len(page.entries) + page.malformed
            offset, cursor = offset + got, page.next_cursor
            last = cursor is None if v2 else got < _PAGE or offset >= (page.total or math.inf)
            if last:
                return Listed(found, True, malformed, read)
        return Listed(found, False, malformed, pages)

    async def balance(self, key: ApiKey) -> float | None:
        """The organisation's balance in USD (`GET /v1/billing/balance`), or None where the
        provider has no such endpoint (404) or cannot read it now (503)."""
        try:
            answer = await self._send(
                "GET", "billing/balance", key, None, what="balance", whole=True
            )
        except (NotFound, ServerError):
            return None
        if isinstance(answer, dict):
            answer = answer.get("balance", answer.get("amount"))
        return reading(answer, 1e12) if answer is not None else None

    async def model_cost(self, key: ApiKey) -> float | None:
        """The provider's estimate of one image's cost (`GET /v1/models/{slug}`'s `cost`), or
        None where it gives none."""
        try:
            answer = await self._send("GET", f"models/{quote(self.model, safe='')}", key, None)
        except NotFound:
            return None
        return reading(answer.get("cost"), MAX_JOB_COST_USD)

    async def created_with(self, key: ApiKey, prediction_id: str) -> dict[str, Any] | None:
        """The input a prediction was created with, as its `GET` tells it; None when the
        answer carries none (a provider whose `GET` lacks it)."""
        answer = await self._send("GET", _path(prediction_id), key, None, creating=False)
        inputs = answer.get("input")
        return inputs if isinstance(inputs, dict) else None

    async def cancel(self, key: ApiKey, prediction_id: str) -> bool:
        """Ask the provider to cancel a job: True when it answered as accepted, False when it
        said the job had ended (or is unknown to it); ApiError when the request itself failed.
        The answer is a request's, not the job's end: a job that ended a moment before may be
        answered 200 all the same, and a cancel may take a while. Only a poll tells the end."""
        try:
            await self._send("POST", f"{_path(prediction_id)}/cancel", key, None, creating=False)
        except (NotFound, ProtocolViolation) as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    async def _send(
        self,
        method: str,
        path: str,
        key: ApiKey,
        body: dict[str, Any] | None,
        *,
        creating: bool = False,
        what: str = "poll",
        params: dict[str, str] | None = None,
        whole: bool = False,
    ) -> Any:
        what = "create" if creating else what
        if self._bearer:
            headers = {"Authorization": f"Bearer {key.secret}"}
        else:
            headers = {"X-API-Key": key.secret}
        if body is not None:
            headers["Content-Type"] = "application/json"
        payload = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        try:
            response = await self._http.request(
                method, path, content=payload, headers=headers, params=params
            )
        except _NOT_SENT as exc:
            if not _certificate_refused(exc):  # that lasts: the rows say so, not an outage
                self.health.failed()
            raise TransportFailure(f"{what}: cannot reach the provider ({_name(exc)})") from exc
        except httpx.TransportError as exc:
            self.health.failed()
            raise TransportFailure(
                f"{what}: no answer from the provider ({_name(exc)})", ambiguous=creating
            ) from exc
        except httpx.HTTPError as exc:  # an answer that cannot be decoded (a false gzip, ...)
            raise ProtocolViolation(
                f"{what}: the answer cannot be read ({_name(exc)})", ambiguous=creating
            ) from exc
        if response.status_code >= 500:
            self.health.failed()
        else:
            self.health.answered()
        return self._read(response, what, creating, whole)

    @staticmethod
    def _read(response: httpx.Response, what: str, creating: bool, whole: bool = False) -> Any:
        """The answer's JSON object (any JSON value when `whole`), or the error it is."""
        status = response.status_code
        if status < 300:
            try:
                answer = json.loads(response.content.decode())  # UTF-8: nothing to detect
            except ValueError as exc:
                raise ProtocolViolation(
                    f"{what}: the answer is not JSON", status=status, ambiguous=creating
                ) from exc
            if not isinstance(answer, dict) and not whole:
                raise ProtocolViolation(
                    f"{what}: the answer is not a JSON object", status=status, ambiguous=creating
                )
            return answer
        said = _describe(response)
        detail = f"{what}: HTTP {status}: {said}"
        error: ApiError
        if status == 400:
            error = InvalidInput(detail, status=status)
        elif status == 401:
            error = Unauthorized(detail, status=status)
        elif status == 402 or (status == 429 and "balance" in said.lower()):
            # the organisation's balance: nothing was made (the low-balance 429 says so)
            error = BalanceShort(detail, status=status)
        elif status == 403:
            error = Forbidden(detail, status=status)
        elif status == 404:
            error = NotFound(detail, status=status)
        elif status == 429:
            error = RateLimited(
                detail, retry_after=parse_retry_after(response.headers.get("retry-after"))
            )
        elif status >= 500:
            error = ServerError(
                detail, status=status, ambiguous=creating and status in _AMBIGUOUS_STATUSES
            )
        else:  # another refusal (4xx) made nothing; anything else may have
            refused = 400 <= status < 500
            error = ProtocolViolation(detail, status=status, ambiguous=creating and not refused)
        raise error


async def read_balance(
    base_url: str, model: str, key: ApiKey, *, auth: str = "bearer", wait_s: float = 10.0
) -> float | None:
    """The organisation's balance in USD, read once with a client of its own; None where the
    provider does not tell it (no endpoint, 503) or cannot be reached: a run does not stop for
    want of it."""
    client = EachlabsClient(base_url, model, connect_timeout=wait_s, read_timeout=wait_s, auth=auth)
    try:
        return await client.balance(key)
    except ApiError as exc:
        _log.info("balance_unread", error=str(exc))
        return None
    finally:
        await client.aclose()
