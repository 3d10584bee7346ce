"""How report.html holds up at scale: a journal of N finished rows (default 100,000) is made
directly, the report written from it, and the page loaded in headless Chromium.

    .venv/bin/python scripts/bench_report.py --rows 100000

Prints the time to write the report, its size, and the time Chromium takes to load it and
draw the first page (and how many entries that page has); then, driven by Playwright, what a
reviewer waits for at that size: a key that moves to the next row, an approval, the step over
to the next page, a reload that brings back the decisions kept in the browser, and the export
of them.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.core import JobOutcome, JobSpec, Rejected, Status, fingerprint
from pipeline.journal import Finish, Journal
from pipeline.outputs import write_report

_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _timed(action: Callable[[], object]) -> float:
    began = time.perf_counter()
    action()
    return (time.perf_counter() - began) * 1000


def _review(chromium: str, report: Path, decisions: int) -> None:
    """A reviewer's waits on the page, in milliseconds (Playwright's sync API)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=_FLAGS)
        page = browser.new_context(viewport={"width": 1440, "height": 900}).new_page()
        began = time.perf_counter()
        page.goto(report.as_uri())
        page.wait_for_selector("article.entry")
        print(f"review_first_page_ms {(time.perf_counter() - began) * 1000:.0f}")
        tally = page.locator("#tally")
        key = _timed(lambda: (page.keyboard.press("j"), page.evaluate("current")))
        print(f"review_next_row_ms   {key:.1f}")
        approve = _timed(lambda: (page.keyboard.press("a"), tally.inner_text()))
        print(f"review_approve_ms    {approve:.1f}")
        page.evaluate("go({page: 1})")
        last = page.locator("article.entry").nth(99)  # the page's last row (the view to review)
        last.click()
        row = last.get_attribute("data-row")
        page.wait_for_selector(f'article.entry.current[data-row="{row}"]')
        moved = f"document.querySelector('article.entry.current').dataset.row !== '{row}'"
        step = _timed(lambda: (page.keyboard.press("j"), page.wait_for_function(moved)))
        print(f"review_next_page_ms  {step:.1f}")
        page.evaluate(
            """n => { for (const r of ROWS.filter(judgeable).slice(0, n))
                decisions.set(r[F.row], {d: "approved", note: "ok"}); saveDecisions(); }""",
            decisions,
        )
        began = time.perf_counter()
        page.reload()
        page.wait_for_selector("article.entry")
        kept = tally.inner_text()
        print(f"review_reload_ms     {(time.perf_counter() - began) * 1000:.0f}  ({kept})")
        out = _timed(lambda: page.evaluate("exportDecisions()"))
        print(f"review_export_ms     {out:.0f}  ({decisions:,} decisions)")
        browser.close()


def _journal(path: Path, rows: int) -> Journal:
    journal = Journal(path)
    for start in range(1, rows + 1, 5000):
        batch: list[JobSpec | Rejected] = []
        for n in range(start, min(rows, start + 4999) + 1):
            inputs = {
                "prompt": f"edit {n}: a product on a warm wooden table",
                "img_url": f"https://cdn.example.com/{n}.jpg",
            }
            if n % 50 == 0:
                batch.append(
                    Rejected(f"SKU-{n}", n, {"sku": f"SKU-{n}"}, f"row {n}: prompt: is required")
                )
            else:
                batch.append(
                    JobSpec(f"SKU-{n}", n, inputs, {"sku": f"SKU-{n}"}, fingerprint("m", inputs))
                )
        journal.intake.ingest(batch, {})
        ends = []
        for item in batch:
            if isinstance(item, JobSpec):
                ok = item.row_number % 20 != 0
                outcome = JobOutcome(
                    Status.SUCCEEDED if ok else Status.FAILED,
                    f"pred-{item.row_number}",
                    (f"https://out.example.com/{item.row_number}.jpg",) if ok else (),
                    9.5,
                    error_type=None if ok else "job_error",
                    error_message=None if ok else "sandbox fault",
                    finished_at=time.time(),
                )
                ends.append(Finish(item.row_number, outcome, 0.03))
        journal.apply(ends)
    return journal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--decisions", type=int, default=20_000, help="kept in the browser")
    parser.add_argument(
        "--no-browser", action="store_true", help="write the report only (the suite's smoke run)"
    )
    args = parser.parse_args()
    chromium = None if args.no_browser else shutil.which("chromium")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        journal = _journal(run_dir / "journal.sqlite", args.rows)
        began = time.perf_counter()
        report = write_report(journal, run_dir, "sku")
        wrote = time.perf_counter() - began
        journal.close()
        print(f"rows                 {args.rows:,}")
        print(f"report_write_s       {wrote:.2f}")
        print(f"report_mb            {report.stat().st_size / 1e6:.1f}")
        if chromium is None:
            if not args.no_browser:
                print("chromium             not installed (apt-get install chromium)")
            return
        command = [
            chromium,
            "--headless",
            *_FLAGS,
            f"--user-data-dir={run_dir / 'profile'}",
            "--dump-dom",
        ]
        for view in ("", "#status=failed&review=all&q=&page=3"):
            began = time.perf_counter()
            dom = subprocess.run(
                [*command, report.as_uri() + view], capture_output=True, text=True, timeout=300
            ).stdout
            took = time.perf_counter() - began
            shown = len(re.findall(r'<article class="entry', dom))
            pages = re.search(r"page \d+ of [\d,]+ \([\d,]+ rows\)", dom)
            label = view or "#first page"
            said = pages.group() if pages else "?"
            print(f"chromium_load_s      {took:.2f}  {label}: {shown} entries, {said}")
        _review(chromium, report, args.decisions)


if __name__ == "__main__":
    main()
