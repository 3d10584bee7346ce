"""The sandbox, driven over real HTTP: the provider's rules, limits, faults, images, webhooks
(and, where a phase is shorter than a loaded machine's poll, through its app on a clock of the
test's own)."""

from __future__ import annotations

import hashlib
import hmac
import io
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.core import TRANSIENT_ERROR_CODES
from pipeline.sandbox import (
    FaultRates,
    SandboxServer,
    SandboxSettings,
    ServerThread,
    create_app,
    key_hash,
)
from pipeline.sandbox.state import SandboxState
from tests.conftest import KEY, KEY2

MODEL = "alibaba-wan-2-7-image-edit"
Start = Callable[..., SandboxServer]


def body(**inputs: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "input": {"prompt": "make it blue", "img_url": "https://cdn.example.com/a.jpg", **inputs},
    }


def create(
    client: httpx.Client, sb: SandboxServer, payload: Any, key: str | None = KEY
) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    return client.post(f"{sb.base_url}/prediction/", json=payload, headers=headers)


def wait_done(client: httpx.Client, sb: SandboxServer, pid: str, key: str = KEY) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        answer = client.get(f"{sb.base_url}/prediction/{pid}", headers={"X-API-Key": key}).json()
        if answer["status"] not in ("created", "starting", "processing"):
            return dict(answer)
        time.sleep(0.01)
    raise AssertionError("job never ended")


def test_stats_are_read_whole_from_another_thread_while_jobs_are_made() -> None:
    """A test or a script reads `stats()` while the server's thread makes jobs: the figures
    come whole, never a RuntimeError of a mapping that grew as it was read (bounded: 250
    creates, the interpreter switching threads every microsecond)."""
    settings = SandboxSettings(keys=(KEY,))
    state = SandboxState(settings)
    key = state.key_name(KEY)
    assert key is not None
    problems: list[Exception] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                state.stats()
            except RuntimeError as exc:
                problems.append(exc)
                return

    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(250):
            inputs = {"prompt": f"edit {n}", "img_url": f"https://shop.test/{n}.jpg"}
            state.accept(key, "alibaba-wan-2-7-image-edit", inputs, None, "http://sandbox.test")
    finally:
        done.set()
        reader.join(10)
        sys.setswitchinterval(before)
    assert problems == [] and state.stats()["creates"] == 250


def test_auth_and_visibility(sandbox: Start) -> None:
    sb = sandbox(time_scale=0.001)
    with httpx.Client() as c:
        assert create(c, sb, body(), key=None).status_code == 401
        refused = create(c, sb, body(), key="nope")
        assert refused.status_code == 401
        assert refused.json()["status"] == "error" and refused.json()["message"]
        pid = create(c, sb, body()).json()["predictionID"]
        assert (
            c.get(f"{sb.base_url}/prediction/{pid}", headers={"X-API-Key": KEY2}).status_code == 404
        )
        assert (
            c.get(f"{sb.base_url}/prediction/{pid}", headers={"X-API-Key": KEY}).status_code == 200
        )
        unknown = create(c, sb, {"model": "other-model", "input": body()["input"]})
        assert unknown.status_code == 404
        # with or without the trailing slash
        assert (
            c.post(f"{sb.base_url}/prediction", json=body(), headers={"X-API-Key": KEY}).status_code
            == 200
        )


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"model": MODEL, "input": {"img_url": "https://x.com/a.jpg"}}, "prompt"),
        ({"model": MODEL, "input": {"prompt": "p"}}, "img_url"),
        (body(prompt="x" * 5001), "5000"),
        (body(size="4K"), "size"),
        (body(n=5), "n:"),
        (body(n=0), "n:"),
        (body(n="2"), "n:"),
        (body(n=1.5), "n:"),
        (body(seed="7"), "seed"),
        (body(colour="red"), "unknown input field"),
        (
            {"model": MODEL, "input": '{"prompt": "p", "img_url": "https://x.com/a.jpg"}'},
            "not a string",
        ),
        (body(img_url="http://cdn.example.com/a.jpg"), "HTTPS"),
        (body(img_url="data:image/png;base64,AAAA"), "data URI"),
        (body(img_url="https://localhost/a.jpg"), "localhost"),
        (body(img_url_2="https://127.0.0.1/a.jpg"), "localhost"),
    ],
)
def test_invalid_input_is_400_and_bills_nothing(sandbox: Start, payload: Any, needle: str) -> None:
    sb = sandbox(time_scale=0.001)
    with httpx.Client() as c:
        answer = create(c, sb, payload)
    assert answer.status_code == 400
    assert answer.json()["status"] == "error"
    assert needle in answer.json()["details"]
    stats = sb.stats()
    assert stats["creates"] == 0 and stats["cost_usd"] == 0
    assert not [e for e in sb.ledger() if e["event"] == "created"]


