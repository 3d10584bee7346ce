"""Webhook mode: a receiver for the provider's job-end callbacks, and the hints they give workers.

A callback is never trusted: its body is not read beyond `exec_id`. It only wakes the worker
that waits on that prediction, which then polls the provider to confirm (a forged callback
costs one poll and nothing else). The receiver's path ends in a random token made per process,
so a callback is only accepted from whoever was given the URL with our creates.

The receiver runs in a background thread with its own event loop (uvicorn); a callback is
handed to the run's event loop with `call_soon_threadsafe`. `Callbacks` also judges whether
callbacks arrive at all: after `missed_callbacks` job ends in a row found by a fallback poll,
it says so once and the workers poll as in polling mode until a callback comes again.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self

import anyio
import structlog
from starlette.types import Receive, Scope, Send

from pipeline.config import WebhookSection
from pipeline.errors import ConfigError
from pipeline.sandbox.server import ServerThread

__all__ = ["CallbackStats", "Callbacks", "Receiver", "Waiter"]

_log = structlog.get_logger("pipeline.webhook")
_MAX_BODY = 64 * 1024
_REMEMBERED = 4096  # ids hinted before they were waited for, and ids just finished


@dataclass(slots=True)
class Waiter:
    """One job waiting for its end: `event` is set by a callback (or a change of mode)."""

    prediction_id: str
    event: anyio.Event = field(default_factory=anyio.Event)
    hinted: bool = False  # a callback for this job came since the last re-arm

    def rearm(self) -> None:
        if self.event.is_set():
            self.event = anyio.Event()
        self.hinted = False


@dataclass
class CallbackStats:
    received: int = 0  # accepted by the receiver (right token, an exec_id)
    unknown: int = 0  # for no job of this run in flight
    unconfirmed: int = 0  # the confirming poll found the job still running
    ends_by_callback: int = 0
    ends_by_fallback: int = 0  # found by a fallback poll: its callback did not come in time
    ends_by_poll: int = 0  # found on the poll schedule (after a contradicted callback)


class Callbacks:
    """The prediction ids waited on, the hints that wake them, and whether callbacks arrive."""

    def __init__(self, missed_limit: int) -> None:
        self.missed_limit = missed_limit
        self.stats = CallbackStats()
        self._waiting: dict[str, Waiter] = {}
        self._early: OrderedDict[str, None] = OrderedDict()
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._misses = 0

    @property
    def arriving(self) -> bool:
        """False once `missed_limit` ends in a row were found without their callback."""
        return self._misses < self.missed_limit

    def expect(self, prediction_id: str) -> Waiter:
        waiter = Waiter(prediction_id)
        self._waiting[prediction_id] = waiter
        if prediction_id in self._early:  # its callback came before its create's answer
            del self._early[prediction_id]
            self.stats.unknown -= 1  # it was ours after all
            waiter.hinted = True
            waiter.event.set()
        return waiter

    def hint(self, prediction_id: str) -> None:
        """A callback named this prediction (runs on the run's event loop)."""
        self.stats.received += 1
        waiter = self._waiting.get(prediction_id)
        if waiter is None:
            if prediction_id in self._recent:
                self._heard()  # late, but callbacks do arrive
            else:
                self.stats.unknown += 1
                _remember(self._early, prediction_id)
            return
        self._heard()
        waiter.hinted = True
        waiter.event.set()

    def ended(self, waiter: Waiter, seen_by: Literal["callback", "fallback", "poll"]) -> None:
        """The job's end was confirmed by a poll woken by its callback, by a fallback poll
        (its callback missed), or by a poll of the schedule (which says nothing of callbacks)."""
        self._waiting.pop(waiter.prediction_id, None)
        _remember(self._recent, waiter.prediction_id)
        if seen_by == "poll":
            self.stats.ends_by_poll += 1
            return
        if seen_by == "callback":
            self.stats.ends_by_callback += 1
            self._heard()
            return
        self.stats.ends_by_fallback += 1
        self._misses += 1
        if self._misses == self.missed_limit:
            _log.warning(
                "callbacks_missing",
                ends_without_callback=self._misses,
                hint="check webhook.public_url reaches this machine; polling meanwhile",
            )
            for other in self._waiting.values():
                other.event.set()  # re-plan on the polling schedule now

    def forget(self, waiter: Waiter) -> None:
        """The job left without an end confirmed (timeout, key refused, cancelled)."""
        self._waiting.pop(waiter.prediction_id, None)

    def _heard(self) -> None:
        if not self.arriving:
            _log.warning("callbacks_arriving_again")
        self._misses = 0


def _remember(ids: OrderedDict[str, None], prediction_id: str) -> None:
    ids[prediction_id] = None
    if len(ids) > _REMEMBERED:
        ids.popitem(last=False)


class Receiver:
    """The HTTP receiver in its own thread: `with Receiver(section, callbacks) as r: r.url`."""

    def __init__(self, section: WebhookSection, callbacks: Callbacks) -> None:
        self._token = secrets.token_urlsafe(32)
        self.callbacks = callbacks
        self._loop = asyncio.get_running_loop()
        try:
            self._server = ServerThread(self._app, section.listen_port, section.listen_host)
        except OSError as exc:
            raise ConfigError(
                f"webhook.listen_port: cannot listen on {section.listen_host}:"
                f"{section.listen_port} ({exc.strerror})"
            ) from None
        self.public_base = section.public_url or self._server.root_url

    @property
    def url(self) -> str:
        """The URL given to the provider with each create: a secret, never logged."""
        return f"{self.public_base}/{self._token}"

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The receiver as a bare ASGI app: one route, a few lines, no framework per callback."""
        if scope["type"] != "http":
            return  # lifespan is off
        status, text = await self._answer(scope, receive)
        body = text.encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, scope: Scope, receive: Receive) -> tuple[int, str]:
        token = str(scope["path"]).rsplit("/", 1)[-1]
        if not hmac.compare_digest(token.encode(), self._token.encode()):
            return 404, "not found"
        if scope["method"] != "POST":
            return 405, "POST only"
        raw = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return 499, ""
            raw += message.get("body", b"")
            if len(raw) > _MAX_BODY:
                return 413, "body too large"
            if not message.get("more_body", False):
                break
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        exec_id = body.get("exec_id") if isinstance(body, dict) else None
        if not isinstance(exec_id, str) or not exec_id or len(exec_id) > 200:
            return 400, "expected a JSON object with exec_id"
        try:
            self._loop.call_soon_threadsafe(self.callbacks.hint, exec_id)
        except RuntimeError:  # the run's loop is closed: the run is over
            return 503, "not running"
        return 200, "ok"

    def __enter__(self) -> Self:
        self._server.start()
        _log.info("webhook_receiver", listening=self._server.root_url, public=self.public_base)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.stop()
