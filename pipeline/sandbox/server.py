"""Running the sandbox on a real loopback socket: in a background thread, or in the foreground.

`SandboxServer` is what tests, benchmarks and `api.base_url: sandbox` use: it starts uvicorn on
127.0.0.1 (port 0 picks a free port) in its own thread and event loop, so the client under test
talks to it over real TCP with real timeouts, and stops it on exit.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import uvicorn

from pipeline.core import SandboxSettings
from pipeline.sandbox.app import create_app
from pipeline.sandbox.state import SandboxState

__all__ = ["SandboxServer", "ServerThread", "serve"]

HOST = "127.0.0.1"
_Lifespan = Literal["on", "off"]


def _config(
    app: Any, sock: socket.socket, lifespan: _Lifespan, tls: Path | None = None
) -> uvicorn.Config:
    """`tls`: a PEM file with the server's key and certificate chain, to serve HTTPS."""
    return uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan=lifespan,
        timeout_keep_alive=30,
        backlog=2048,
        host=HOST,
        port=sock.getsockname()[1],
        ssl_certfile=None if tls is None else str(tls),
    )


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # answers go out as head and body in two writes: without this, Nagle holds the body 40 ms
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((HOST, port))
    sock.listen(2048)
    return sock


class ServerThread:
    """Any ASGI app on 127.0.0.1 in a background thread with its own event loop."""

    def __init__(
        self, app: Any, port: int = 0, lifespan: _Lifespan = "off", tls: Path | None = None
    ) -> None:
        self._sock = _bind(port)
        self.port: int = self._sock.getsockname()[1]
        self._scheme = "http" if tls is None else "https"
        self._server = uvicorn.Server(_config(app, self._sock, lifespan, tls))
        self._thread = threading.Thread(target=self._run, name="server", daemon=True)
        self._error: BaseException | None = None

    @property
    def root_url(self) -> str:
        return f"{self._scheme}://{HOST}:{self.port}"

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except BaseException as exc:  # noqa: BLE001 - the thread's end, reported by start()
            self._error = exc

    def start(self) -> None:
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the server failed to start: {self._error!r}")
            self._thread.join(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class SandboxServer(ServerThread):
    """The sandbox in a background thread: `with SandboxServer(settings) as sb: sb.base_url`."""

    def __init__(self, settings: SandboxSettings, port: int = 0, tls: Path | None = None) -> None:
        self.settings = settings
        self.state = SandboxState(settings)
        super().__init__(create_app(settings, self.state), port, lifespan="on", tls=tls)

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def stop(self) -> None:
        super().stop()
        self.state.close()

    def stats(self) -> dict[str, Any]:
        return self.state.stats()

    def ledger(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.state.ledger_lines()]


def serve(settings: SandboxSettings, port: int, *, announce: Any = print) -> None:
    """Serve in the foreground until interrupted; the base URL is announced first."""
    sock = _bind(port)
    state = SandboxState(settings)
    server = uvicorn.Server(_config(create_app(settings, state), sock, "on"))
    announce(f"http://{HOST}:{sock.getsockname()[1]}/v1")
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        state.close()
