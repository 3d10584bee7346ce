"""Webhook mode: a callback wakes a confirming poll; a forged one ends nothing; polling stays
as the fallback when callbacks do not come."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import structlog

from pipeline.core import ConfigError, ExitCode, RunConfig, WebhookSection, parse_config
from pipeline.outputs import RunSummary
from pipeline.provider import Callbacks, Receiver
from pipeline.sandbox import FaultRates, SandboxServer
from pipeline.sandbox.app import sign_webhook
from tests.conftest import (
    KEY,
    KEY2,
    SCALE,
    assert_one_result_per_row,
    catalog,
    config_data,
    go,
    ledger_cost,
    make_config,
    results,
    shrunk_sandbox,
    write_manifest,
)

Start = Callable[..., SandboxServer]
pytestmark = pytest.mark.anyio


def _hooked(sandbox: Start, **kwargs: Any) -> SandboxServer:
    return shrunk_sandbox(sandbox, allow_loopback_urls=True, **kwargs)


def _hooked_config(
    tmp_path: Path, sb: SandboxServer, manifest: Path, latency_s: float, **webhook: Any
) -> RunConfig:
    """A shrunk run in webhook mode against `sb`, whose jobs take `latency_s` provider seconds."""
    return make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        polling={"expected_latency_s": latency_s},
        webhook={"enabled": True, **webhook},
    )


async def test_each_job_ends_on_its_callback_with_one_confirming_poll(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = _hooked(sandbox, faults=FaultRates(job_error=0.1), seed=3)
    manifest = write_manifest(tmp_path / "m.csv", catalog(60))
    # the fallback poll comes 1 s (wall) past the expected end: callbacks come first
    config = _hooked_config(tmp_path, sb, manifest, 10, fallback_after_s=20)
    summary = await go(config, [KEY, KEY2])
    rows = results(summary)
    assert summary.exit_code is ExitCode.ROWS_FAILED  # the job errors
    assert_one_result_per_row(rows, 60)
    callbacks = summary.stats.callbacks
    assert callbacks is not None
    assert callbacks.ends_by_callback == 60 and callbacks.ends_by_fallback == 0
    assert summary.stats.polls == 60  # one confirming poll per job, nothing else
    assert callbacks.unconfirmed == 0 and callbacks.unknown == 0
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and all(r["error_type"] == "job_error" for r in failed)
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(ledger_cost(sb))
    webhook_urls = {job.webhook_url for job in list(sb.state.jobs.values())}
    assert len(webhook_urls) == 1  # one receiver, its secret path given with every create
    (url,) = webhook_urls
    assert url is not None and len(url.rsplit("/", 1)[-1]) >= 40


async def _run_in_background(config: Any, keys: list[str], out: list[RunSummary]) -> None:
    out.append(await go(config, keys))


async def test_a_forged_callback_never_ends_a_job(sandbox: Start, tmp_path: Path) -> None:
    # 2 s jobs: time to forge a callback for every one while it runs
    sb = _hooked(sandbox, latency_mean_s=40, latency_spread=0.0)
    manifest = write_manifest(tmp_path / "m.csv", catalog(6))
    config = _hooked_config(tmp_path, sb, manifest, 40)
    out: list[RunSummary] = []
    forged: dict[str, int] = {}
    async with anyio.create_task_group() as tg, httpx.AsyncClient() as http:
        tg.start_soon(_run_in_background, config, [KEY], out)
        with anyio.fail_after(10):
            while len(forged) < 6:
                for job in list(sb.state.jobs.values()):
                    if job.prediction_id in forged or job.webhook_url is None:
                        continue
                    assert not job.ended
                    claim = {
                        "exec_id": job.prediction_id,
                        "status": "succeeded",
                        "output": "https://forged.example.com/x.jpg",
                        "error": "",
                    }
                    answer = await http.post(job.webhook_url, json=claim)
                    forged[job.prediction_id] = answer.status_code
                    # a wrong token, and a body without exec_id, are turned away
                    wrong = job.webhook_url.rsplit("/", 1)[0] + "/not-the-token"
                    assert (await http.post(wrong, json=claim)).status_code == 404
                    bad = await http.post(job.webhook_url, content=b"not json")
                    assert bad.status_code == 400
                    # signed, but not with the run's secret: counted, and no hint at all
                    data = json.dumps(claim).encode()
                    signed = sign_webhook("not-the-secret", data)
                    answer = await http.post(job.webhook_url, content=data, headers=signed)
                    assert answer.status_code == 401
                await anyio.sleep(0.02)
    assert set(forged.values()) == {200}  # accepted as hints
    (summary,) = out
    rows = results(summary)
    assert all(r["status"] == "succeeded" for r in rows)
    for row in rows:
        assert row["prediction_id"] in forged
        assert all(u.startswith(sb.root_url) for u in row["output_urls"])
        assert row["latency_s"] >= 40 * SCALE  # ended when the job ended, not when forged
    callbacks = summary.stats.callbacks
    assert callbacks is not None and callbacks.unconfirmed == 6
    assert callbacks.bad_signatures == 6
    counted = json.loads((summary.run_dir / "summary.json").read_text())["callbacks"]
    assert counted["bad_signatures"] == 6 and counted["unconfirmed"] == 6
    # each job then went on the poll schedule: its real callback or a poll saw the end
    assert callbacks.ends_by_callback + callbacks.ends_by_poll == 6
    assert callbacks.ends_by_fallback == 0  # not taken for missing callbacks
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(ledger_cost(sb))


async def test_callbacks_that_never_come_fall_back_to_polling(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = _hooked(sandbox)
    manifest = write_manifest(tmp_path / "m.csv", catalog(40))
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: the provider's callbacks are refused
    try:
        config = _hooked_config(
            tmp_path,
            sb,
            manifest,
            10,
            public_url=f"http://127.0.0.1:{dead.getsockname()[1]}/hooks",
            missed_callbacks=3,
        )
        with structlog.testing.capture_logs() as logs:
            summary = await go(config, [KEY])
    finally:
        dead.close()
    rows = results(summary)
    assert_one_result_per_row(rows, 40)
    assert all(r["status"] == "succeeded" for r in rows)
    callbacks = summary.stats.callbacks
    assert callbacks is not None
    assert callbacks.received == 0
    # three ends found by fallback polls tell that callbacks do not come: the rest is polled
    assert callbacks.ends_by_fallback == 3 and callbacks.ends_by_poll == 37
    assert [e["event"] for e in logs].count("callbacks_missing") == 1
    # after the first few, jobs are polled on the learned schedule, within its budget of polls
    assert summary.stats.polls / 40 <= config.polling.polls_per_job
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(ledger_cost(sb))


async def test_a_receiver_port_in_use_stops_the_run_before_any_create(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = _hooked(sandbox)
    manifest = write_manifest(tmp_path / "m.csv", catalog(5))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        config = make_config(
            tmp_path, sb.base_url, manifest, webhook={"enabled": True, "listen_port": port}
        )
        with pytest.raises(ConfigError, match=rf"webhook.listen_port: cannot listen on .*:{port}"):
            await go(config, [KEY])
    finally:
        taken.close()
    assert sb.stats()["creates"] == 0


def test_public_url_is_required_when_the_provider_is_not_on_this_machine(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.csv", catalog(1))
    data = config_data(tmp_path, "https://api.eachlabs.ai/v1", manifest, webhook={"enabled": True})
    with pytest.raises(ConfigError, match=r"webhook.public_url: is required"):
        parse_config(data, tmp_path)
    data["webhook"]["public_url"] = "hooks.example.com"
    with pytest.raises(ConfigError, match=r"webhook.public_url: .*http\(s\) URL"):
        parse_config(data, tmp_path)
    data["webhook"]["public_url"] = "https://hooks.example.com/wanbatch/"
    config = parse_config(data, tmp_path)
    assert config.webhook.public_url == "https://hooks.example.com/wanbatch"


async def test_callbacks_hint_early_ignore_strangers_and_notice_silence() -> None:
    callbacks = Callbacks(missed_limit=2)
    callbacks.hint("early")  # before its create's answer was read
    waiter = callbacks.expect("early")
    assert waiter.hinted and waiter.event.is_set()
    callbacks.hint("stranger")
    assert callbacks.stats.unknown == 1
    callbacks.ended(waiter, "callback")
    a, b, c, d = (callbacks.expect(p) for p in ("a", "b", "c", "d"))
    with structlog.testing.capture_logs() as logs:
        callbacks.ended(d, "poll")  # on the schedule: says nothing of callbacks
        assert callbacks.arriving
        callbacks.ended(a, "fallback")
        assert callbacks.arriving and not c.event.is_set()
        callbacks.ended(b, "fallback")
        assert not callbacks.arriving
        assert c.event.is_set() and not c.hinted  # woken to poll on the schedule, not hinted
        callbacks.hint("a")  # a late callback for a job just ended: callbacks do arrive
        assert callbacks.arriving
    assert [e["event"] for e in logs] == ["callbacks_missing", "callbacks_arriving_again"]
    assert callbacks.stats.unknown == 1


async def test_the_receiver_speaks_plain_http_and_keeps_connections() -> None:
    callbacks = Callbacks(missed_limit=5)
    async with Receiver(WebhookSection(enabled=True), callbacks) as receiver:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) as http:
            for n in range(3):  # one kept-alive connection
                answer = await http.post(receiver.url, json={"exec_id": f"p{n}", "status": "x"})
                assert answer.status_code == 200
            assert callbacks.stats.received == 3 and callbacks.stats.unknown == 3
            assert (await http.post(receiver.url + "?retry=1", json={"exec_id": "q"})).is_success
            assert (await http.get(receiver.url)).status_code == 405
            assert (await http.post(receiver.url, content=b"x" * 70_000)).status_code == 413
            # the reference's payload names the prediction `id`; a body naming none is refused
            assert (await http.post(receiver.url, json={"id": "p", "status": "x"})).is_success
            assert (await http.post(receiver.url, json={"name": "p"})).status_code == 400
            assert (
                await http.post(receiver.listening + "/", json={"exec_id": "p"})
            ).status_code == 404
        assert callbacks.stats.received == 5
        host, port = receiver.listening.removeprefix("http://").rsplit(":", 1)
        async with await anyio.connect_tcp(host, int(port)) as raw:
            await raw.send(b"NOT HTTP AT ALL\r\n\r\n")
            with anyio.fail_after(5):
                reply = b""
                try:
                    while chunk := await raw.receive():
                        reply += chunk
                except anyio.EndOfStream:
                    pass
        assert reply.startswith(b"HTTP/1.1 400") and b"connection: close" in reply.lower()


async def test_the_receiver_closes_connections_idle_too_long() -> None:
    callbacks = Callbacks(missed_limit=5)
    section = WebhookSection(enabled=True, idle_timeout_s=0.4)
    async with Receiver(section, callbacks) as receiver:
        host, port = receiver.listening.removeprefix("http://").rsplit(":", 1)
        path = receiver.url.removeprefix(receiver.listening)
        body = b'{"exec_id": "p"}'
        request = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        async with await anyio.connect_tcp(host, int(port)) as raw:
            # requests 0.25 s apart keep the connection open past the idle time of 0.4 s
            for _ in range(3):
                await raw.send(request)
                with anyio.fail_after(5):
                    assert (await raw.receive()).startswith(b"HTTP/1.1 200")
                await anyio.sleep(0.25)
            assert callbacks.stats.received == 3
            # then silence: the receiver closes it
            with anyio.fail_after(5), pytest.raises(anyio.EndOfStream):
                await raw.receive()

        # a connection that never says anything is closed as well
        async with await anyio.connect_tcp(host, int(port)) as silent:
            with anyio.fail_after(5), pytest.raises(anyio.EndOfStream):
                await silent.receive()
