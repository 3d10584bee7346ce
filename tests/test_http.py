"""The one HTTP stack, httpx, as users meet it: through a corporate proxy, against HTTPS with
their own CA, and facing prediction ids that must never reach a request line as they are."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pipeline.core import ApiKey, ExitCode, UnsafePredictionId
from pipeline.provider import EachlabsClient
from pipeline.provider.client import check_prediction_id
from pipeline.sandbox import SandboxServer, ServerThread
from tests.conftest import (
    KEY,
    SCALE,
    catalog,
    go,
    judge_against_ledger,
    make_config,
    results,
    shrunk_sandbox,
    write_manifest,
)

Start = Callable[..., SandboxServer]
pytestmark = pytest.mark.anyio

HOSTILE_IDS = [
    "abc\r\nX-Injected: 1",
    "\u043f\u0440\u0438\u0432\u0435\u0442",  # not Latin-1
    "../../admin",
    "a" * 10_000,
    "..",
    "",
]


@asynccontextmanager
async def forward_proxy() -> AsyncIterator[tuple[str, list[str]]]:
    """A plain-HTTP forward proxy on loopback: it takes absolute-form requests, sends each on
    to its origin (one connection per request) and relays the answer; the request lines it
    saw are listed."""
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                line, *fields = head.decode("latin-1").split("\r\n")
                method, target, version = line.split(" ")
                seen.append(f"{method} {target}")
                url = httpx.URL(target)
                headers = [f for f in fields if f and not f.lower().startswith("proxy-")]
                length = next(
                    (int(f.split(":")[1]) for f in headers if f.lower().startswith("content-len")),
                    0,
                )
                body = await reader.readexactly(length)
                up_reader, up_writer = await asyncio.open_connection(url.host, url.port)
                path = url.raw_path.decode()
                kept = [f for f in headers if not f.lower().startswith("connection")]
                request = "\r\n".join([f"{method} {path} {version}", *kept, "Connection: close"])
                up_writer.write(request.encode("latin-1") + b"\r\n\r\n" + body)
                answer = await up_reader.read()  # the origin closes when it has answered
                up_writer.close()
                writer.write(answer)
                await writer.drain()
                break  # close-delimited: the client opens a new connection
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()


async def test_requests_go_through_the_proxy_the_environment_names(
    sandbox: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2)
    manifest = write_manifest(tmp_path / "m.csv", catalog(12))
    config = make_config(tmp_path, sb.base_url, manifest, api={"time_scale": SCALE})
    async with forward_proxy() as (proxy, seen):
        monkeypatch.setenv("HTTP_PROXY", proxy)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        summary = await go(config, [KEY])
    assert summary.exit_code is ExitCode.OK
    creates = [s for s in seen if s == f"POST {sb.base_url}/prediction/"]
    polls = [s for s in seen if s.startswith(f"GET {sb.base_url}/prediction/")]
    assert len(creates) == 12 and len(polls) == summary.stats.polls
    judge_against_ledger(sb, config.output.dir, 12)


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA of the test's own, a certificate for 127.0.0.1 from it, and a stranger CA."""
    ca, stranger = trustme.CA(), trustme.CA()
    server = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(server))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    stranger.cert_pem.write_to_path(str(tmp_path / "stranger.pem"))
    return server, tmp_path / "ca.pem", tmp_path / "stranger.pem"


