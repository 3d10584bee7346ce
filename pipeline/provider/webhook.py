"""Webhook mode: a receiver for the provider's job-end callbacks, and the hints they give workers.

A callback is never trusted: its body is not read beyond the prediction's id (`exec_id` in the
seed's shape, `id` in the reference's). It only wakes the worker that waits on that prediction,
which then polls the provider to confirm (a forged callback costs one poll and nothing else).
The receiver's path ends in a random token made per process, so a callback is only accepted from
whoever was given the URL with our creates; each create also carries a per-run
`webhook_secret`, and a callback whose signature is present but wrong is counted and ignored.
Both documented forms are taken: the hex HMAC-SHA256 of "<timestamp>.<body>" with
`X-Webhook-Timestamp`, or of the body alone; either with or without a `sha256=` prefix.

The receiver is a bare ASGI app served by uvicorn on the run's own event loop, guarded for the
open internet: a cap on connections (the oldest idle one makes room for a new one), a short
idle timeout from the first byte on, a body limit. `Callbacks` also judges whether callbacks
arrive at all: after `missed_callbacks` job ends in a row found by a fallback poll, it says so
once and the workers poll as in polling mode until a callback comes again.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

import anyio
import structlog
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pipeline.core import CallbackStats, ConfigError, WebhookSection

__all__ = ["Callbacks", "Receiver", "Waiter"]

_log = structlog.get_logger("pipeline.provider.webhook")
_MAX_BODY = 64 * 1024
_CLOCK_SKEW_S = 300  # how far a signature's timestamp may be from our clock
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

    def wake(self) -> None:
        """A callback (or the listing) says the job ended: its poll comes now."""
        self.hinted = True
        self.event.set()


class Callbacks:
    """The prediction ids waited on, the hints that wake them, and whether callbacks arrive."""

    def __init__(
        self, missed_limit: int, source: str = "callbacks", stats: CallbackStats | None = None
    ) -> None:
        """`stats`: where the callbacks are counted (the run's, in webhook mode)."""
        self.missed_limit = missed_limit
        self.source = source  # what gives the hints: "callbacks", or the executions "listing"
        self.stats = stats if stats is not None else CallbackStats()
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
            waiter.wake()
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
        waiter.wake()

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
            if self.source == "callbacks":
                hint = "check webhook.public_url reaches this machine; polling meanwhile"
            else:
                hint = "the provider's listing does not show these ends; polling meanwhile"
            _log.warning(f"{self.source}_missing", ends_without_hint=self._misses, hint=hint)
            self._replan()

    def give_up(self) -> None:
        """No more hints will come (the provider has no listing): every job is polled on
        the schedule from now on."""
        self._misses = max(self._misses, self.missed_limit)
        self._replan()

    def _replan(self) -> None:
        for other in self._waiting.values():
            other.event.set()  # re-plan on the polling schedule now

    def forget(self, waiter: Waiter) -> None:
        """The job left without an end confirmed (timeout, key refused, cancelled)."""
        self._waiting.pop(waiter.prediction_id, None)

    def _heard(self) -> None:
        if not self.arriving:
            _log.warning(f"{self.source}_arriving_again")
        self._misses = 0


def _remember(ids: OrderedDict[str, None], prediction_id: str) -> None:
    ids[prediction_id] = None
    if len(ids) > _REMEMBERED:
        ids.popitem(last=False)


class _Guarded(HttpToolsProtocol):
    """uvicorn's HTTP protocol, closing a connection that says nothing within the keep-alive
    timeout (uvicorn starts that timer only after a first answer), and making room, once
    `max_connections` are open, by closing the oldest one with no request under way."""

    open: dict[_Guarded, None]  # in the order they came; set per receiver
    max_connections: int

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )
        self.open[self] = None
        if len(self.open) > self.max_connections:
            for other in list(self.open):
                if other is not self and other.cycle is None:
                    other.transport.close()
                    self.open.pop(other, None)
                    break

    def connection_lost(self, exc: Exception | None) -> None:
        self.open.pop(self, None)
        super().connection_lost(exc)


