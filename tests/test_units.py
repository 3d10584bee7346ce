"""Unit tests: client error translation, Retry-After, the create gate, manifests, config, keys."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from email.utils import formatdate
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import (
    ApiKey,
    BalanceShort,
    ConfigError,
    Forbidden,
    InvalidInput,
    JobOutcome,
    JobSpec,
    NotFound,
    ProtocolViolation,
    RateLimited,
    Rejected,
    ServerError,
    Status,
    TransportFailure,
    Unauthorized,
    keys_from_env,
    parse_config,
)
from pipeline.core.schema import is_loopback_host
from pipeline.intake import Manifest
from pipeline.journal import Finish, Journal, MarkCreated, MarkCreating, NoteAmbiguous
from pipeline.outputs import ResultLayout, write_results
from pipeline.provider import CreateGate, EachlabsClient, GatePaused
from pipeline.provider.client import parse_retry_after

SECRET = "sk-very-secret-value"


def client_for(handler: Any) -> EachlabsClient:
    return EachlabsClient(
        "https://api.test/v1",
        "alibaba-wan-2-7-image-edit",
        connect_timeout=5,
        read_timeout=5,
        max_connections=4,
        transport=httpx.MockTransport(handler),
    )


@pytest.mark.parametrize(
    ("status", "headers", "error", "ambiguous"),
    [
        (400, {}, InvalidInput, False),
        (401, {}, Unauthorized, False),
        (404, {}, NotFound, False),
        (429, {"Retry-After": "2.5"}, RateLimited, False),
        (500, {}, ServerError, False),
        (503, {}, ServerError, False),
        (502, {}, ServerError, True),
        (504, {}, ServerError, True),
        # any other refusal (4xx) made nothing; a redirect may hide a made job
        (418, {}, ProtocolViolation, False),
        (402, {}, BalanceShort, False),
        (403, {}, Forbidden, False),
        (307, {}, ProtocolViolation, True),
    ],
)
@pytest.mark.anyio
async def test_create_errors_are_translated(
    status: int, headers: dict[str, str], error: type[Exception], ambiguous: bool
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == f"Bearer {SECRET}"
        return httpx.Response(
            status, headers=headers, json={"status": "error", "message": "m", "details": "d"}
        )

    client = client_for(handler)
    with pytest.raises(error) as caught:
        await client.create(ApiKey(SECRET), {"prompt": "p"})
    assert getattr(caught.value, "ambiguous", False) is ambiguous
    assert SECRET not in str(caught.value)
    if status == 429:
        assert isinstance(caught.value, RateLimited) and caught.value.retry_after == 2.5
    await client.aclose()


@pytest.mark.anyio
async def test_transport_errors_are_ambiguous_only_once_sent() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def reset(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("reset", request=request)

    for handler, ambiguous in ((refused, False), (reset, True)):
        client = client_for(handler)
        with pytest.raises(TransportFailure) as caught:
            await client.create(ApiKey(SECRET), {"prompt": "p"})
        assert caught.value.ambiguous is ambiguous
        await client.aclose()


@pytest.mark.anyio
async def test_poll_answers_are_read() -> None:
    answers = iter(
        [
            {"status": "processing", "predictionID": "p1"},
            {"status": "created"},
            {"status": "starting"},
            {"status": "queued"},
            {"status": "warming-up"},  # unknown: taken as running
            {"status": "warming-up"},
            {
                "status": "success",
                "predictionID": "p1",
                "output": ["https://o/1.jpg"],
                "metrics": {"predict_time": 9.5},
            },
            {"status": "error", "predictionID": "p1", "message": "nsfw", "details": "blocked"},
            {"status": "error", "output": {"error_code": "WORKER_LOST", "error_message": "lost"}},
            {"status": "error", "output": {"error_code": "PROVIDER_REJECTED"}},
            {"status": "error", "output": "the older string form"},
            {"status": "cancelled"},
            {"predictionID": "p1"},
        ]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=next(answers))

    client = client_for(handler)
    key = ApiKey(SECRET)
    for _ in range(6):
        assert (await client.get(key, "p1")).status == "running"
    done = await client.get(key, "p1")
    assert done.status == "success" and done.output_urls == ("https://o/1.jpg",)
    assert done.predict_time_s == 9.5 and done.terminal
    failed = await client.get(key, "p1")
    assert failed.status == "error" and failed.message == "nsfw: blocked"
    assert failed.error_code is None and not failed.transient
    lost = await client.get(key, "p1")
    assert (lost.error_code, lost.message, lost.transient) == ("WORKER_LOST", "lost", True)
    rejected = await client.get(key, "p1")
    assert (rejected.error_code, rejected.transient) == ("PROVIDER_REJECTED", False)
    assert (await client.get(key, "p1")).message == "the older string form"
    cancelled = await client.get(key, "p1")
    assert cancelled.status == "cancelled" and cancelled.terminal
    with pytest.raises(ProtocolViolation):
        await client.get(key, "p1")
    await client.aclose()


@pytest.mark.anyio
async def test_cancel_and_both_error_shapes_of_a_request() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        pid = request.url.path.split("/")[-2]
        if pid == "gone":
            return httpx.Response(409, json={"error": "the prediction has ended"})
        if pid == "nope":
            return httpx.Response(403, json={"error": "operation not allowed"})
        return httpx.Response(200, json={"status": "success"})

    client = client_for(handler)
    key = ApiKey(SECRET)
    assert await client.cancel(key, "running-1") is True
    assert await client.cancel(key, "gone") is False
    with pytest.raises(Forbidden, match="HTTP 403: operation not allowed"):
        await client.cancel(key, "nope")
    await client.aclose()


def test_retry_after_forms() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.25") == 0.25
    now = time.time()
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("-4") == 0.0


class VirtualClock:
    """Time that moves only when something sleeps on it. The gate lets one task sleep at a
    time (under its lock), so each sleep simply moves the clock to its end."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)
        await anyio.lowlevel.checkpoint()