def test_loopback_urls_switch(sandbox: Start) -> None:
    sb = sandbox(time_scale=0.001, allow_loopback_urls=True)
    with httpx.Client() as c:
        answer = create(c, sb, body(img_url=f"{sb.root_url}/samples/mug-white.png"))
    assert answer.status_code == 200


def _max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_window_limit_holds_under_a_burst(sandbox: Start) -> None:
    sb = sandbox(creates_per_window=8, window_s=1.0, max_concurrent=1000, latency_mean_s=0.01)
    statuses: list[int] = []
    retry_afters: list[float] = []
    lock = threading.Lock()

    def hammer() -> None:
        with httpx.Client() as c:
            for _ in range(25):  # bounded: 12 clients x 25 requests
                answer = create(c, sb, body())
                with lock:
                    statuses.append(answer.status_code)
                    if answer.status_code == 429:
                        retry_afters.append(float(answer.headers["Retry-After"]))
                time.sleep(0.06)  # 25 x 0.06 s: the burst outlasts the 1 s window

    threads = [threading.Thread(target=hammer) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    created = [e["t"] for e in sb.ledger() if e["event"] == "created"]
    assert statuses.count(200) == len(created) > 8
    assert statuses.count(429) > 0 and all(0 < r <= 1.0 for r in retry_afters)
    assert _max_in_window(created, 1.0) <= 8
    stats = sb.stats()
    assert stats["keys"][key_hash(KEY)]["max_creates_in_window"] <= 8
    assert stats["refused_429"] == statuses.count(429)
    refused = [e for e in sb.ledger() if e["event"] == "refused"]
    assert len(refused) == statuses.count(429)  # refusals are recorded, never billed


def test_concurrency_limit_holds(sandbox: Start) -> None:
    sb = sandbox(max_concurrent=3, latency_mean_s=0.3, latency_spread=0.0)
    with httpx.Client() as c:
        answers = [create(c, sb, body()) for _ in range(6)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429, 429, 429]
        assert 0 < float(answers[3].headers["Retry-After"]) <= 0.3
        # the other key has its own slots
        assert create(c, sb, body(), key=KEY2).status_code == 200
        for answer in answers[:3]:  # its jobs end, and their slots are free again
            wait_done(c, sb, answer.json()["predictionID"])
        assert create(c, sb, body()).status_code == 200
    assert sb.stats()["keys"][key_hash(KEY)]["max_in_flight"] == 3


def test_outputs_are_images_of_the_promised_size_and_aspect(sandbox: Start) -> None:
    sb = sandbox(time_scale=0.001, image_scale=0.125, allow_loopback_urls=True)
    wide = f"{sb.root_url}/samples/backpack-grey.png"  # 900 x 600
    tall = f"{sb.root_url}/samples/tshirt-green.png"  # 600 x 800
    with httpx.Client() as c:
        for inputs, expected in [
            ({"img_url": wide, "size": "2K", "n": 2, "seed": 5}, (256, 171)),
            ({"img_url": wide, "img_url_2": tall, "size": "1K"}, (96, 128)),
        ]:
            pid = create(c, sb, body(**inputs)).json()["predictionID"]
            done = wait_done(c, sb, pid)
            assert done["status"] == "success"
            assert len(done["output"]) == inputs.get("n", 1)
            assert done["metrics"]["predict_time"] > 0
            pictures = [c.get(url).content for url in done["output"]]
            for data in pictures:
                assert Image.open(io.BytesIO(data)).size == expected
        sample = Image.open(io.BytesIO(c.get(wide).content)).convert("RGB").resize((32, 21))
        edited = Image.open(io.BytesIO(pictures[0])).convert("RGB").resize((32, 21))
    # the edit is visible: the picture differs from its input
    assert sum(abs(a - b) for a, b in zip(sample.tobytes(), edited.tobytes(), strict=True)) > 1000
    assert sb.stats()["images"] == 3 and sb.stats()["cost_usd"] == pytest.approx(0.09)


def test_fault_rates(sandbox: Start) -> None:
    faults = FaultRates(job_error=0.3, create_5xx=0.25, poll_5xx=0.2, poll_reset=0.1)
    sb = sandbox(
        time_scale=0.0001, creates_per_window=10_000, max_concurrent=10_000, faults=faults, seed=3
    )
    tries, create_errors, ids = 300, 0, []
    with httpx.Client() as c:
        for _ in range(tries):
            answer = create(c, sb, body())
            if answer.status_code in (500, 503):
                create_errors += 1
            else:
                ids.append(answer.json()["predictionID"])
        time.sleep(0.05)
        poll_errors = resets = 0
        ended: dict[str, str] = {}
        for pid in ids:
            for _ in range(50):  # bounded retries of each poll
                try:
                    answer = c.get(f"{sb.base_url}/prediction/{pid}", headers={"X-API-Key": KEY})
                except httpx.TransportError:
                    resets += 1
                    continue
                if answer.status_code >= 500:
                    poll_errors += 1
                    continue
                ended[pid] = answer.json()["status"]
                break
    assert 0.15 < create_errors / tries < 0.35
    assert sb.stats()["creates"] == len(ids)  # a 5xx create created nothing
    polls = len(ended) + poll_errors + resets
    assert 0.1 < poll_errors / polls < 0.3 and 0.03 < resets / polls < 0.18
    errors = sum(1 for s in ended.values() if s == "error")
    assert 0.18 < errors / len(ended) < 0.42
    stats = sb.stats()
    assert stats["images"] == len(ended) - errors  # failed jobs bill nothing


def test_lost_create_answers_are_billed(sandbox: Start) -> None:
    sb = sandbox(
        time_scale=0.0001,
        creates_per_window=10_000,
        max_concurrent=10_000,
        faults=FaultRates(lost_create=0.4),
        seed=1,
    )
    lost = 0
    with httpx.Client() as c:
        for _ in range(100):
            try:
                answer = create(c, sb, body())
            except httpx.TransportError:
                lost += 1
                continue
            lost += answer.status_code == 502
    assert 25 < lost < 55
    stats = sb.stats()
    assert stats["creates"] == 100  # every one was created, lost answers included
    assert stats["keys"][key_hash(KEY)]["lost_answers"] == lost


def test_429_storm(sandbox: Start) -> None:
    sb = sandbox(
        creates_per_window=10_000,
        max_concurrent=10_000,
        faults=FaultRates(storm_429=1.0, storm_s=0.5),
    )
    with httpx.Client() as c:
        first, second = create(c, sb, body()), create(c, sb, body())
    assert first.status_code == second.status_code == 429
    assert 0 < float(second.headers["Retry-After"]) <= 0.5
    assert sb.stats()["creates"] == 0


def test_faults_of_one_key(sandbox: Start) -> None:
    sb = sandbox(
        time_scale=0.001,
        creates_per_window=10_000,
        key_faults={KEY2: FaultRates.parse("storm_429=1, storm_s=1000")},
    )
    with httpx.Client() as c:
        assert create(c, sb, body(), key=KEY2).status_code == 429
        assert create(c, sb, body(), key=KEY).status_code == 200  # the other key is untouched
    per_key = sb.stats()["keys"]
    assert per_key[key_hash(KEY2)]["refused_429"] == 1 and per_key[key_hash(KEY)]["creates"] == 1
    with pytest.raises(ValueError, match="the name one of"):
        FaultRates.parse("storms=1")
    with pytest.raises(ValueError, match="slow: 'fast' is not a number"):
        FaultRates.parse("slow=fast")
    with pytest.raises(ValueError, match="between 0 and 1"):
        FaultRates.parse("job_error=2")
    with pytest.raises(ValueError, match="does not accept"):
        sandbox(key_faults={"stranger": FaultRates()})


def test_slow_answers(sandbox: Start) -> None:
    sb = sandbox(time_scale=1.0, faults=FaultRates(slow=1.0, slow_s=1))
    with httpx.Client(timeout=httpx.Timeout(0.1)) as c, pytest.raises(httpx.ReadTimeout):
        create(c, sb, body())  # held 1 s: a client that waits 0.1 s has no answer


def test_webhooks_arrive(sandbox: Start) -> None:
    received: list[dict[str, Any]] = []
    arrived = threading.Event()

    async def hook(request: Request) -> JSONResponse:
        received.append(await request.json())
        arrived.set()
        return JSONResponse({"ok": True})

    with ServerThread(Starlette(routes=[Route("/hook", hook, methods=["POST"])])) as receiver:
        sb = sandbox(time_scale=0.001, allow_loopback_urls=True)
        with httpx.Client() as c:
            payload = {**body(), "webhook_url": f"{receiver.root_url}/hook"}
            pid = create(c, sb, payload).json()["predictionID"]
            assert arrived.wait(10)
    assert received[0]["exec_id"] == pid
    assert received[0]["status"] == "succeeded"
    assert received[0]["output"].startswith("http://127.0.0.1")


def test_cli_prints_base_url_first(tmp_path: Any) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "sandbox",
            "--port",
            "0",
            "--keys",
            "k1,k2",
            "--time-scale",
            "0.01",
            "--key-faults",
            "k1:storm_429=1,storm_s=1000",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("http://127.0.0.1:") and line.endswith("/v1")
        deadline = time.monotonic() + 10
        while True:  # bounded: until the server answers or 10 s pass
            try:
                answer = httpx.post(f"{line}/prediction/", json=body(), headers={"X-API-Key": "k2"})
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert answer.status_code == 200
        stormy = httpx.post(f"{line}/prediction/", json=body(), headers={"X-API-Key": "k1"})
        assert stormy.status_code == 429
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.anyio
async def test_a_job_reports_created_then_starting_then_processing() -> None:
    """Polled through the sandbox's HTTP app on a clock of the test's own (virtual time: the
    phases of a real-time job are a tenth of it each, shorter than a poll on a loaded machine):
    created for the first tenth of a 10 s job, starting for the second, processing until its
    end, then success."""
    clock = [0.0]
    settings = SandboxSettings(keys=(KEY,), latency_mean_s=10, latency_spread=0)
    app = create_app(settings, SandboxState(settings, clock=lambda: clock[0]))
    transport = httpx.ASGITransport(app=app)
    headers = {"X-API-Key": KEY}
    async with httpx.AsyncClient(transport=transport, base_url="http://sandbox.test") as c:
        made = await c.post("/v1/prediction/", json=body(), headers=headers)
        pid = made.json()["predictionID"]
        seen = []
        for at in (0.0, 0.99, 1.01, 1.99, 2.01, 9.99, 10.0):
            clock[0] = at
            seen.append((await c.get(f"/v1/prediction/{pid}", headers=headers)).json()["status"])
    assert seen == [
        *("created", "created", "starting", "starting"),
        *("processing", "processing", "success"),
    ]


def test_cancel_ends_a_running_job_unbilled_and_frees_its_slot(sandbox: Start) -> None:
    sb = sandbox(time_scale=0.01, latency_mean_s=1000, latency_spread=0, max_concurrent=1)
    with httpx.Client() as c:
        headers = {"X-API-Key": KEY}
        pid = create(c, sb, body()).json()["predictionID"]
        assert create(c, sb, body()).status_code == 429  # its key's one slot is taken
        cancel = f"{sb.base_url}/prediction/{pid}/cancel"
        assert c.post(cancel, headers={"X-API-Key": KEY2}).status_code == 404  # not its key
        assert c.post(cancel, headers=headers).status_code == 200
        assert c.post(cancel, headers=headers).status_code == 409  # it has ended already
        assert wait_done(c, sb, pid)["status"] == "cancelled"
        assert create(c, sb, body()).status_code == 200  # the slot is free again
    [ended] = [e for e in sb.ledger() if e["event"] == "ended"]
    assert (ended["status"], ended["cost_usd"]) == ("cancelled", 0.0)


@pytest.mark.parametrize("legacy", [False, True])
def test_failed_jobs_carry_an_error_code_in_either_shape(sandbox: Start, legacy: bool) -> None:
    sb = sandbox(
        time_scale=0.001,
        faults=FaultRates(transient_error=1.0),
        legacy_errors=legacy,
    )
    with httpx.Client() as c:
        done = wait_done(c, sb, create(c, sb, body()).json()["predictionID"])
    assert done["status"] == "error"
    if legacy:
        assert done["output"] is None and "sandbox fault" in done["details"]
    else:
        assert done["output"]["error_code"] in TRANSIENT_ERROR_CODES
        assert done["output"]["error_message"]


def test_signed_webhooks(sandbox: Start) -> None:
    received: list[tuple[dict[str, str], bytes]] = []

    async def hook(request: Request) -> Response:
        received.append((dict(request.headers), await request.body()))
        return Response(status_code=204)

    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    with ServerThread(app) as receiver:
        sb = sandbox(time_scale=0.001, allow_loopback_urls=True)
        with httpx.Client() as c:
            payload = body()
            payload["webhook_url"] = f"{receiver.root_url}/hook"
            payload["webhook_secret"] = "whsec-test"
            wait_done(c, sb, create(c, sb, payload).json()["predictionID"])
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.01)
    [(headers, raw)] = received
    stamp = headers["x-webhook-timestamp"]
    expected = hmac.new(b"whsec-test", f"{stamp}.".encode() + raw, hashlib.sha256).hexdigest()
    assert headers["x-webhook-signature"] == f"sha256={expected}"
    assert abs(int(stamp) - time.time()) < 60
