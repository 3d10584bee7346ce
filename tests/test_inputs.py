"""Inputs that are not public HTTPS URLs (local files, file:// URLs, bucket objects) are judged
before any create, uploaded once per content to assets.upload_to and sent as presigned URLs,
which the sandbox fetches as the provider would; public inputs can be checked before any create
(manifest.check_urls), and an input the provider cannot fetch fails its job at no cost."""

from __future__ import annotations

import functools
import hashlib
import io
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.core import ConfigError, ExitCode, ManifestError, load_config, parse_config
from pipeline.runs import estimate
from pipeline.sandbox import SandboxServer
from tests.conftest import (
    KEY,
    SCALE,
    catalog,
    config_data,
    go,
    journal_rows,
    ledger_cost,
    make_config,
    results,
    shrunk_sandbox,
    write_manifest,
)

Start = Callable[..., SandboxServer]
pytestmark = pytest.mark.anyio


def _picture(size: tuple[int, int], kind: str, colour: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, kind)
    return out.getvalue()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def static(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A plain file server on loopback (a CDN stand-in): its base URL and its folder."""
    folder = tmp_path / "cdn"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()


def _fetched(sb: SandboxServer) -> list[dict[str, Any]]:
    return [e for e in sb.ledger() if e["event"] == "input_fetched"]


async def test_local_and_bucket_inputs_are_uploaded_once_and_fetched_presigned(
    sandbox: Start, tmp_path: Path, s3: Any
) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2, allow_loopback_urls=True, fetch_inputs=True)
    photos = tmp_path / "photos"
    photos.mkdir()
    red = _picture((64, 32), "JPEG")
    (photos / "red.jpg").write_bytes(red)
    (photos / "copy-of-red.jpg").write_bytes(red)  # the same content under another name
    (photos / "blue.webp").write_bytes(_picture((40, 40), "WEBP", "blue"))
    (photos / "notes.jpg").write_text("not a picture at all")
    (photos / "anim.gif").write_bytes(_picture((8, 8), "GIF"))
    with (photos / "big.png").open("wb") as big:
        big.truncate(21_000_000)  # sparse: over the provider's 20 MB without writing it
    boot = _picture((32, 64), "PNG", "green")
    s3.create_bucket(Bucket="catalog-sources")
    s3.put_object(Bucket="catalog-sources", Key="photos/boot.png", Body=boot)
    rows = [
        {"sku": "A", "image": "photos/red.jpg"},  # relative to the manifest's folder
        {"sku": "B", "image": (photos / "red.jpg").as_uri()},
        {"sku": "C", "image": "photos/copy-of-red.jpg"},
        {"sku": "D", "image": "photos/blue.webp", "second": "photos/red.jpg"},
        {"sku": "E", "image": "s3://catalog-sources/photos/boot.png"},
        {"sku": "F", "image": "photos/gone.jpg"},
        {"sku": "G", "image": "photos/notes.jpg"},
        {"sku": "H", "image": "photos/anim.gif"},
        {"sku": "I", "image": "photos/big.png"},
        {"sku": "J", "image": "s3://catalog-sources/photos/nothing.png"},
    ]
    for row in rows:  # A, B and C ask the same of the same picture, given three ways
        prompt = "make it pop" if row["sku"] in "ABC" else f"edit {row['sku']}"
        row.update(prompt=prompt, second=row.get("second", ""))
    manifest = write_manifest(tmp_path / "m.csv", rows)
    config = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        manifest={"columns": {"img_url": "image", "img_url_2": "second"}},
        assets={"upload_to": "s3://catalog-images/uploads", "upload_url_lifetime_s": 7200},
    )
    summary = await go(config, [KEY])
    assert summary.exit_code is ExitCode.ROWS_FAILED
    out = {r["sku"]: r for r in results(summary)}
    assert [s for s, r in out.items() if r["status"] == "succeeded"] == list("ABCDE")
    assert sb.stats()["creates"] == 5  # the bad inputs cost nothing: rejected before a create
    reasons = {s: str(r["error_message"]) for s, r in out.items() if r["status"] == "rejected"}
    assert "img_url (column 'image'): file " in reasons["F"] and "does not exist" in reasons["F"]
    assert "is not an image" in reasons["G"]
    assert "is a GIF image; the provider takes JPEG" in reasons["H"]
    assert "is 21.0 MB; the provider takes at most 20 MB" in reasons["I"]
    assert "nothing.png does not exist" in reasons["J"]

    # each distinct content once, named by its hash, whatever the rows or paths that use it
    listed = s3.list_objects_v2(Bucket="catalog-images", Prefix="uploads/inputs/")
    uploaded = {o["Key"].rsplit("/", 1)[1] for o in listed["Contents"]}
    digest = {
        name: hashlib.sha256(data).hexdigest() for name, data in (("red", red), ("boot", boot))
    }
    assert len(uploaded) == 3
    assert {f"{digest['red']}.jpg", f"{digest['boot']}.png"} < uploaded
    # the provider fetched every input of every create through a presigned URL of its upload
    fetched = _fetched(sb)
    assert len(fetched) == 6 and all(e["signed"] and "error_code" not in e for e in fetched)
    assert all("/catalog-images/uploads/inputs/" in e["url"] for e in fetched)
    # ...and edited those pictures: the output's aspect ratio is the last input's
    images = pq.read_table(config.output.dir / "images.parquet").to_pylist()
    ratio = {str(i["sku"]): i["width"] / i["height"] for i in images}
    assert ratio["A"] == pytest.approx(2.0, rel=0.05) and ratio["E"] == pytest.approx(0.5, rel=0.05)
    assert ratio["D"] == pytest.approx(2.0, rel=0.05)  # its last input is red.jpg
    assert sum(i["cost_usd"] for i in images) == pytest.approx(ledger_cost(sb))
    # rows of the same content buy the same thing; the secret is nowhere in the results
    bought = {r["job_id"]: r["fingerprint"] for r in journal_rows(config.output.dir)}
    assert bought["A"] == bought["B"] == bought["C"] != bought["D"]
    assert out["A"]["img_urls"] == ["photos/red.jpg"]  # as the manifest gave it
    assert out["D"]["img_urls"] == ["photos/blue.webp", "photos/red.jpg"]
    table = pq.read_table(summary.results_path).to_pandas().to_csv()
    assert "wanbatch-test-secret" not in table and "X-Amz-Signature" not in table


async def test_local_inputs_need_somewhere_to_go(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2)
    (tmp_path / "red.jpg").write_bytes(_picture((16, 16), "JPEG"))
    rows = [{"sku": "A", "prompt": "p", "img_url": "red.jpg"}]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    config = make_config(tmp_path, sb.base_url, manifest, api={"time_scale": SCALE})
    summary = await go(config, [KEY])
    assert summary.exit_code is ExitCode.ROWS_FAILED
    (row,) = results(summary)
    assert row["status"] == "rejected" and "set assets.upload_to" in str(row["error_message"])
    assert sb.stats()["creates"] == 0

    for assets, says in [
        ({"upload_to": str(tmp_path / "up")}, "must be an object-storage URL"),
        (
            {"upload_to": "s3://b/x", "upload_url_lifetime_s": 60},
            r"upload_url_lifetime_s \(60\) must be longer than polling.job_timeout_s \(120\)",
        ),
    ]:
        data = config_data(tmp_path, sb.base_url, manifest, assets=assets)
        with pytest.raises(ConfigError, match=says):
            await go(parse_config(data, tmp_path), [KEY])
    assert sb.stats()["creates"] == 0


async def test_dead_public_inputs_cost_nothing_when_checked(
    sandbox: Start, tmp_path: Path, static: tuple[str, Path]
) -> None:
    base, folder = static
    (folder / "good.jpg").write_bytes(_picture((20, 20), "JPEG"))
    (folder / "photo").write_bytes(_picture((20, 20), "PNG"))  # served as octet-stream: sniffed
    (folder / "page").write_text("<html>a shop page</html>")
    with (folder / "huge.png").open("wb") as huge:
        huge.truncate(25_000_000)
    names = ["good.jpg", "photo", "missing.jpg", "page", "huge.png"]
    rows = [{"sku": n, "prompt": "p", "img_url": f"{base}/{n}"} for n in names]
    manifest = write_manifest(tmp_path / "m.csv", rows)

    async def once(check: bool, out: str) -> tuple[SandboxServer, dict[str, dict[str, Any]]]:
        sb = shrunk_sandbox(sandbox, latency_mean_s=2, allow_loopback_urls=True, fetch_inputs=True)
        config = make_config(
            tmp_path,
            sb.base_url,
            manifest,
            api={"time_scale": SCALE},
            output={"dir": str(tmp_path / out)},
            manifest={"allow_loopback_urls": True, "check_urls": check},
        )
        summary = await go(config, [KEY])
        assert summary.exit_code is ExitCode.ROWS_FAILED
        return sb, {str(r["sku"]): r for r in results(summary)}

    # unchecked, every row is sent; the provider fails those it cannot use (at no cost)
    sb, out = await once(False, "unchecked")
    assert sb.stats()["creates"] == 5
    assert out["missing.jpg"]["error_code"] == "INPUT_DOWNLOAD_ERROR"
    assert out["page"]["error_code"] == "INPUT_VALIDATION_ERROR"
    assert out["huge.png"]["error_code"] == "INPUT_VALIDATION_ERROR"
    assert sb.stats()["cost_usd"] == pytest.approx(0.06)

    # checked, the dead ones are rejected before any create
    sb, out = await once(True, "checked")
    assert sb.stats()["creates"] == 2
    assert {s for s, r in out.items() if r["status"] == "succeeded"} == {"good.jpg", "photo"}
    said = {s: str(r["error_message"]) for s, r in out.items() if r["status"] == "rejected"}
    assert "missing.jpg answered HTTP 404" in said["missing.jpg"]
    assert "is application/octet-stream, not an image" in said["page"]
    assert "is 25.0 MB; the provider takes at most 20 MB" in said["huge.png"]


async def test_the_sandbox_fails_a_job_whose_input_it_cannot_fetch(
    sandbox: Start, static: tuple[str, Path]
) -> None:
    base, folder = static
    (folder / "fine.png").write_bytes(_picture((10, 10), "PNG"))
    (folder / "text.png").write_text("hello")
    sb = shrunk_sandbox(sandbox, latency_mean_s=1, allow_loopback_urls=True, fetch_inputs=True)
    ends: dict[str, Any] = {}
    async with httpx.AsyncClient(headers={"X-API-Key": KEY}) as http:
        ids = {}
        for name in ("fine.png", "text.png", "gone.png"):
            body = {"model": "alibaba-wan-2-7-image-edit", "input": {"prompt": "p"}}
            body["input"]["img_url"] = f"{base}/{name}"
            ids[name] = (await http.post(f"{sb.base_url}/prediction/", json=body)).json()[
                "predictionID"
            ]
        for name, pid in ids.items():
            for _ in range(200):  # bounded: jobs end within a few of their 0.05 s latencies
                answer = (await http.get(f"{sb.base_url}/prediction/{pid}")).json()
                if answer["status"] in ("success", "error"):
                    ends[name] = answer
                    break
                await anyio.sleep(0.02)
    assert ends["fine.png"]["status"] == "success"
    assert ends["text.png"]["output"]["error_code"] == "INPUT_VALIDATION_ERROR"
    assert ends["gone.png"]["output"]["error_code"] == "INPUT_DOWNLOAD_ERROR"
    assert sb.stats()["inputs"] == {"fetched": 1, "failed": 2}
    assert sb.stats()["cost_usd"] == pytest.approx(0.03)


async def test_manifest_and_config_read_from_a_bucket(
    sandbox: Start, tmp_path: Path, s3: Any
) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2)
    local = write_manifest(tmp_path / "m.csv", catalog(3))
    s3.put_object(Bucket="catalog-images", Key="manifests/m.csv", Body=local.read_bytes())
    data = config_data(tmp_path, sb.base_url, local, api={"time_scale": SCALE})
    data["manifest"]["path"] = "s3://catalog-images/manifests/m.csv"
    s3.put_object(Bucket="catalog-images", Key="nightly.yaml", Body=yaml.safe_dump(data))

    config = load_config("s3://catalog-images/nightly.yaml")
    assert config.manifest.source == "s3://catalog-images/manifests/m.csv"
    assert estimate(config, keys=1).rows == 3  # from a copy of its own
    assert not config.output.dir.exists()
    summary = await go(config, [KEY])
    assert summary.exit_code is ExitCode.OK
    assert sorted(r["sku"] for r in results(summary)) == ["SKU-1", "SKU-2", "SKU-3"]
    assert config.manifest.path.parent == config.output.dir  # the run's copy, in its folder
    assert config.manifest.path.read_bytes() == local.read_bytes()

    with pytest.raises(ConfigError, match=r"cannot read config s3://catalog-images/no\.yaml"):
        load_config("s3://catalog-images/no.yaml")
    data["manifest"]["path"] = "s3://catalog-images/manifests/gone.csv"
    data["output"]["dir"] = str(tmp_path / "other")
    with pytest.raises(ManifestError, match=r"manifest s3://catalog-images/manifests/gone\.csv"):
        await go(parse_config(data, tmp_path), [KEY])
    assert sb.stats()["creates"] == 3