@pytest.mark.anyio
async def test_gate_spaces_creates_and_bounds_every_window() -> None:
    clock = VirtualClock()
    gate = CreateGate(creates_per_window=10, window_s=0.5, clock=clock)
    starts: list[float] = []

    async def one() -> None:
        async with gate.create():
            starts.append(clock.now())  # answered at once: the window counts from here

    async with anyio.create_task_group() as tg:
        for _ in range(30):
            tg.start_soon(one)
    gaps = [round(b - a, 9) for a, b in itertools.pairwise(starts)]
    # never a burst: a tenth of the 0.05 s interval while the window is at most half full,
    # growing to the whole interval as it fills, then whatever the window needs
    assert gaps[:9] == [0.005] * 5 + [0.01, 0.02, 0.03, 0.04]
    assert min(gaps) >= 0.005
    for i in range(len(starts) - 10):
        assert starts[i + 10] - starts[i] >= 0.5  # any 0.5 s holds at most 10
    assert starts[10] == pytest.approx(0.5)  # and the 11th goes as soon as the 1st leaves


@pytest.mark.anyio
async def test_a_paused_gate_holds_every_create_or_gives_way() -> None:
    clock = VirtualClock()
    gate = CreateGate(creates_per_window=100, window_s=1.0, clock=clock)
    gate.pause(0.2)
    assert gate.paused_for() == 0.2
    # a caller whose job can go to another key is told at once, and sends nothing
    with pytest.raises(GatePaused) as paused:
        async with gate.create(give_way=lambda: True):
            pytest.fail("a create started while its key was paused")
    assert paused.value.wait == 0.2 and gate.sent == 0 and clock.now() == 0
    # the others wait until the pause is over, whoever asks first
    started: list[float] = []

    async def one(give_way: bool) -> None:
        async with gate.create(give_way=lambda: give_way):
            started.append(clock.now())

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, False)
        tg.start_soon(one, False)
    assert started == [pytest.approx(0.2), pytest.approx(0.2 + 0.001)]
    assert gate.paused_for() == 0