class Receiver:
    """The HTTP receiver, served by uvicorn on the run's own event loop:
    `async with Receiver(section, callbacks) as r: r.url, r.secret`. The port is bound on
    construction, so a port in use is a ConfigError before anything starts."""

    def __init__(self, section: WebhookSection, callbacks: Callbacks) -> None:
        self._token = secrets.token_urlsafe(32)
        self.secret = secrets.token_urlsafe(32)  # sent with each create; never logged
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
        self._open: dict[_Guarded, None] = {}  # this receiver's connections
        guarded = type(
            "_GuardedHere",
            (_Guarded,),
            {"open": self._open, "max_connections": section.max_connections},
        )
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            interface="asgi3",
            proxy_headers=False,
            http=guarded,
            log_config=None,
            access_log=False,
            timeout_keep_alive=max(1, round(section.idle_timeout_s)),
            timeout_graceful_shutdown=1,
        )
        config.load()
        # a fraction of a second is a float in practice; uvicorn's type says int
        config.timeout_keep_alive = section.idle_timeout_s  # type: ignore[assignment]
        self._server = uvicorn.Server(config)
        self._server.lifespan = config.lifespan_class(config)
        self._previous_handler: Any = None
        self.accept_failures = 0

    @property
    def url(self) -> str:
        """The URL given to the provider with each create: a secret, never logged."""
        return f"{self.public_base}/{self._token}"

    def answer(
        self, method: str, path: str, headers: dict[bytes, bytes], body: bytes | None
    ) -> tuple[int, bytes]:
        """The answer to one request; `body` is None when it was too large."""
        if not hmac.compare_digest(path.rsplit("/", 1)[-1].encode(), self._token.encode()):
            return 404, b"not found"
        if method != "POST":
            return 405, b"POST only"
        if body is None:
            return 413, b"body too large"
        if not self._signed_by_us(headers, body):
            self.callbacks.stats.bad_signatures += 1
            return 401, b"bad signature"
        try:
            data = json.loads(body.decode())  # JSON is UTF-8: no encoding to detect
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
        named = None
        if isinstance(data, dict):
            named = data.get("exec_id") or data.get("id")
        if not isinstance(named, str) or not named or len(named) > 200:
            return 400, b"expected a JSON object with exec_id or id"
        self.callbacks.hint(named)
        return 200, b"ok"

    def _signed_by_us(self, headers: dict[bytes, bytes], body: bytes) -> bool:
        """True when unsigned (the URL's token is the guard), or signed with our secret: over
        the body alone, or over "<timestamp>.<body>" within the allowed clock difference."""
        signature = headers.get(b"x-webhook-signature")
        if signature is None:
            return True
        given = signature.strip().removeprefix(b"sha256=").lower()
        key = self.secret.encode()
        if hmac.compare_digest(given, hmac.new(key, body, hashlib.sha256).hexdigest().encode()):
            return True
        stamp = headers.get(b"x-webhook-timestamp", b"")
        if not stamp.isdigit() or abs(int(stamp) - time.time()) > _CLOCK_SKEW_S:
            return False
        digest = hmac.new(key, stamp + b"." + body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(given, digest.encode())

    async def _app(self, scope: Any, receive: Any, send: Any) -> None:
        """The bare ASGI app: read the body (up to a limit), answer."""
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"0")
        body: bytes | None = b""
        if declared.isdigit() and int(declared) > _MAX_BODY:
            body = None
        else:
            chunks = bytearray()
            more = True
            while more and body is not None:
                message = await receive()
                chunks += message.get("body", b"")
                more = message.get("more_body", False)
                body = bytes(chunks) if len(chunks) <= _MAX_BODY else None
        status, text = self.answer(scope["method"], scope["path"], headers, body)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": text})

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Out of descriptors, asyncio stops accepting for a second and reports it each time
        with a traceback: said once here (with a count in the summary's log), not flooded."""
        if context.get("message", "").startswith("socket.accept() out of system resource"):
            self.accept_failures += 1
            if self.accept_failures == 1:
                _log.warning(
                    "webhook_receiver_out_of_descriptors",
                    hint="too many open connections; accepting again in a second",
                )
            return
        if self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._on_loop_error)
        await self._server.startup(sockets=[self._sock])
        _log.info("webhook_receiver", listening=self.listening, public=self.public_base)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self._server.shutdown(sockets=[self._sock])
            # a connection accepted as the shutdown began is in no list uvicorn closes; left
            # open, its socket was collected later, unclosed
            for connection in list(self._open):
                connection.transport.close()
            self._open.clear()
        asyncio.get_running_loop().set_exception_handler(self._previous_handler)
        if self.accept_failures:
            _log.warning("webhook_receiver_accept_failures", count=self.accept_failures)


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
