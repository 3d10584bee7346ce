"""The HTML report, loaded in a real headless Chromium (Debian's `chromium`, installed here when
missing): what it shows, filtered and paged, with local thumbnails; a screenshot is kept in
`test-artifacts/`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext

from pipeline.core import ExitCode, JobOutcome, JobSpec, Rejected, Status
from pipeline.journal import Finish, Journal, StoreImage
from pipeline.outputs import write_report
from pipeline.sandbox import FaultRates
from tests.conftest import (
    CHROMIUM_FLAGS,
    KEY,
    SCALE,
    catalog,
    go,
    make_config,
    results,
    shrunk_sandbox,
    write_manifest,
)
from tests.test_observe import Start, _cli

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _browse(binary: str, page: str, profile: Path, screenshot: Path | None = None) -> str:
    """The page's DOM once its script has run (or a screenshot of it)."""
    args = [
        binary,
        "--headless",
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--window-size=1280,1800",
    ]
    args.append(f"--screenshot={screenshot}" if screenshot else "--dump-dom")
    done = subprocess.run([*args, page], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# the thumbnails in view have loaded (or failed); lazy ones further down may not have started.
# Waiting for "networkidle" instead, which Playwright's docs discourage, once timed out at 30 s
# on a loaded machine with the page drawn
_THUMBS_IN_VIEW_LOADED = """() => Array.from(document.images)
  .filter(img => img.getBoundingClientRect().top < window.innerHeight)
  .every(img => img.complete)"""


async def _shown(context: BrowserContext, url: str, screenshot: Path | None = None) -> str:
    """The page's DOM once its script has drawn the entries (and a screenshot of it)."""
    page = await context.new_page()
    try:
        await page.goto(url)
        await page.wait_for_selector("article.entry")
        await page.wait_for_function(_THUMBS_IN_VIEW_LOADED)
        if screenshot is not None:
            await page.screenshot(path=str(screenshot))
        return await page.content()
    finally:
        await page.close()


def _entries(dom: str) -> list[str]:
    return re.findall(r'<article class="entry[^"]*" data-status="(\w+)"', dom)


@pytest.mark.anyio
async def test_report_in_headless_chromium(
    sandbox: Start, tmp_path: Path, browser: Browser
) -> None:
    sb = shrunk_sandbox(
        sandbox,
        latency_mean_s=2,
        allow_loopback_urls=True,
        faults=FaultRates(job_error=0.1),
    )
    rows = catalog(130)
    for row in rows:  # a photo the sandbox serves, so it has a thumbnail (fetched once)
        row["img_url"] = f"{sb.base_url.removesuffix('/v1')}/samples/mug-white.png"
    rows[5]["prompt"] = ""  # rejected
    manifest = write_manifest(tmp_path / "m.csv", rows)
    config = make_config(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        manifest={"allow_loopback_urls": True},
    )
    summary = await go(config, [KEY])
    assert summary.exit_code is ExitCode.ROWS_FAILED
    out = results(summary)
    failed = sum(r["status"] == "failed" for r in out)
    assert failed > 0
    run_dir = config.output.dir
    report = run_dir / "report.html"
    assert report.is_file()
    # one profile for every view, as one reader's browser
    context = await browser.new_context(viewport={"width": 1280, "height": 1800})

    # it opens on what needs a person: the edits still to review
    succeeded = sum(r["status"] == "succeeded" for r in out)
    opened = await _shown(context, report.as_uri())
    assert set(_entries(opened)) == {"succeeded"} and f"({succeeded} rows)" in opened
    first = await _shown(context, report.as_uri() + "#status=all&review=all&q=&page=1")
    assert len(_entries(first)) == 100  # the first page of 130 rows
    assert "page 1 of 2 (130 rows)" in first
    assert re.search(r'data-name="rows"><b>130</b>', first)
    cost = f"${summary.totals['cost_usd']:.2f}"
    assert re.search(rf'data-name="cost"><b>{re.escape(cost)}</b>', first)
    pictures = re.findall(r'<img [^>]*src="([^"]+)"', first)
    assert pictures and all(p.startswith("report-thumbs/") for p in pictures)  # not hot-linked
    assert all((run_dir / p).is_file() for p in pictures)
    inputs = [p for p in pictures if p.startswith("report-thumbs/i-")]
    outputs = [p for p in pictures if p.startswith("report-thumbs/o-")]
    assert inputs and len(outputs) >= sum(s == "succeeded" for s in _entries(first))

    only_failed = await _shown(context, report.as_uri() + "#status=failed&review=all&q=&page=1")
    assert _entries(only_failed) == ["failed"] * failed
    assert "job_error" in only_failed
    second = await _shown(context, report.as_uri() + "#status=all&review=all&q=&page=2")
    assert len(_entries(second)) == 30
    search = await _shown(context, report.as_uri() + "#status=all&review=all&q=SKU-42&page=1")
    assert _entries(search) and 'data-row="42"' in search

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    await _shown(context, report.as_uri(), screenshot=shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000

    report.unlink()  # `wanbatch report` writes it again from the journal alone
    creates = sb.stats()["creates"]
    again = _cli("report", str(run_dir))
    assert again.returncode == 0, again.stderr
    assert report.is_file() and sb.stats()["creates"] == creates
    assert len(_entries(await _shown(context, report.as_uri()))) == min(succeeded, 100)


@pytest.mark.anyio
async def test_input_thumbnails_can_be_left_out(sandbox: Start, tmp_path: Path) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2, allow_loopback_urls=True)
    rows = catalog(3)
    for i, row in enumerate(rows):
        row["img_url"] = f"{sb.base_url.removesuffix('/v1')}/samples/mug-white.png?{i}"
    manifest = write_manifest(tmp_path / "m.csv", rows)

    async def thumbnails(out: str, keep_inputs: bool) -> list[str]:
        config = make_config(
            tmp_path,
            sb.base_url,
            manifest,
            api={"time_scale": SCALE},
            output={"dir": str(tmp_path / out)},
            manifest={"allow_loopback_urls": True},
            assets={"input_thumbnails": keep_inputs},
        )
        assert (await go(config, [KEY])).exit_code is ExitCode.OK
        return sorted(p.name[:2] for p in (config.output.dir / "report-thumbs").iterdir())

    assert await thumbnails("with", True) == ["i-"] * 3 + ["o-"] * 3
    assert await thumbnails("without", False) == ["o-"] * 3


HOSTILE = (
    "<!--<script>",
    "</script><img src=x onerror=\"document.title='owned'\">",
    "line\u2028separator\u2029paragraph",
    "& &amp; <b>bold</b>",
)


def test_hostile_values_show_as_text_in_chromium(tmp_path: Path, chromium: str) -> None:
    """Whatever a manifest or the provider puts in a prompt, an id or an error, the report
    shows it as text: every row is drawn, and none of it becomes markup or script."""
    run_dir = tmp_path / "run"
    journal = Journal(run_dir / "journal.sqlite")
    batch: list[JobSpec | Rejected] = []
    for row, text in enumerate(HOSTILE, start=1):
        record = {"sku": f"{text}-{row}", "prompt": text}
        inputs = {"prompt": text, "img_url": f"https://shop.test/{row}.jpg"}
        batch.append(JobSpec(f"job-{row}", row, inputs, record, f"fp-{row}"))
    batch.append(Rejected("job-5", 5, {"sku": HOSTILE[1]}, f"row 5: prompt {HOSTILE[0]} is bad"))
    journal.intake.ingest(batch, {})
    failure = JobOutcome(
        Status.FAILED, error_type="job_error", error_message=HOSTILE[1], finished_at=1.0
    )
    journal.apply([Finish(2, failure, 0.03)])
    report = write_report(journal, run_dir, "sku")
    journal.close()

    dom = _browse(chromium, report.as_uri(), tmp_path / "chromium")
    assert len(_entries(dom)) == 5  # the page's data was read whole: no row swallowed
    assert re.search(r'data-name="rows"><b>5</b>', dom)
    assert not re.search(r"<img[^>]*onerror", dom)  # no element carries the handler
    assert "owned" not in dom.split("</title>")[0]  # and it never ran
    assert "<b>bold</b>" not in dom  # markup in a value stays text
    assert "&lt;/script&gt;&lt;img src=x onerror=" in dom  # shown as text
    assert "&lt;!--&lt;script&gt;" in dom


def test_each_image_opens_at_full_size_beside_the_catalog_columns(
    tmp_path: Path, chromium: str
) -> None:
    """A reviewer judges the edit at full size: each stored output links to its copy, the
    input and its reference images to their URLs, and the catalog columns the config names
    (`report.columns`) sit beside the row; a URL of another scheme is never made a link."""
    run_dir = tmp_path / "run"
    journal = Journal(run_dir / "journal.sqlite")
    inputs = {
        "prompt": "white background",
        "img_url": "https://shop.test/1.jpg",
        "img_url_2": "https://shop.test/1-back.jpg",
    }
    record = {"sku": "SKU-1", "Title": "Linen shirt", "Vendor": "Acme"}
    bad = {"prompt": "white", "img_url": "https://shop.test/2.jpg"}
    journal.intake.ingest(
        [
            JobSpec("SKU-1", 1, inputs, record, "fp-1"),
            JobSpec("SKU-2", 2, bad, {"sku": "SKU-2", "Title": "Mug"}, "fp-2"),
        ],
        {},
    )
    done = JobOutcome(Status.SUCCEEDED, "p1", ("https://cdn.test/p1.png",), 4.0, finished_at=1.0)
    hostile = JobOutcome(Status.SUCCEEDED, "p2", ("javascript:alert(1)",), 4.0, finished_at=1.0)
    (run_dir / "images").mkdir(parents=True)
    (run_dir / "images" / "SKU-1-0.png").write_bytes(b"not shown here")
    stored = StoreImage(1, 0, "images/SKU-1-0.png", "0" * 64, 14, 8, 6, "PNG")
    journal.apply([Finish(1, done, 0.03), Finish(2, hostile, 0.03), stored])
    report = write_report(journal, run_dir, "sku", ["Title", "Vendor"])
    journal.close()

    dom = _browse(chromium, report.as_uri(), tmp_path / "chromium")
    assert len(_entries(dom)) == 2
    assert re.search(r'<a class="full" href="images/SKU-1-0.png"', dom)  # its stored copy
    assert re.search(r'<a class="full" href="https://shop.test/1.jpg"', dom)  # the input
    assert re.search(r'<a class="ref" href="https://shop.test/1-back.jpg"[^>]*>reference 2', dom)
    assert "Title: Linen shirt" in dom and "Vendor: Acme" in dom and "Title: Mug" in dom
    assert "javascript:" not in dom.split('id="data"')[0]  # never made a link