def _csv(tmp_path: Path, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / "m.csv"
    path.write_bytes(text.encode(encoding))
    return path


def _manifest(path: Path, **manifest: Any) -> Manifest:
    config = parse_config(
        {"manifest": {"path": str(path), **manifest}, "output": {"dir": "out"}}, path.parent
    )
    return Manifest(config.manifest, model="alibaba-wan-2-7-image-edit", allow_loopback=False)


def _rows(m: Manifest) -> list[JobSpec | Rejected]:
    return [item for batch in m.batches() for item in batch]


def test_csv_with_bom_quotes_and_newlines(tmp_path: Path) -> None:
    text = (
        "sku,edit_prompt,main_image,n\r\n"
        'A1,"Make it red, then\nadd a ""glow""",https://x.com/a.jpg,2\r\n'
        "A2,plain,https://x.com/b.jpg,\r\n"
    )
    m = _manifest(
        _csv(tmp_path, text, "utf-8-sig"),
        id_column="sku",
        columns={"prompt": "edit_prompt", "img_url": "main_image"},
        defaults={"n": 1, "size": "2K"},
    )
    first, second = _rows(m)
    assert isinstance(first, JobSpec) and isinstance(second, JobSpec)
    assert m.columns[0] == "sku"
    assert first.inputs["prompt"] == 'Make it red, then\nadd a "glow"'
    assert first.inputs["n"] == 2 and second.inputs["n"] == 1 and second.inputs["size"] == "2K"
    assert first.job_id == "A1" and first.fingerprint != second.fingerprint


def test_bad_rows_name_row_field_and_rule(tmp_path: Path) -> None:
    text = (
        "prompt,img_url,n,seed,size\n"
        "ok,https://x.com/a.jpg,1,5,1k\n"
        ",https://x.com/a.jpg,1,,\n"
        "p,https://x.com/a.jpg,two,,\n"
        "p,https://x.com/a.jpg,1,1.5,\n"
        "p,https://x.com/a.jpg,1,,3K\n"
        "p,https://x.com/a.jpg\n"
    )
    rows = _rows(_manifest(_csv(tmp_path, text)))
    assert isinstance(rows[0], JobSpec) and rows[0].inputs["size"] == "1K"
    reasons = [r.reason for r in rows[1:] if isinstance(r, Rejected)]
    assert len(reasons) == 5
    assert reasons[0].startswith("row 2: prompt") and "required" in reasons[0]
    assert reasons[1].startswith("row 3: n") and "integer" in reasons[1]
    assert reasons[2].startswith("row 4: seed")
    assert reasons[3].startswith("row 5: size") and "1K, 2K" in reasons[3]
    assert reasons[4].startswith("row 6") and "fields" in reasons[4]


def test_parquet_manifest_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    pq.write_table(
        pa.table(
            {
                "sku": [f"S{i}" for i in range(25)],
                "prompt": ["p"] * 25,
                "img_url": ["https://x.com/a.jpg"] * 25,
                "n": pa.array([1, None] * 12 + [4], pa.int64()),
                "brand": ["acme"] * 25,
            }
        ),
        path,
    )
    m = _manifest(path, id_column="sku", batch_rows=10)
    batches = list(m.batches())
    assert [len(b) for b in batches] == [10, 10, 5]
    specs = [r for b in batches for r in b]
    assert all(isinstance(s, JobSpec) for s in specs)
    assert m.extra_columns == ["brand"]
    assert [s.row_number for s in specs] == list(range(1, 26))


def test_manifest_problems_stop_before_anything(tmp_path: Path) -> None:
    from pipeline.core import ManifestError

    path = _csv(tmp_path, "title,img_url\nx,https://x.com/a.jpg\n")
    with pytest.raises(ManifestError, match="required field 'prompt'"):
        _manifest(path)
    with pytest.raises(ManifestError, match="id_column 'sku'"):
        _manifest(_csv(tmp_path, "prompt,img_url\n"), id_column="sku")
    with pytest.raises(ManifestError, match="does not exist"):
        _manifest(tmp_path / "missing.csv")


def test_config_errors_name_the_key_path(tmp_path: Path) -> None:
    base = {"manifest": {"path": "m.csv"}, "output": {"dir": "o"}}
    for extra, needle in [
        ({"limits": {"window_s": -1}}, "limits.window_s"),
        ({"api": {"base_url": "ftp://x"}}, "api.base_url"),
        ({"manifest": {"path": "m.csv", "columns": {"colour": "c"}}}, "manifest.columns"),
        ({"retries": {"ambiguous_creates": "maybe"}}, "retries.ambiguous_creates"),
        ({"sandbox": {"faults": {"job_error": 2}}}, "sandbox.faults"),
        ({"surprise": 1}, "surprise: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            parse_config({**base, **extra}, tmp_path)
    with pytest.raises(ConfigError, match="manifest: is required"):
        parse_config({"output": {"dir": "o"}}, tmp_path)


def test_keys_never_show_their_secret() -> None:
    keys = keys_from_env(
        {"EACHLABS_API_KEYS": f" {SECRET}, other-secret ", "EACHLABS_API_KEY": "ignored"}
    )
    assert [k.secret for k in keys] == [SECRET, "other-secret"]
    assert SECRET not in repr(keys) and SECRET not in str(keys[0])
    assert str(keys[0]).startswith("key-") and len(str(keys[0])) == 12
    assert keys_from_env({"EACHLABS_API_KEY": "one"})[0].secret == "one"
    assert keys_from_env({}) == []
    with pytest.raises(ConfigError, match="twice"):
        keys_from_env({"EACHLABS_API_KEYS": "a,a"})


def test_results_rows_hold_the_outcome_the_inputs_and_the_manifest(tmp_path: Path) -> None:
    text = (
        "sku,prompt,img_url,img_url_2,n,brand,status\n"
        "A1,make it red,https://x.com/a.jpg,https://x.com/b.jpg,2,acme,new\n"
        "A2,make it blue,https://x.com/c.jpg,,,acme,old\n"
        "A3,,https://x.com/d.jpg,,3,zeta,new\n"
    )
    m = _manifest(_csv(tmp_path, text), id_column="sku")
    journal = Journal(tmp_path / "journal.sqlite")
    journal.intake.ingest(_rows(m), {})
    t = 1_790_000_000.25
    journal.apply(
        [
            MarkCreating(1, 1, "key-1", t),
            MarkCreated(1, "p1", "key-1", t + 0.5),
            Finish(
                1, JobOutcome(Status.SUCCEEDED, "p1", ("u1", "u2"), 9.7, None, None, t + 10), 0.03
            ),
            MarkCreating(2, 1, "key-1", t),
            Finish(2, JobOutcome(Status.FAILED, "p2", (), 3.0, "job_error", "boom", t + 4), 0.03),
        ]
    )
    journal.reports.requeue(None)  # row 2 is run again: its failure goes into its history
    journal.apply(
        [
            MarkCreating(2, 2, "key-1", t + 20),
            NoteAmbiguous(2),
            Finish(2, JobOutcome(Status.SUCCEEDED, "p3", ("u3",), 8.0, None, None, t + 30), 0.03),
        ]
    )
    layout = ResultLayout("sku", m.mapper.columns, m.extra_columns, m.columns, m.kind, m.path)
    assert write_results(journal, layout, tmp_path / "results.parquet").rows == 3
    table = pq.read_table(tmp_path / "results.parquet")
    assert table.column_names[:3] == ["job_id", "row_number", "sku"]
    assert table.column_names[-2:] == ["brand", "manifest_status"]
    first, second, third = table.to_pylist()
    assert first["prompt"] == "make it red" and first["n"] == 2
    assert first["img_urls"] == ["https://x.com/a.jpg", "https://x.com/b.jpg"]
    assert first["output_urls"] == ["u1", "u2"] and first["images"] == 2
    assert first["cost_usd"] == pytest.approx(0.06) and first["predict_time_s"] == 9.7
    assert first["latency_s"] == 10.0 and first["key"] == "key-1"
    assert first["created_at"].timestamp() == t + 0.5 and first["finished_at"].timestamp() == t + 10
    assert first["possible_duplicate_charge"] is False and first["reused"] is False
    assert (first["brand"], first["manifest_status"], first["status"]) == (
        "acme",
        "new",
        "succeeded",
    )
    assert second["attempts"] == 2 and second["ambiguous_creates"] == 1
    assert second["possible_duplicate_charge"] is True and second["prediction_id"] == "p3"
    assert second["n"] is None and second["img_urls"] == ["https://x.com/c.jpg"]
    [earlier] = second["history"]
    assert (earlier["status"], earlier["error_type"], earlier["prediction_id"]) == (
        "failed",
        "job_error",
        "p2",
    )
    assert earlier["finished_at"].timestamp() == t + 4
    # a rejected row shows what the manifest said, and no outcome
    assert third["status"] == "rejected" and third["error_type"] == "invalid_row"
    assert third["prompt"] == "" and third["n"] == 3 and third["sku"] == "A3"
    assert third["output_urls"] == [] and third["created_at"] is None
    assert third["latency_s"] is None and third["history"] == []


def test_loopback_hosts_are_told_from_names_and_other_addresses() -> None:
    loopback = ["localhost", "LOCALHOST", "a.localhost", "127.0.0.1", "127.9.9.9", "[::1]", "::1"]
    assert all(is_loopback_host(h) for h in loopback)
    any_or_mapped = ["0.0.0.0", "::", "[::ffff:0.0.0.0]", "::ffff:127.0.0.1"]
    assert all(is_loopback_host(h) for h in any_or_mapped)
    others = ["cdn.example.com", "10.0.0.1", "8.8.8.8", "[2001:db8::1]", "example.c0m1", ""]
    assert not any(is_loopback_host(h) for h in others)


def test_importing_the_config_loads_no_server_library() -> None:
    def loaded(module: str) -> list[str]:
        probe = (
            f"import sys, {module}\n"
            "heavy = ('starlette', 'uvicorn', 'PIL', 'pipeline.sandbox.app')\n"
            "print(sorted(m for m in heavy if m in sys.modules))"
        )
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        return list(json.loads(out.stdout.replace("'", '"')))

    assert loaded("pipeline.core.config") == []
    # the webhook receiver's uvicorn; not the sandbox's
    assert loaded("pipeline.runs.runner") == ["uvicorn"]


def test_retry_errors_are_checked_against_the_error_vocabulary(tmp_path: Path) -> None:
    from pipeline.cli.app import _error_selection
    from pipeline.core import ERROR_TYPES, TRANSIENT_ERRORS, ApiError

    every_api_error = {cls.error_type for cls in ApiError.__subclasses__()} | {"api_error"}
    assert every_api_error <= ERROR_TYPES and TRANSIENT_ERRORS <= ERROR_TYPES
    assert _error_selection("all") is None
    assert _error_selection("transient") == TRANSIENT_ERRORS
    assert _error_selection("cancelled, transient") == TRANSIENT_ERRORS | {"cancelled"}
    with pytest.raises(ConfigError, match=r"'timout' is no error type \(did you mean 'timeout'"):
        _error_selection("timout")
    with pytest.raises(ConfigError, match="'bogus' is no error type; give some of"):
        _error_selection("job_error,bogus")
    config = tmp_path / "c.yaml"
    config.write_text(f"manifest: {{path: {tmp_path / 'm.csv'}}}\noutput: {{dir: {tmp_path}}}\n")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "retry", str(config), "--errors", "bogus"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "'bogus' is no error type" in done.stderr
    assert "Traceback" not in done.stderr


def test_config_messages_name_the_file_and_the_key_meant(tmp_path: Path) -> None:
    from pipeline.core import load_config

    base = {"manifest": {"path": "m.csv"}, "output": {"dir": "out"}}
    typo = {**base, "polling": {"job_timout_s": 3}}
    with pytest.raises(ConfigError) as raised:
        parse_config(typo, tmp_path, "nightly.yaml")
    said = str(raised.value)
    assert "polling.job_timout_s: unknown key (did you mean 'job_timeout_s'?)" in said
    # a setting of the double that the run gives the embedded sandbox says where it comes from
    with pytest.raises(ConfigError) as raised:
        parse_config({**base, "sandbox": {"max_concurrent": 4, "groups": [2]}}, tmp_path, "c")
    said = str(raised.value)
    assert "sandbox.max_concurrent: unknown key (the embedded sandbox takes it from limits." in said
    assert "sandbox.groups: unknown key (the embedded sandbox makes its keys up: limits." in said
    with pytest.raises(ConfigError) as raised:
        parse_config({**base, "manifest": {"path": "m.csv", "defaults": {"n": 9}}}, tmp_path, "c")
    assert "Value error" not in str(raised.value) and "n default must be" in str(raised.value)
    # a size is read in the config as in a cell: `2k` is 2K
    sized = {**base, "manifest": {"path": "m.csv", "defaults": {"size": "2k"}}}
    assert parse_config(sized, tmp_path, "c").manifest.defaults["size"] == "2K"
    broken = tmp_path / "broken.yaml"
    broken.write_text("api:\n  base_url: [\n")
    with pytest.raises(ConfigError) as raised:
        load_config(broken)
    assert "<unicode string>" not in str(raised.value)
    assert f"in {broken}, line 3" in str(raised.value)


def test_the_closing_message_gives_the_command_for_each_kind_of_failure(tmp_path: Path) -> None:
    from pipeline.core import ExitCode, RunStats
    from pipeline.runs.verdict import Books, Faults, verdict

    books = Books(
        run_dir=tmp_path / "run",
        failed_by_type={"job_error": 2, "timeout": 1, "cancelled": 3, "invalid_input": 1},
    )
    counts = {"succeeded": 10, "failed": 7, "rejected": 2}
    code, message = verdict((ExitCode.OK, ""), Faults(), books, counts, {}, [], RunStats(), 0.03)
    assert code is ExitCode.ROWS_FAILED
    run = tmp_path / "run"
    assert f"`wanbatch retry {run}` runs the transient failures again" in message
    assert f"`wanbatch retry {run} --errors cancelled,invalid_input` runs cancelled 3" in message
    assert "finished with 7 failed and 2 rejected rows: see the failures manifest" in message


def test_stored_images_are_named_after_the_row_id_made_safe() -> None:
    from pipeline.journal.rows import stem
    from pipeline.outputs.downloads import image_name

    first = stem("SKU-42", None)
    assert image_name(first, 0, "jpg").startswith("SKU-42-") and image_name(
        first, 1, "png"
    ).endswith("-1.png")
    hostile = image_name(stem("../../etc/passwd", None), 0, "jpg")
    assert "/" not in hostile and not hostile.startswith(".") and hostile.endswith("-0.jpg")
    # the hash keeps ids that read alike apart
    assert image_name(stem("a b", None), 0, "jpg") != image_name(stem("a_b", None), 0, "jpg")
    # nothing safe left: a word of ours
    assert image_name(stem("ÿ" * 300, None), 0, "jpg").startswith("row-")
    assert len(image_name(stem("x" * 500, None), 3, "webp")) < 110  # far below 255
    # 64 bits of hash: `<id>-<16 hex>-<index>`
    assert re.fullmatch(r"SKU-42-[0-9a-f]{16}-0\.jpg", image_name(first, 0, "jpg"))


def test_help_texts_show_every_option_whole_at_80_columns() -> None:
    def helped(*args: str) -> str:
        env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", *args, "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    sandbox = helped("sandbox")
    assert "…" not in sandbox  # no option name cut short
    for option in ("--creates-per-window", "--price-per-image-usd", "--no-report-cost"):
        assert option in sandbox
    assert "'.[ray]'" in " ".join(helped("run").split())  # not eaten as markup
