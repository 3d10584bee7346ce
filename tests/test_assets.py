"""The edited images kept: every billed image downloaded, verified and stored, one record each;
a bad or missing download never loses the prediction and is fetched by the next run."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.core import ConfigError, ExitCode
from pipeline.sandbox import FaultRates, SandboxServer
from tests.conftest import (
    KEY,
    SCALE,
    catalog,
    go,
    ledger_cost,
    make_config,
    results,
    shrunk_sandbox,
    write_manifest,
)

Start = Callable[..., SandboxServer]
pytestmark = pytest.mark.anyio


def _images(run_dir: Path) -> list[dict[str, object]]:
    return pq.read_table(run_dir / "images.parquet").to_pylist()


async def test_every_billed_image_is_stored_and_verified(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2)
    rows = catalog(12)
    for row in rows[::3]:
        row["n"] = "2"
    manifest = write_manifest(tmp_path / "m.csv", rows)
    config = make_config(tmp_path, sb.base_url, manifest, api={"time_scale": SCALE})
    summary = await go(config, [KEY])
    assert summary.exit_code is ExitCode.OK
    run_dir = config.output.dir
    images = _images(run_dir)
    billed = [e for e in sb.ledger() if e["event"] == "ended"]
    assert len(images) == sum(e["images"] for e in billed) == 16
    assert sum(i["cost_usd"] for i in images) == pytest.approx(ledger_cost(sb))
    async with httpx.AsyncClient() as http:
        for image in images:
            assert image["state"] == "stored" and str(image["sku"]).startswith("SKU-")
            stored = (run_dir / str(image["path"])).read_bytes()
            served = (await http.get(str(image["url"]))).content
            assert hashlib.sha256(stored).hexdigest() == image["sha256"]
            assert hashlib.sha256(served).hexdigest() == image["sha256"]
            assert len(stored) == image["bytes"]
            with Image.open(io.BytesIO(stored)) as picture:
                assert picture.size == (image["width"], image["height"])
                assert picture.format == image["format"] == "JPEG"
    for row in results(summary):
        own = [i for i in images if i["row_number"] == row["row_number"]]
        assert row["output_paths"] == [i["path"] for i in own]
        assert row["output_sha256"] == [i["sha256"] for i in own]
        assert row["outputs_status"] == "stored" and len(own) == row["images"]


@pytest.mark.parametrize(
    ("fault", "limit", "says"),
    [
        ({"bad_output": 1.0}, 50_000_000, "not a whole image"),
        ({"truncated_output": 1.0}, 50_000_000, "not a whole image"),
        ({}, 1_000, "the limit is 1,000"),
    ],
)
async def test_corrupt_truncated_and_oversized_outputs_are_detected(
    sandbox: Start, tmp_path: Path, fault: dict[str, float], limit: int, says: str
) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2, faults=FaultRates(**fault))
    manifest = write_manifest(tmp_path / "m.csv", catalog(3))
    config = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        assets={"max_bytes": limit, "attempts": 2},
    )
    summary = await go(config, [KEY])
    assert summary.exit_code is ExitCode.ROWS_FAILED
    assert "3 output images could not be downloaded" in summary.message
    rows = results(summary)
    assert all(r["status"] == "succeeded" and r["prediction_id"] for r in rows)  # still paid for
    assert {r["outputs_status"] for r in rows} == {"failed_download"}
    images = _images(config.output.dir)
    assert {i["state"] for i in images} == {"failed"}
    assert all(says in str(i["error"]) for i in images)
    assert not any((config.output.dir / "images").iterdir())


async def test_failed_downloads_are_fetched_by_the_next_runs_without_creating_again(
    sandbox: Start, tmp_path: Path
) -> None:
    # half the time the sandbox serves a broken image: a run stores what it can, the next one
    # fetches the rest, and nothing is ever created twice
    sb = shrunk_sandbox(sandbox, latency_mean_s=2, faults=FaultRates(bad_output=0.5), seed=4)
    manifest = write_manifest(tmp_path / "m.csv", catalog(8))
    config = make_config(
        tmp_path, sb.base_url, manifest, api={"time_scale": SCALE}, assets={"attempts": 1}
    )
    first = await go(config, [KEY])
    assert first.counts == {"succeeded": 8}
    states = [r["outputs_status"] for r in results(first)]
    assert "failed_download" in states and first.exit_code is ExitCode.ROWS_FAILED
    runs = 1
    summary = first
    while summary.exit_code is not ExitCode.OK and runs < 12:
        summary = await go(config, [KEY])
        runs += 1
    assert summary.exit_code is ExitCode.OK, runs
    assert sb.stats()["creates"] == 8  # only the images were fetched again
    assert {r["outputs_status"] for r in results(summary)} == {"stored"}
    assert len(list((config.output.dir / "images").iterdir())) == 8


async def test_a_store_that_cannot_be_made_stops_the_run_before_any_request(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox)
    (tmp_path / "afile").write_text("")
    config = make_config(
        tmp_path,
        sb.base_url,
        write_manifest(tmp_path / "m.csv", catalog(2)),
        assets={"store": str(tmp_path / "afile" / "images")},
    )
    with pytest.raises(ConfigError, match=r"assets\.store .*afile/images cannot be used"):
        await go(config, [KEY])
    assert sb.ledger() == []


async def test_images_go_to_object_storage(sandbox: Start, tmp_path: Path, s3: Any) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2)
    manifest = write_manifest(tmp_path / "m.csv", catalog(5))
    config = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        assets={"store": "s3://catalog-images/nightly/2026-11-25"},
    )
    summary = await go(config, [KEY])
    assert summary.exit_code is ExitCode.OK
    images = _images(config.output.dir)
    assert len(images) == 5 and {i["state"] for i in images} == {"stored"}
    listed = s3.list_objects_v2(Bucket="catalog-images", Prefix="nightly/2026-11-25/")
    keys = sorted(o["Key"] for o in listed["Contents"])
    assert [f"s3://catalog-images/{k}" for k in keys] == sorted(str(i["path"]) for i in images)
    for image in images:
        key = str(image["path"]).removeprefix("s3://catalog-images/")
        body = s3.get_object(Bucket="catalog-images", Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == image["sha256"]
    assert "wanbatch-test-secret" not in pq.read_table(summary.results_path).to_pandas().to_csv()

    missing = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        output={"dir": str(tmp_path / "other")},
        assets={"store": "s3://no-such-bucket/x"},
    )
    with pytest.raises(
        ConfigError, match=r"assets\.store s3://no-such-bucket/x cannot be used"
    ) as caught:
        await go(missing, [KEY])
    assert "wanbatch-test-secret" not in str(caught.value)
    assert sb.stats()["creates"] == 5  # refused before anything was sent


@pytest.mark.parametrize("dedupe", [True, False])
async def test_rows_with_the_same_seeded_input_are_paid_once(
    sandbox: Start, tmp_path: Path, dedupe: bool
) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2)
    same = {"prompt": "a red sneaker on white", "img_url": "https://cdn.example.com/s.jpg"}
    rows = [
        {"sku": "A", **same, "seed": "7"},
        {"sku": "B", **same, "seed": "7"},  # the same draw: the provider would return the same
        {"sku": "C", **same, "seed": "7"},
        {"sku": "D", **same, "seed": ""},  # no seed: a new draw each, as asked
        {"sku": "E", **same, "seed": ""},
        {"sku": "F", **same, "seed": "8"},
    ]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    config = make_config(
        tmp_path, sb.base_url, manifest, api={"time_scale": SCALE}, manifest={"dedupe": dedupe}
    )
    summary = await go(config, [KEY])
    assert summary.exit_code is ExitCode.OK
    out = {r["sku"]: r for r in results(summary)}
    assert sb.stats()["creates"] == (4 if dedupe else 6)
    assert all(r["status"] == "succeeded" for r in out.values())
    if dedupe:
        for follower in ("B", "C"):
            row = out[follower]
            assert row["reused"] is True and row["cost_usd"] == 0
            assert row["prediction_id"] == out["A"]["prediction_id"]
            assert row["output_paths"] == out["A"]["output_paths"]
            assert row["outputs_status"] == "stored"
    assert out["D"]["prediction_id"] != out["E"]["prediction_id"]
    images = _images(config.output.dir)
    assert len(images) == 6  # one per row, the followers' pointing at the leader's copy
    assert sum(i["cost_usd"] for i in images) == pytest.approx(ledger_cost(sb))
    assert sum(r["cost_usd"] for r in out.values()) == pytest.approx(ledger_cost(sb))


async def test_reused_rows_point_at_the_earlier_copies(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2)
    manifest = write_manifest(tmp_path / "m.csv", catalog(4))
    state = {"enabled": True, "state": str(tmp_path / "state.sqlite")}

    def night(name: str) -> Any:
        return make_config(
            tmp_path,
            sb.base_url,
            manifest,
            api={"time_scale": SCALE},
            output={"dir": str(tmp_path / name)},
            incremental=state,
        )

    first = await go(night("monday"), [KEY])
    assert first.exit_code is ExitCode.OK
    monday = {r["sku"]: r for r in results(first)}
    gone = tmp_path / "monday" / str(monday["SKU-2"]["output_paths"][0])
    gone.unlink()  # someone cleaned up one stored copy

    second = await go(night("tuesday"), [KEY])
    assert second.exit_code is ExitCode.OK
    assert sb.stats()["creates"] == 4  # nothing created again
    tuesday = {r["sku"]: r for r in results(second)}
    assert all(r["reused"] and r["cost_usd"] == 0 for r in tuesday.values())
    for sku in ("SKU-1", "SKU-3", "SKU-4"):  # still there: pointed at, not fetched again
        earlier = tmp_path / "monday" / str(monday[sku]["output_paths"][0])
        assert tuesday[sku]["output_paths"] == [str(earlier)]
        assert tuesday[sku]["output_sha256"] == monday[sku]["output_sha256"]
    refetched = tuesday["SKU-2"]["output_paths"][0]  # gone: fetched again into tuesday's store
    # every output path is of one kind, absolute, whether reused or stored by this run
    assert refetched.startswith(str(tmp_path / "tuesday" / "images"))
    assert (tmp_path / "tuesday" / refetched).is_file()  # an absolute path joins as itself
    assert tuesday["SKU-2"]["output_sha256"] == monday["SKU-2"]["output_sha256"]
    images = _images(tmp_path / "tuesday")
    assert [i["state"] for i in images] == ["stored"] * 4
    assert sum(i["cost_usd"] for i in images) == 0
