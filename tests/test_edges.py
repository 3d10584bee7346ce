"""The money path at its edges: bad bytes deep in a manifest, values out of the provider's
ranges, a lost or foreign journal, `--force` on a changed manifest, result columns that collide
or carry types, a results path that cannot be written. The sandbox's ledger is the judge."""

from __future__ import annotations

import datetime as dt
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import (
    ConfigError,
    ExitCode,
    RunConfig,
    RunFolderError,
    fingerprint,
    keys_from_env,
)
from pipeline.core.schema import MODEL
from pipeline.intake.manifest import CELL_LIMIT
from pipeline.outputs import RunSummary
from pipeline.sandbox import SandboxServer
from tests.conftest import (
    KEY,
    SCALE,
    catalog,
    go,
    judge_against_ledger,
    ledger_cost,
    make_config,
    results,
    shrunk_sandbox,
    write_manifest,
)

Start = Callable[..., SandboxServer]
pytestmark = pytest.mark.anyio


def _fast(sandbox: Start, **kwargs: object) -> SandboxServer:
    """Short jobs and a wide window, so a few hundred rows take a second or two."""
    kwargs.setdefault("latency_mean_s", 1)
    return shrunk_sandbox(sandbox, creates_per_window=1000, max_concurrent=20, **kwargs)


def _config(tmp_path: Path, sb: SandboxServer, path: Path, **sections: Any) -> RunConfig:
    sections.setdefault("limits", {"creates_per_window": 1000, "max_concurrent": 20})
    sections.setdefault("api", {"time_scale": SCALE})
    return make_config(tmp_path, sb.base_url, path, **sections)


async def _run_meanwhile(
    config: RunConfig, sb: SandboxServer, creates: int, action: Callable[[], object]
) -> RunSummary:
    """Run the config with KEY; once the sandbox has taken `creates` creates (money spent),
    `action` runs in a thread beside it."""

    async def when_paid() -> None:
        # the sandbox's ledger has no event to wait on: its stats are read, bounded by the
        # test's timeout
        while sb.stats()["creates"] < creates:  # noqa: ASYNC110
            await anyio.sleep(0.01)
        await anyio.to_thread.run_sync(action)

    async with anyio.create_task_group() as tg:
        tg.start_soon(when_paid)
        return await go(config, [KEY])


def _created_fingerprints(sb: SandboxServer) -> Counter[str]:
    return Counter(e["fingerprint"] for e in sb.ledger() if e["event"] == "created")


async def test_bad_bytes_late_in_a_manifest_and_oversized_cells_are_rejected_rows(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = _fast(sandbox)
    rows = catalog(60)
    text = write_manifest(tmp_path / "m.csv", rows).read_bytes()
    lines = text.split(b"\r\n")
    # past five batches of ten: row 55, a byte that is not UTF-8 in its prompt; row 58, a cell
    # over the CSV limit; row 59, a ragged row (the header line is line 0)
    lines[55] = lines[55].replace(b"edit number", b"edit \xff number")
    lines[58] = lines[58].replace(b"edit number 58", b"x" * (CELL_LIMIT + 10))
    lines[59] = lines[59] + b",extra"
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"\r\n".join(lines))
    config = _config(tmp_path, sb, manifest, manifest={"batch_rows": 10})

    summary = await go(config, [KEY])

    out = {r["row_number"]: r for r in results(summary)}
    assert sorted(out) == list(range(1, 61))
    rejected = {n: r for n, r in out.items() if r["status"] == "rejected"}
    assert sorted(rejected) == [55, 58, 59]
    assert rejected[55]["error_message"].startswith("row 55: column 'prompt': byte 0xff")
    assert "not UTF-8" in rejected[55]["error_message"]
    assert f"column 'prompt' holds {CELL_LIMIT + 10:,} characters" in rejected[58]["error_message"]
    assert rejected[59]["error_message"] == "row 59: has 4 fields; the header has 3"
    assert all(r["status"] == "succeeded" for n, r in out.items() if n not in rejected)
    assert summary.exit_code is ExitCode.ROWS_FAILED
    assert sb.stats()["creates"] == 57
    # the failures manifest keeps the rejected rows, bad byte replaced, to be fixed and rerun
    failures = summary.failures_path
    assert failures is not None
    fixed = failures.read_text(encoding="utf-8")
    assert "edit \ufffd number 55" in fixed and "SKU-58" in fixed


