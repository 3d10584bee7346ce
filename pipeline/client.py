"""The provider's two calls, and the one place where transport errors and provider answers
are translated into `pipeline.errors`.

Requests go over `pipeline.wire` (a lean keep-alive HTTP/1.1 client: the CPU budget is a few
requests per job); given an httpx transport instead (`httpx.MockTransport` in unit tests), they
go over httpx, with the same translation.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import httpx

from pipeline.errors import (
    ApiError,
    InvalidInput,
    NotFound,
    ProtocolViolation,
    RateLimited,
    ServerError,
    TransportFailure,
    Unauthorized,
)
from pipeline.keys import ApiKey
from pipeline.wire import ConnectionLost, NotSent, WirePool, WireResponse

__all__ = ["EachlabsClient", "Prediction", "parse_retry_after"]

# A gateway error means the request may have reached the provider and been carried out.
_AMBIGUOUS_STATUSES = (502, 504)
# Raised before the request left: the provider cannot have seen it.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


@dataclass(frozen=True, slots=True)
class Prediction:
    """One poll's answer: `processing`, `success` (with outputs) or `error` (with a message)."""

    prediction_id: str
    status: str
    output_urls: tuple[str, ...] = ()
    predict_time_s: float | None = None
    message: str = ""

    @property
    def terminal(self) -> bool:
        return self.status in ("success", "error")


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


def _describe(response: WireResponse) -> str:
    try:
        body = json.loads(response.body)
    except ValueError:
        return response.body[:200].decode("utf-8", "replace") or response.reason
    if isinstance(body, dict):
        parts = [str(body.get(k)) for k in ("message", "details") if body.get(k)]
        return ": ".join(parts)[:500] or response.reason
    return response.reason


def _name(exc: BaseException) -> str:
    """How a transport failure is named in messages: the lower library's words, no secrets."""
    return str(exc) if isinstance(exc, NotSent | ConnectionLost) else type(exc).__name__


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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.model = model
        self._base = base_url.rstrip("/")
        self._wire: WirePool | None = None
        self._http: httpx.AsyncClient | None = None
        if transport is None:
            self._wire = WirePool(
                self._base,
                max_connections=max_connections,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
            )
        else:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
                transport=transport,
                follow_redirects=False,
            )

    async def aclose(self) -> None:
        if self._wire is not None:
            await self._wire.aclose()
        if self._http is not None:
            await self._http.aclose()

    async def create(
        self, key: ApiKey, inputs: dict[str, Any], *, webhook_url: str | None = None
    ) -> str:
        """Start a prediction; its id. Errors whose `ambiguous` is set may have created it."""
        body: dict[str, Any] = {"model": self.model, "input": inputs}
        if webhook_url is not None:
            body["webhook_url"] = webhook_url
        answer = await self._send("POST", "/prediction/", key, body, creating=True)
        prediction_id = answer.get("predictionID")
        if not isinstance(prediction_id, str) or not prediction_id:
            raise ProtocolViolation(
                "create answered without a predictionID", status=200, ambiguous=True
            )
        return prediction_id

    async def get(self, key: ApiKey, prediction_id: str) -> Prediction:
        answer = await self._send("GET", f"/prediction/{prediction_id}", key, None, creating=False)
        status = answer.get("status")
        if status not in ("processing", "success", "error", "starting", "queued"):
            raise ProtocolViolation(f"poll answered an unknown status {status!r}", status=200)
        if status != "success":
            message = (
                ": ".join(str(answer[k]) for k in ("message", "details") if answer.get(k))
                or "the provider reported an error"
            )
            return Prediction(
                prediction_id,
                "error" if status == "error" else "processing",
                message=message if status == "error" else "",
            )
        output = answer.get("output")
        if isinstance(output, str):
            output = [output]
        if not isinstance(output, list) or not all(isinstance(u, str) for u in output):
            raise ProtocolViolation("a successful poll has no list of output URLs", status=200)
        metrics = answer.get("metrics")
        predict_time = metrics.get("predict_time") if isinstance(metrics, dict) else None
        return Prediction(
            prediction_id,
            "success",
            tuple(output),
            float(predict_time) if isinstance(predict_time, int | float) else None,
        )

    async def _send(
        self, method: str, path: str, key: ApiKey, body: dict[str, Any] | None, *, creating: bool
    ) -> dict[str, Any]:
        what = "create" if creating else "poll"
        payload = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = {"X-API-Key": key.secret}
        try:
            if self._wire is not None:
                response = await self._wire.request(method, path, headers, payload)
            else:
                response = await self._via_httpx(method, path, headers, payload)
        except (NotSent, *_NOT_SENT) as exc:
            raise TransportFailure(f"{what}: cannot reach the provider ({_name(exc)})") from exc
        except (ConnectionLost, httpx.TransportError) as exc:
            raise TransportFailure(
                f"{what}: no answer from the provider ({_name(exc)})", ambiguous=creating
            ) from exc
        return self._read(response, what, creating)

    async def _via_httpx(
        self, method: str, path: str, headers: dict[str, str], payload: bytes | None
    ) -> WireResponse:
        assert self._http is not None
        if payload is not None:
            headers = {**headers, "Content-Type": "application/json"}
        response = await self._http.request(
            method, self._base + path, content=payload, headers=headers
        )
        return WireResponse(
            response.status_code,
            response.reason_phrase,
            {k.lower(): v for k, v in response.headers.items()},
            response.content,
        )

    @staticmethod
    def _read(response: WireResponse, what: str, creating: bool) -> dict[str, Any]:
        status = response.status
        if status < 300:
            try:
                answer = json.loads(response.body.decode())  # UTF-8: nothing to detect
            except ValueError as exc:
                raise ProtocolViolation(
                    f"{what}: the answer is not JSON", status=status, ambiguous=creating
                ) from exc
            if not isinstance(answer, dict):
                raise ProtocolViolation(
                    f"{what}: the answer is not a JSON object", status=status, ambiguous=creating
                )
            return answer
        detail = f"{what}: HTTP {status}: {_describe(response)}"
        error: ApiError
        if status == 400:
            error = InvalidInput(detail, status=status)
        elif status == 401:
            error = Unauthorized(detail, status=status)
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
        else:
            error = ProtocolViolation(detail, status=status, ambiguous=creating)
        raise error
