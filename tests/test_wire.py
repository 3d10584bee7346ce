"""The lean HTTP/1.1 client against small raw servers on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from pipeline.wire import ConnectionLost, NotSent, WirePool

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A server on 127.0.0.1 running `handler` per connection; yields its URL and a counter."""
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1", connections
    finally:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> str:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    length = [int(h.split(":")[1]) for h in head.split("\r\n") if h.lower().startswith("content-l")]
    if length:
        await reader.readexactly(length[0])
    return head


def pool(url: str, read_timeout: float = 5) -> WirePool:
    return WirePool(url, max_connections=4, connect_timeout=2, read_timeout=read_timeout)


async def test_keep_alive_chunked_and_close() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            if "/chunked" in head:
                writer.write(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b'4\r\n{"a"\r\n3\r\n:1}\r\n0\r\n\r\n'
                )
            elif "/close" in head:
                writer.write(b"HTTP/1.1 503 Busy\r\nConnection: close\r\n\r\n{}")
                await writer.drain()
                return
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()

    async with raw_server(handler) as (url, connections):
        http = pool(url)
        for _ in range(3):
            answer = await http.request("GET", "/prediction/x", {"X-API-Key": "k"})
            assert (answer.status, answer.body) == (200, b"{}")
        assert len(connections) == 1  # one connection carried the three requests
        chunked = await http.request("POST", "/chunked", {"X-API-Key": "k"}, b"{}")
        assert chunked.body == b'{"a":1}'
        closed = await http.request("GET", "/close", {})
        assert (closed.status, closed.reason, closed.body) == (503, "Busy", b"{}")
        again = await http.request("GET", "/prediction/y", {})
        assert again.status == 200
        assert len(connections) == 2  # the closed connection was not reused
        await http.aclose()


async def test_lost_answers_and_refused_connections() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)  # read the request, then close without an answer

    async with raw_server(hang_up) as (url, _):
        with pytest.raises(ConnectionLost):
            await pool(url).request("POST", "/prediction/", {}, b"{}")

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(NotSent):
        await pool(f"http://127.0.0.1:{port}/v1").request("GET", "/prediction/x", {})
    with pytest.raises(NotSent, match="line break"):
        await pool(f"http://127.0.0.1:{port}/v1").request("GET", "/x", {"X-API-Key": "a\r\nb"})


async def test_a_silent_server_times_out_as_lost() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(2)

    async with raw_server(silent) as (url, _):
        with pytest.raises(ConnectionLost, match="ReadTimeout"):
            await pool(url, read_timeout=0.2).request("GET", "/prediction/x", {})
