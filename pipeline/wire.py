"""A lean HTTP/1.1 client for the provider's small JSON calls: keep-alive connections on asyncio
streams, Content-Length and chunked bodies, connect and read timeouts.

Why not httpx here: measured on the 2-core machine this project targets, an httpx request costs
about 1.4 ms of CPU and an httpcore one about 1.0 ms, against 0.2 ms here; a job takes four or
five requests, and the client must stay under 2 ms of CPU per job. httpx stays the client of
everything else (tests, webhooks, downloads). Failures come out as two exceptions only, split
by whether the request may have reached the server; `pipeline.client` translates them.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["ConnectionLost", "NotSent", "WirePool", "WireResponse"]

_MAX_HEAD = 64 * 1024
_MAX_BODY = 16 * 1024 * 1024


class NotSent(Exception):
    """The request did not leave: the server cannot have seen it."""


class ConnectionLost(Exception):
    """The request was (maybe) sent but no whole answer came back."""


@dataclass(frozen=True, slots=True)
class WireResponse:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names
    body: bytes


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @property
    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class WirePool:
    """Connections to one origin; at most `max_connections` idle ones are kept."""

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
        user_agent: str = "wanbatch",
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.prefix = url.path.rstrip("/")
        host_header = url.netloc.rsplit("@", 1)[-1]
        self._fixed = (
            f"Host: {host_header}\r\nUser-Agent: {user_agent}\r\nAccept: application/json\r\n"
        )
        self._idle: deque[_Connection] = deque()
        self._max_idle = max_connections
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._closed = False

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.popleft().close()

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None = None
    ) -> WireResponse:
        head = self._head(method, self.prefix + path, headers, body)
        connection = await self._connection()
        reusable = False
        try:
            try:
                connection.writer.write(head + body if body else head)
            except (OSError, RuntimeError) as exc:
                raise ConnectionLost(f"{type(exc).__name__}: {exc}") from exc
            try:
                async with asyncio.timeout(self._read_timeout):
                    response, reusable = await _read_response(connection.reader, method)
            except TimeoutError as exc:
                raise ConnectionLost(f"ReadTimeout after {self._read_timeout:g} s") from exc
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                raise ConnectionLost(f"{type(exc).__name__}: {exc}") from exc
            except ValueError as exc:  # a malformed answer: the connection cannot be trusted
                raise ConnectionLost(f"malformed HTTP answer: {exc}") from exc
            return response
        finally:  # also on cancellation: a connection is reused only after a whole answer
            if reusable and not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(connection)
            else:
                connection.close()

    def _head(self, method: str, target: str, headers: dict[str, str], body: bytes | None) -> bytes:
        lines = [f"{method} {target} HTTP/1.1\r\n", self._fixed]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise NotSent(f"header {name} holds a line break")
            lines.append(f"{name}: {value}\r\n")
        if body is not None:
            lines.append(f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    async def _connection(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()  # the most recently used is the least likely stale
            if connection.usable:
                return connection
            connection.close()
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    limit=_MAX_HEAD,
                    server_hostname=self._host if self._ssl else None,
                )
        except TimeoutError as exc:
            raise NotSent(f"ConnectTimeout after {self._connect_timeout:g} s") from exc
        except (OSError, ssl.SSLError) as exc:
            raise NotSent(f"{type(exc).__name__}: {exc}") from exc
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # a request goes out in one write, but the answer to a poll must not wait on Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Connection(reader, writer)


async def _read_response(reader: asyncio.StreamReader, method: str) -> tuple[WireResponse, bool]:
    """One answer off the stream, and whether the connection may carry another request."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, _, rest = head.decode("latin-1").partition("\r\n")
        version, _, status_text = status_line.partition(" ")
        code_text, _, reason = status_text.partition(" ")
        if not version.startswith("HTTP/1.") or not code_text.isdigit():
            raise ValueError(f"bad status line {status_line[:80]!r}")
        status = int(code_text)
        if 100 <= status < 200:
            continue  # an interim answer (100 Continue): the real one follows
        break
    headers: dict[str, str] = {}
    for line in rest.split("\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"bad header line {line[:80]!r}")
        name = name.strip().lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    keep_alive = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
    if method == "HEAD" or status in (204, 304):
        body = b""
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if not 0 <= length <= _MAX_BODY:
            raise ValueError(f"content-length {length} out of range")
        body = await reader.readexactly(length)
    else:
        body = await reader.read(_MAX_BODY)  # until the server closes
        keep_alive = False
    return WireResponse(status, reason, headers, body), keep_alive


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the blank line
                pass
            return b"".join(parts)
        total += size
        if total > _MAX_BODY:
            raise ValueError("chunked body too large")
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