async def test_values_out_of_the_providers_ranges_are_rejected_before_sending(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = _fast(sandbox)
    rows = catalog(6)
    rows[0]["seed"] = "99999999999999999999"
    rows[1]["seed"] = "-1"
    rows[2]["seed"] = str(2**31 - 1)  # the largest the provider takes
    rows[3]["img_url"] = "https://cdn.example.com/p/4.gif"
    rows[4]["img_url"] = "https://cdn.example.com/p/5.SVG?v=2"
    rows[5]["img_url"] = "https://cdn.example.com/render/5"  # no extension: the provider decides
    config = _config(tmp_path, sb, write_manifest(tmp_path / "m.csv", rows))

    summary = await go(config, [KEY])

    out = {r["sku"]: r for r in results(summary)}
    assert {s for s, r in out.items() if r["status"] == "rejected"} == {
        "SKU-1",
        "SKU-2",
        "SKU-4",
        "SKU-5",
    }
    assert (
        "seed (column 'seed'): must be an integer from 0 to 2147483647"
        in out["SKU-1"]["error_message"]
    )
    assert out["SKU-1"]["seed"] is None and out["SKU-2"]["seed"] == -1
    assert "names a .gif file" in out["SKU-4"]["error_message"]
    assert "names a .svg file" in out["SKU-5"]["error_message"]
    assert out["SKU-3"]["status"] == "succeeded" and out["SKU-3"]["seed"] == 2**31 - 1
    assert sb.stats()["creates"] == 2  # nothing out of range was sent, or paid for


async def test_a_lost_or_foreign_journal_is_refused_before_any_create(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = _fast(sandbox)
    manifest = write_manifest(tmp_path / "m.csv", catalog(20))
    config = _config(tmp_path, sb, manifest)
    await go(config, [KEY])
    run_dir = config.output.dir
    other = _config(tmp_path, sb, manifest, output={"dir": str(tmp_path / "other")})
    await go(other, [KEY])
    assert sb.stats()["creates"] == 40
    journal = run_dir / "journal.sqlite"
    backup = tmp_path / "backup.sqlite"
    shutil.copy(journal, backup)

    journal.unlink()
    with pytest.raises(RunFolderError, match=r"holds results.parquet.* but no journal.sqlite"):
        await go(config, [KEY])
    shutil.copy(tmp_path / "other" / "journal.sqlite", journal)  # another run's journal
    with pytest.raises(RunFolderError, match="comes from another run"):
        await go(config, [KEY])
    data = bytearray(backup.read_bytes())
    data[len(data) // 2 :] = b"\x00" * (len(data) - len(data) // 2)  # its pages cut in half
    journal.write_bytes(bytes(data))
    with pytest.raises(RunFolderError, match=r"integrity check|cannot be opened|lost its records"):
        await go(config, [KEY])
    assert sb.stats()["creates"] == 40  # nothing was sent, so nothing was paid twice

    shutil.copy(backup, journal)  # restored from a backup: the run is whole again
    summary = await go(config, [KEY])
    assert summary.exit_code is ExitCode.OK and sb.stats()["creates"] == 40
    journal.unlink()
    again = await go(config, [KEY], fresh=True)  # starting over is said out loud
    assert again.exit_code is ExitCode.OK and sb.stats()["creates"] == 60


async def test_force_continues_with_the_manifest_as_it_is_now(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = _fast(sandbox)
    rows = catalog(10)
    manifest = write_manifest(tmp_path / "m.csv", rows)
    config = _config(tmp_path, sb, manifest, budget={"max_cost_usd": 0.15})
    first = await go(config, [KEY])
    assert first.exit_code is ExitCode.BUDGET
    sent = {r["row_number"] for r in results(first) if r["status"] == "succeeded"}
    assert len(sent) == 5 and 7 not in sent and 1 in sent

    # a sent row and an unsent row change; the last two rows go away
    rows[0]["prompt"] = "a new prompt for a sent row"
    rows[6]["prompt"] = "a new prompt for an unsent row"
    write_manifest(manifest, rows[:8])
    config = _config(tmp_path, sb, manifest)
    second = await go(config, [KEY], force=True)
    assert second.forced == {"changed_after_sent": 1, "updated": 1, "dropped": 2}
    out = {r["row_number"]: r for r in results(second)}
    assert sorted(out) == list(range(1, 9))
    assert all(r["status"] == "succeeded" for r in out.values())
    assert out[1]["prompt"] == "edit number 1"  # kept as it was sent and paid
    assert out[7]["prompt"] == "a new prompt for an unsent row"
    created = _created_fingerprints(sb)
    seed7 = out[7]["seed"]  # drawn for the row, which has none, and sent with it
    new7 = fingerprint(
        MODEL, {"prompt": rows[6]["prompt"], "img_url": rows[6]["img_url"], "seed": seed7}
    )
    old7 = fingerprint(
        MODEL, {"prompt": "edit number 7", "img_url": rows[6]["img_url"], "seed": seed7}
    )
    assert created[new7] == 1 and created[old7] == 0
    assert sum(created.values()) == 8  # nothing paid twice, the dropped rows never sent

    write_manifest(manifest, [*rows[:8], *catalog(11)[8:]])  # three rows appended
    third = await go(config, [KEY], force=True)
    assert third.forced == {"added": 3, "changed_after_sent": 1}  # row 1, still as it was sent
    assert [r["row_number"] for r in results(third)] == list(range(1, 12))
    assert third.exit_code is ExitCode.OK and sb.stats()["creates"] == 11


async def test_result_columns_are_never_shadowed_and_parquet_types_are_kept(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = _fast(sandbox)
    when = dt.datetime(2026, 11, 24, 8, 30, tzinfo=dt.UTC)
    table = pa.table(
        {
            "sku": pa.array([101, 102, 103], pa.int64()),
            "prompt": ["make it red", "make it blue", ""],
            "img_url": [f"https://cdn.example.com/{i}.jpg" for i in range(3)],
            "status": ["new", "old", "new"],
            "manifest_status": ["a", "b", "c"],
            "tags": pa.array([["x", "y"], [], None], pa.list_(pa.string())),
            "launched": pa.array([when, None, when], pa.timestamp("us", tz="UTC")),
            "price": pa.array([9.5, 10.0, None], pa.float32()),
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    config = _config(tmp_path, sb, tmp_path / "m.parquet")

    summary = await go(config, [KEY])

    out = pq.read_table(summary.results_path)
    names = out.column_names
    assert len(names) == len(set(names))
    assert out.schema.field("sku").type == pa.int64()
    assert out.schema.field("tags").type == pa.list_(pa.string())
    assert out.schema.field("launched").type == pa.timestamp("us", tz="UTC")
    assert out.schema.field("price").type == pa.float32()
    rows = {r["sku"]: r for r in out.to_pylist()}
    assert rows[101]["status"] == "succeeded" and rows[101]["manifest_manifest_status"] == "new"
    assert rows[101]["manifest_status"] == "a" and rows[101]["tags"] == ["x", "y"]
    assert rows[101]["launched"] == when and rows[102]["launched"] is None
    assert rows[103]["status"] == "rejected" and rows[103]["tags"] is None
    assert rows[101]["job_id"] == "101"
    frame = pd.read_parquet(summary.results_path)  # pandas reads it too
    assert list(frame["sku"]) == [101, 102, 103]
    # the failures manifest is the manifest's own rows, with its own types, then the reasons
    assert summary.failures_path is not None
    failed = pq.read_table(summary.failures_path)
    reasons = ["wanbatch_status", "wanbatch_error_type", "wanbatch_error_message"]
    own = failed.select([n for n in failed.column_names if n not in reasons])
    assert own.schema.remove_metadata() == table.schema.remove_metadata()
    assert failed.column_names[-3:] == reasons and failed.column("sku").to_pylist() == [103]
    assert failed.column("wanbatch_status").to_pylist() == ["rejected"]


async def test_results_path_a_folder_refuses_and_a_failed_write_keeps_the_books(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = _fast(sandbox, latency_mean_s=10)
    manifest = write_manifest(tmp_path / "m.csv", catalog(30))
    config = _config(tmp_path, sb, manifest)
    run_dir = config.output.dir
    (run_dir / "results.parquet").mkdir(parents=True)
    with pytest.raises(RunFolderError, match=r"results\.parquet is a folder"):
        await go(config, [KEY])
    assert sb.stats()["creates"] == 0
    (run_dir / "results.parquet").rmdir()

    # the same thing after money was spent: the run still ends with its books, exit 1
    summary = await _run_meanwhile(config, sb, 1, (run_dir / "results.parquet").mkdir)
    assert summary.exit_code is ExitCode.ERROR
    assert "results could not be written" in summary.message
    assert "run the same command again" in summary.message
    assert summary.counts == {"succeeded": 30}
    (run_dir / "results.parquet").rmdir()
    again = await go(config, [KEY])
    assert again.exit_code is ExitCode.OK and sb.stats()["creates"] == 30
    assert len(results(again)) == 30
    assert sum(r["cost_usd"] for r in results(again)) == pytest.approx(ledger_cost(sb))


async def test_an_output_folder_that_cannot_be_made_is_refused(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    manifest = write_manifest(tmp_path / "m.csv", catalog(2))
    config = make_config(
        tmp_path, "http://127.0.0.1:9/v1", manifest, output={"dir": str(tmp_path / "afile/run")}
    )
    with pytest.raises(RunFolderError, match=r"cannot use run folder .*afile/run"):
        await go(config, [KEY])


def test_malformed_keys_are_named_by_position_never_shown() -> None:
    for bad in ("line\nbreak", "caf\u00e9", "with space", "tab\there"):
        with pytest.raises(ConfigError) as caught:
            keys_from_env({"EACHLABS_API_KEYS": f"good-key,{bad}"})
        text = str(caught.value)
        assert "EACHLABS_API_KEYS: key 2 of 2" in text and bad not in text
    with pytest.raises(ConfigError, match="EACHLABS_API_KEY: key 1 of 1"):
        keys_from_env({"EACHLABS_API_KEY": "se\u2028cret"})


async def test_a_full_disk_mid_run_ends_with_its_books_and_resumes_without_paying_twice(
    sandbox: Start, tmp_path: Path, small_disk: Path
) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=10)
    manifest = write_manifest(tmp_path / "m.csv", catalog(60))
    config = _config(
        tmp_path,
        sb,
        manifest,
        limits={"creates_per_window": 100, "max_concurrent": 10},
        manifest={"batch_rows": 20},
        output={"dir": str(small_disk / "run")},
        assets={"store": str(tmp_path / "images")},  # the small disk holds the journal only
    )

    first = await _run_meanwhile(config, sb, 5, lambda: _fill(small_disk / "filler"))
    assert first.exit_code is ExitCode.ERROR
    # the journal or the image store meets the full disk first: either says so
    assert "database or disk is full" in first.message or "No space left" in first.message
    assert "run the same command again" in first.message
    assert 5 <= sb.stats()["creates"] < 60

    (small_disk / "filler").unlink(missing_ok=True)
    again = await go(config, [KEY])
    assert again.exit_code is ExitCode.OK
    judge_against_ledger(sb, small_disk / "run", 60)


def _fill(path: Path) -> None:
    """Write zeros to `path` until the disk has no room left (it may have none already)."""
    try:
        with path.open("wb") as out:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
    except OSError:
        pass


async def test_a_state_store_that_is_not_one_stops_the_run_before_any_request(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = _fast(sandbox)
    (tmp_path / "state.sqlite").write_text("not a database, " * 100)
    config = _config(
        tmp_path,
        sb,
        write_manifest(tmp_path / "m.csv", catalog(3)),
        incremental={"enabled": True, "state": str(tmp_path / "state.sqlite")},
    )
    with pytest.raises(ConfigError, match=r"incremental\.state .*state\.sqlite cannot be used"):
        await go(config, [KEY])
    assert sb.ledger() == []
