"""Webhook mode: a receiver for the provider's job-end callbacks, and the hints they give workers.

A callback is never trusted: its body is not read beyond `exec_id`. It only wakes the worker
that waits on that prediction, which then polls the provider to confirm (a forged callback
costs one poll and nothing else). The receiver's path ends in a random token made per process,
so a callback is only accepted from whoever was given the URL with our creates.

The receiver is served by the run's own event loop, an asyncio protocol over httptools' parser:
a callback costs a parse, a dictionary lookup and one write, with no thread to hand it across
(uvicorn in a thread cost about 0.5 ms of CPU per callback). `Callbacks` also judges whether
callbacks arrive at all: after `missed_callbacks` job ends in a row found by a fallback poll,
it says so once and the workers poll as in polling mode until a callback comes again.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import socket
from collections import OrderedDict
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self

import httptools
import structlog

from pipeline.config import WebhookSection
from pipeline.errors import ConfigError

__all__ = ["CallbackStats", "Callbacks", "Receiver", "Waiter"]

_log = structlog.get_logger("pipeline.webhook")
_MAX_BODY = 64 * 1024
_MAX_TARGET = 4096
_IDLE_S = 60.0
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
}
_REMEMBERED = 4096  # ids hinted before they were waited for, and ids just finished


@dataclass(slots=True)
class Waiter:
    """One job waiting for its end: `event` is set by a callback (or a change of mode)."""

    prediction_id: str
    # asyncio's own: made and waited for once per job, where anyio's costs several times more
    event: asyncio.Event = field(default_factory=asyncio.Event)
    hinted: bool = False  # a callback for this job came since the last re-arm

    def rearm(self) -> None:
        self.event.clear()
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
    """The HTTP receiver, served by the run's own event loop:
    `async with Receiver(section, callbacks) as r: r.url`. The port is bound on construction,
    so a port in use is a ConfigError before anything starts."""

    def __init__(self, section: WebhookSection, callbacks: Callbacks) -> None:
        self._token = secrets.token_urlsafe(32).encode()
        self.callbacks = callbacks
        try:
            self._sock = _bind(section.listen_host, section.listen_port)
        except OSError as exc:
            raise ConfigError(
                f"webhook.listen_port: cannot listen on {section.listen_host}:"
                f"{section.listen_port} ({exc.strerror})"
            ) from None
        host, port = self._sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        self.listening = f"http://{shown}:{port}"
        self.public_base = section.public_url or self.listening
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()

    @property
    def url(self) -> str:
        """The URL given to the provider with each create: a secret, never logged."""
        return f"{self.public_base}/{self._token.decode()}"

    def answer(self, method: bytes, target: bytes, body: bytes | None) -> tuple[int, bytes]:
        """The answer to one request; `body` is None when it was too large."""
        path = target.split(b"?", 1)[0]
        if not hmac.compare_digest(path.rsplit(b"/", 1)[-1], self._token):
            return 404, b"not found"
        if method != b"POST":
            return 405, b"POST only"
        if body is None:
            return 413, b"body too large"
        try:
            data = json.loads(body.decode())  # JSON is UTF-8: no encoding to detect
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
        exec_id = data.get("exec_id") if isinstance(data, dict) else None
        if not isinstance(exec_id, str) or not exec_id or len(exec_id) > 200:
            return 400, b"expected a JSON object with exec_id"
        self.callbacks.hint(exec_id)
        return 200, b"ok"

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self, self._connections), sock=self._sock
        )
        _log.info("webhook_receiver", listening=self.listening, public=self.public_base)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class _Connection(asyncio.Protocol):
    """One connection to the receiver: HTTP/1.1 requests parsed by httptools, answered in one
    write each, kept alive while the peer wants; closed after `_IDLE_S` without a request."""

    def __init__(self, receiver: Receiver, registry: set[_Connection]) -> None:
        self._receiver = receiver
        self._registry = registry
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._target = b""
        self._body: bytearray | None = bytearray()
        self._idle: asyncio.TimerHandle | None = None
        self._last = 0.0  # loop time of the last request

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._registry.add(self)
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        self._idle = loop.call_later(_IDLE_S, self._check_idle)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._send(400, b"bad request", keep_alive=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._registry.discard(self)
        if self._idle is not None:
            self._idle.cancel()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._target = b""
        self._body = bytearray()

    def on_url(self, url: bytes) -> None:
        if len(self._target) < _MAX_TARGET:
            self._target += url

    def on_body(self, body: bytes) -> None:
        if self._body is not None:
            self._body += body
            if len(self._body) > _MAX_BODY:
                self._body = None

    def on_message_complete(self) -> None:
        body = None if self._body is None else bytes(self._body)
        status, text = self._receiver.answer(self._parser.get_method(), self._target, body)
        self._send(status, text, keep_alive=self._parser.should_keep_alive())

    # -- internals ----------------------------------------------------------------------------

    def _send(self, status: int, text: bytes, *, keep_alive: bool) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(text)}\r\n"
            + ("" if keep_alive else "Connection: close\r\n")
            + "\r\n"
        )
        self._transport.write(head.encode("latin-1") + text)
        if keep_alive:
            self._last = asyncio.get_running_loop().time()
        else:
            self._transport.close()

    def _check_idle(self) -> None:
        """Close after `_IDLE_S` without a request; one timer per connection, not per request."""
        loop = asyncio.get_running_loop()
        left = self._last + _IDLE_S - loop.time()
        if left <= 0:
            self.close()
        else:
            self._idle = loop.call_later(left, self._check_idle)