@pytest.mark.parametrize("http2", [False, True])
async def test_https_with_the_users_own_ca_and_a_wrong_ca_refused(
    sandbox: Start,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tls_files: tuple[Path, Path, Path],
    http2: bool,
) -> None:
    server, ca, stranger = tls_files
    sb = shrunk_sandbox(sandbox, latency_mean_s=2, tls=server)
    assert sb.base_url.startswith("https://127.0.0.1:")
    manifest = write_manifest(tmp_path / "m.csv", catalog(6))
    sections: dict[str, Any] = {"api": {"time_scale": SCALE, "http2": http2}}
    config = make_config(tmp_path, sb.base_url, manifest, **sections)

    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    summary = await go(config, [KEY])
    assert summary.exit_code is ExitCode.OK
    judge_against_ledger(sb, config.output.dir, 6)

    monkeypatch.setenv("SSL_CERT_FILE", str(stranger))
    other = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        retries={"max_attempts": 1},
        output={"dir": str(tmp_path / "stranger")},
        **sections,
    )
    refused = await go(other, [KEY])
    rows = results(refused)
    assert refused.exit_code is ExitCode.ROWS_FAILED
    assert {r["error_type"] for r in rows} == {"transport"}
    assert all("CERTIFICATE_VERIFY_FAILED" in r["error_message"] for r in rows)
    assert sb.stats()["creates"] == 6  # nothing reached the sandbox through the wrong CA


def test_a_prediction_id_must_look_like_one() -> None:
    assert check_prediction_id("6f1c2a9e-1b2c-4d5e-8f90-0a1b2c3d4e5f") == (
        "6f1c2a9e-1b2c-4d5e-8f90-0a1b2c3d4e5f"
    )
    for hostile in [*HOSTILE_IDS, None, 42, "a/b", "a b", "a%2Fb", "x" * 129]:
        with pytest.raises(UnsafePredictionId) as caught:
            check_prediction_id(hostile)
        assert caught.value.ambiguous and not caught.value.retryable
        assert "\r" not in str(caught.value) and len(str(caught.value)) < 300


async def test_hostile_prediction_ids_fail_their_rows_without_injection_or_traversal(
    tmp_path: Path,
) -> None:
    """A provider (or something in between) answering creates with ids that must not go back
    into a request: each row fails as a possible charge, nothing else is sent, the run ends."""
    seen: list[tuple[str, str, list[str]]] = []
    ids = iter(HOSTILE_IDS)

    async def create(request: Request) -> JSONResponse:
        seen.append((request.method, request.url.path, list(request.headers)))
        return JSONResponse({"status": "success", "predictionID": next(ids)})

    async def anything(request: Request) -> JSONResponse:
        seen.append((request.method, request.url.path, list(request.headers)))
        return JSONResponse({"status": "error", "message": "not here"}, status_code=404)

    app = Starlette(
        routes=[
            Route("/v1/prediction/", create, methods=["POST"]),
            Route("/{path:path}", anything, methods=["GET", "POST"]),
        ]
    )
    with ServerThread(app) as server:
        manifest = write_manifest(tmp_path / "m.csv", catalog(len(HOSTILE_IDS)))
        config = make_config(tmp_path, f"{server.root_url}/v1", manifest, api={"time_scale": SCALE})
        summary = await go(config, [KEY])
    rows = results(summary)
    assert summary.exit_code is ExitCode.ROWS_FAILED
    assert {r["status"] for r in rows} == {"failed"}
    assert {r["error_type"] for r in rows} == {"protocol"}
    assert all(r["possible_duplicate_charge"] and r["ambiguous_creates"] == 1 for r in rows)
    assert all(r["prediction_id"] is None for r in rows)
    # the organisation's balance, read once as the run starts, and then the creates alone
    assert seen[0][:2] == ("GET", "/v1/billing/balance")
    assert [(m, p) for m, p, _ in seen[1:]] == [("POST", "/v1/prediction/")] * len(HOSTILE_IDS)
    assert not any("x-injected" in headers for _, _, headers in seen)


async def test_a_journaled_hostile_id_is_never_polled() -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"status": "processing"})

    client = EachlabsClient("https://api.test/v1", "m", transport=httpx.MockTransport(handler))
    for hostile in HOSTILE_IDS:
        with pytest.raises(UnsafePredictionId):
            await client.get(ApiKey("k"), hostile)
    assert sent == []
    await client.get(ApiKey("k"), "abc-123")
    assert sent[0].url.raw_path == b"/v1/prediction/abc-123"
    await client.aclose()
