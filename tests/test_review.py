"""A person reviews the edits and sends the rejected ones back: the report's review page driven
in headless Chromium (Playwright on Debian's `chromium`, with the mouse and the keyboard), its
decisions file taken by `retry --rejected`, judged by the sandbox's ledger; screenshots of the
page are kept in `test-artifacts/`."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from playwright.async_api import Browser, Page

from pipeline.core import ConfigError, ExitCode, fingerprint, from_sheet, parse_config, to_sheet
from pipeline.intake import Manifest, read_decisions
from pipeline.runs import Reprocess, folder_status
from pipeline.sandbox import SandboxServer
from tests.conftest import (
    KEY,
    KEY2,
    SCALE,
    catalog,
    config_data,
    go,
    results,
    shrunk_sandbox,
    write_manifest,
)
from tests.test_observe import Start, _cli
from tests.test_report import ARTIFACTS

_NOTE = 'logo cut off, "handle" missing'


def _all_files(paths: list[str]) -> bool:
    return all(os.path.isfile(p) for p in paths)


def _sandboxed_rows(sb: SandboxServer, count: int, one_photo: bool = False) -> list[dict[str, Any]]:
    """`count` rows whose inputs the sandbox serves, so they have thumbnails: each its own
    address, or (`one_photo`) all one, fetched, measured and drawn once (edits of their own
    all the same: each row has its own prompt)."""
    rows = catalog(count)
    for i, row in enumerate(rows):
        own = "" if one_photo else f"?{i}"
        row["img_url"] = f"{sb.base_url.removesuffix('/v1')}/samples/mug-white.png{own}"
    return rows


def _review_config(
    tmp_path: Path, sb: SandboxServer, rows: int, one_photo: bool = False, **sections: Any
) -> Any:
    manifest = write_manifest(tmp_path / "m.csv", _sandboxed_rows(sb, rows, one_photo))
    data = config_data(
        tmp_path,
        sb.base_url,
        manifest,
        api={"time_scale": SCALE},
        manifest={"allow_loopback_urls": True},
        **sections,
    )
    return data


async def _open_report(browser: Browser, run_dir: Path, width: int) -> tuple[Page, list[str]]:
    context = await browser.new_context(
        viewport={"width": width, "height": 900}, accept_downloads=True
    )
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto((run_dir / "report.html").as_uri())
    await page.wait_for_selector("article.entry")
    return page, errors


def _row(page: Page, row: int) -> Any:
    return page.locator(f'article.entry[data-row="{row}"]')


async def _review(page: Page, full: str, width: int) -> dict[int, tuple[str, str]]:
    """Decide rows with the mouse and the keyboard, as a reviewer does; what was decided.
    `full`, `width`: where row 1's output is stored, and its width in pixels. Each key is
    tried alone: a decision does not move on here (the page's `advance` switch, off)."""
    await page.locator("#advance").uncheck()
    # the mouse: an output opens at full size (its stored copy), beside the input
    await _row(page, 1).locator(".pics").nth(1).locator("a.full").first.click()
    viewer = page.locator("#viewer.open")
    await viewer.wait_for()
    after = viewer.locator("figure").nth(1).locator("img")
    await after.wait_for()
    await page.wait_for_function("document.querySelectorAll('#vstage img')[1].complete")
    assert await after.get_attribute("src") == full  # the stored copy, not the thumbnail
    assert await after.evaluate("img => img.naturalWidth") == width
    assert "before: input" in await viewer.locator("figcaption").first.inner_text()
    await page.keyboard.press("Escape")
    assert await page.locator("#viewer.open").count() == 0
    await _row(page, 1).locator("button.approve").click()
    await _row(page, 2).locator("button.reject").click()
    await _row(page, 2).locator("input.note").fill("too dark")
    # the keyboard: j moves on, a approves, r rejects, n writes a note, u undecides
    await _row(page, 2).locator(".meta-box").click()
    await page.keyboard.press("j")
    await page.keyboard.press("a")
    await page.keyboard.press("j")
    await page.keyboard.press("r")
    await page.keyboard.press("n")
    await page.keyboard.type(_NOTE)
    await page.keyboard.press("Enter")
    await page.keyboard.press("j")
    await page.keyboard.press("r")
    await page.keyboard.press("u")  # changed its mind: row 5 stays undecided
    await page.keyboard.press("j")
    await page.keyboard.press("Enter")  # row 6 at full size, judged there
    await page.locator("#viewer.open").wait_for()
    await page.keyboard.press("a")
    await page.keyboard.press("Escape")
    for _ in range(100 - 6):  # to the last row of the first page, then over to the next
        await page.keyboard.press("j")
    await page.keyboard.press("j")
    await page.wait_for_selector('article.entry.current[data-row="101"]')
    await page.keyboard.press("r")
    return {
        1: ("approved", ""),
        2: ("rejected", "too dark"),
        3: ("approved", ""),
        4: ("rejected", _NOTE),
        6: ("approved", ""),
        101: ("rejected", ""),
    }


async def _exported(page: Page, into: Path) -> Path:
    async with page.expect_download() as download:
        await page.locator("#export").click()
    await (await download.value).save_as(into)
    return into


_ROWS = 120  # two of the page's pages of 100: the review goes over to the second


@pytest.mark.anyio
async def test_a_reviewer_decides_in_the_browser_and_retry_remakes_exactly_the_rejected(
    sandbox: Start, tmp_path: Path, browser: Browser
) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2, allow_loopback_urls=True)
    data = _review_config(tmp_path, sb, _ROWS, one_photo=True)
    summary = await go(parse_config(data, tmp_path), [KEY, KEY2])
    assert summary.exit_code is ExitCode.OK
    run_dir = summary.run_dir
    before = {r["row_number"]: r for r in results(summary)}
    first_creates = [e for e in sb.ledger() if e["event"] == "created"]
    assert len(first_creates) == _ROWS

    page, errors = await _open_report(browser, run_dir, 1440)
    stored = Path(before[1]["output_paths"][0]).relative_to(run_dir).as_posix()
    decided = await _review(page, stored, before[1]["output_width"][0])
    await page.keyboard.press("k")  # back over to the first page
    await page.wait_for_selector('article.entry.current[data-row="100"]')
    await page.reload()  # the decisions are kept in the browser
    await page.wait_for_selector("article.entry")
    await page.select_option("#decided", "all")  # it opens on the rows still to review
    await page.evaluate("window.scrollTo(0, 0)")
    assert "approved 3 \u00b7 rejected 3" in await page.locator("#tally").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "review-desktop-1440.png"))
    await page.set_viewport_size({"width": 1280, "height": 800})
    await page.screenshot(path=str(ARTIFACTS / "review-laptop-1280.png"))
    await _row(page, 4).locator(".meta-box").click()
    await page.keyboard.press("Enter")
    await page.locator("#viewer.open").wait_for()
    await page.screenshot(path=str(ARTIFACTS / "review-compare-1280.png"))
    await page.keyboard.press("Escape")
    exported = await _exported(page, tmp_path / "decisions.csv")
    assert errors == []
    with exported.open(newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert {int(d["row"]): (d["decision"], d["note"]) for d in lines} == decided
    for line in lines:
        row = before[int(line["row"])]
        assert (line["job_id"], line["prediction_id"]) == (row["job_id"], row["prediction_id"])

    # the rejected edits made again, with a prompt changed for them by --set
    data["manifest"]["prompt_template"] = "{prompt}, keep the logo whole"
    again_config = parse_config(data, tmp_path)
    again = await go(again_config, [KEY, KEY2], reprocess=Reprocess((), decisions=exported))
    assert again.exit_code is ExitCode.OK
    after = {r["row_number"]: r for r in results(again)}
    rejected = {row for row, (d, _) in decided.items() if d == "rejected"}
    approved = {row for row, (d, _) in decided.items() if d == "approved"}
    new_creates = [e for e in sb.ledger() if e["event"] == "created"][_ROWS:]
    # exactly the rejected rows were sent again, each once, with the input the results show
    assert sorted(after[r]["prediction_id"] for r in rejected) == sorted(
        e["prediction_id"] for e in new_creates
    )
    for row in rejected:
        now, was = after[row], before[row]
        assert now["status"] == "succeeded" and now["prediction_id"] != was["prediction_id"]
        assert now["prompt"] == f"{was['prompt']}, keep the logo whole"
        assert now["seed"] is not None and now["review"] is None
        sent = {"prompt": now["prompt"], "img_url": now["img_urls"][0], "seed": now["seed"]}
        assert fingerprint(again_config.api.model, sent) in {e["fingerprint"] for e in new_creates}
        earlier = now["history"][-1]
        assert earlier["review"] == "rejected"
        assert (earlier["review_note"] or "") == decided[row][1]
        assert earlier["prediction_id"] == was["prediction_id"]
        assert earlier["output_paths"] == was["output_paths"]  # the rejected edit is kept
        assert _all_files(earlier["output_paths"])
        assert set(now["output_paths"]).isdisjoint(was["output_paths"])
    for row in approved:
        assert after[row]["review"] == "approved" and after[row]["history"] == []
        assert after[row]["prediction_id"] == before[row]["prediction_id"]
    untouched = set(after) - rejected - approved
    assert all(after[r]["prediction_id"] == before[r]["prediction_id"] for r in untouched)
    assert all(after[r]["review"] is None for r in untouched)

    # the approved export lists exactly the approved images, where they are stored
    with (run_dir / "approved.csv").open(newline="") as handle:
        listed = list(csv.DictReader(handle))
    assert [(int(a["row"]), a["path"]) for a in listed] == [
        (row, path) for row in sorted(approved) for path in before[row]["output_paths"]
    ]
    assert _all_files([a["path"] for a in listed]) and all(a["sha256"] for a in listed)

    # the same file again pays for nothing: every rejected edit was made again since
    await go(parse_config(data, tmp_path), [KEY, KEY2], reprocess=Reprocess((), decisions=exported))
    assert len([e for e in sb.ledger() if e["event"] == "created"]) == _ROWS + len(rejected)


@pytest.mark.anyio
async def test_a_fixed_seed_is_kept_an_approval_is_final_and_no_night_reuses_a_rejection(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2, allow_loopback_urls=True)
    state = tmp_path / "state.sqlite"
    data = _review_config(
        tmp_path,
        sb,
        6,
        incremental={"enabled": True, "state": str(state)},
    )
    data["manifest"]["defaults"] = {"seed": 7}
    summary = await go(parse_config(data, tmp_path), [KEY])
    first = {r["row_number"]: r for r in results(summary)}
    decisions = tmp_path / "decisions.csv"
    # as a spreadsheet saves it: a BOM, its own header case, words of its own
    decisions.write_text(
        "\ufeffRow,Decision,Note\r\n1,Reject,too dark\r\n2,approve,\r\n3,,\r\n", encoding="utf-8"
    )
    # the same seed and prompt would buy the same image again: not sent, the approval kept
    await go(parse_config(data, tmp_path), [KEY], reprocess=Reprocess((), decisions=decisions))
    same = {r["row_number"]: r for r in results(summary)}
    assert same[1]["prediction_id"] == first[1]["prediction_id"] and same[1]["review"] is None
    assert same[2]["review"] == "approved"
    assert len([e for e in sb.ledger() if e["event"] == "created"]) == 6
    # a changed prompt remakes it, with the seed the config fixes
    data["manifest"]["prompt_template"] = "Place the product on warm oak, daylight"
    await go(parse_config(data, tmp_path), [KEY], reprocess=Reprocess((), decisions=decisions))
    second = {r["row_number"]: r for r in results(summary)}
    assert second[1]["seed"] == 7 and second[1]["prediction_id"] != first[1]["prediction_id"]
    assert second[2]["review"] == "approved" and second[3]["review"] is None

    # rejecting an approved edit, or the made-again one without naming it, sends nothing
    decisions.write_text("row,decision\n2,rejected\n1,rejected\n")
    creates = len([e for e in sb.ledger() if e["event"] == "created"])
    await go(parse_config(data, tmp_path), [KEY], reprocess=Reprocess((), decisions=decisions))
    assert len([e for e in sb.ledger() if e["event"] == "created"]) == creates == 7
    assert {r["row_number"]: r["review"] for r in results(summary)}[2] == "approved"

    # the next night, on the config as it is now, carries over the edit made again (the other
    # rows' prompt changed since they were made: new edits)
    data["output"]["dir"] = str(tmp_path / "next-night")
    night = await go(parse_config(data, tmp_path), [KEY])
    carried = {r["row_number"]: r for r in results(night)}
    assert carried[1]["reused"] and not any(carried[n]["reused"] for n in range(2, 7))
    assert carried[1]["prediction_id"] == second[1]["prediction_id"]
    assert len([e for e in sb.ledger() if e["event"] == "created"]) == 7 + 5


def test_a_decisions_file_that_breaks_a_rule_is_refused_naming_line_field_and_rule(
    tmp_path: Path,
) -> None:
    path = tmp_path / "decisions.csv"
    path.write_text("job_id,row,decision\nA,1,maybe\nB,x,approved\nC,3,rejected\nD,3,approved\n")
    with pytest.raises(ConfigError) as raised:
        read_decisions(path)
    said = str(raised.value)
    assert "line 2, field decision: 'maybe' is not approved or rejected" in said
    assert "line 3, field row: 'x' is not a row number" in said
    assert "line 5, field row: row 3 is decided twice (lines 4 and 5)" in said
    path.write_text("sku,verdict\n1,approved\n")
    with pytest.raises(ConfigError, match="line 1 has no row or decision column"):
        read_decisions(path)
    path.write_bytes("row,decision,note\n1,rejected,caf\xe9\n".encode("cp1252"))
    with pytest.raises(ConfigError, match="is not UTF-8 text; save it as CSV UTF-8"):
        read_decisions(path)
    path.write_text("row,decision\n1,approved\n2,\n")
    assert [(d.row_number, d.decision) for d in read_decisions(path)] == [(1, "approved")]
    # any cell a person can type: a clear error, never an internal one
    path.write_text("row,decision\n²,approved\n\u0661,rejected\n-1,approved\n1e3,approved\n")
    with pytest.raises(ConfigError) as raised:
        read_decisions(path)
    for line, cell in ((2, "²"), (3, "\u0661"), (4, "-1"), (5, "1e3")):
        assert f"line {line}, field row: {cell!r} is not a row number" in str(raised.value)


def test_spreadsheet_bound_cells_are_neutralised_and_read_back_as_written(tmp_path: Path) -> None:
    """OWASP's CSV injection guidance: a text cell starting `=`, `+`, `-`, `@`, a tab or a
    carriage return gets a leading `'`; numbers stay numbers; wanbatch reads it back."""
    for text in ('=HYPERLINK("http://x")', "+1+1", "-cmd", "@SUM(A1)", "\tx", "\rx"):
        assert to_sheet(text) == "'" + text and from_sheet(str(to_sheet(text))) == text
    for kept in ("-5", "+3.5", "1e3", "plain", "'quoted", ""):
        assert to_sheet(kept) == kept and from_sheet(kept) == kept
    path = tmp_path / "decisions.csv"
    path.write_text("row,decision,note\n1,rejected,'=too dark\n")
    assert read_decisions(path)[0].note == "=too dark"


def test_decisions_as_spreadsheets_save_them_are_read(tmp_path: Path) -> None:
    """Excel where the comma is the decimal mark saves `;`-separated CSV UTF-8 (BOM, CRLF);
    its "Unicode text" is UTF-16 with a BOM, tab-separated. Both read as the page wrote them."""
    wanted = [(1, "SKU-1", "approved", ""), (2, "Mütze/2", "rejected", 'zu dunkel; "Logo" fehlt')]
    german = "\ufeffjob_id;row;decision;note\r\nSKU-1;1;Approve;\r\n"
    german += 'Mütze/2;2;rejected;"zu dunkel; ""Logo"" fehlt"\r\n'
    unicode_text = "job_id\trow\tdecision\tnote\r\nSKU-1\t1\tapproved\t\r\n"
    unicode_text += 'Mütze/2\t2\treject\t"zu dunkel; ""Logo"" fehlt"\r\n'
    for name, data in (
        ("german.csv", german.encode()),
        ("unicode.txt", unicode_text.encode("utf-16")),
    ):
        path = tmp_path / name
        path.write_bytes(data)
        found = [(d.row_number, d.job_id, d.decision, d.note) for d in read_decisions(path)]
        assert found == wanted, name


@pytest.mark.anyio
async def test_decisions_of_another_run_are_refused_before_anything_is_sent(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2, allow_loopback_urls=True)
    data = _review_config(tmp_path, sb, 3)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    done = _cli("run", str(config))
    assert done.returncode == 0, done.stderr
    creates = len(sb.ledger())
    decisions = tmp_path / "theirs.csv"
    decisions.write_text("job_id,row,decision\nSKU-9,1,rejected\nSKU-2,2,rejected\nX,44,approved\n")
    # with a changed mapping (--set) too: refused, the run's own mapping stays its own
    refused = _cli(
        "retry",
        str(tmp_path / "run"),
        "--rejected",
        str(decisions),
        "--set",
        "manifest.defaults.size=1K",
    )
    assert refused.returncode == int(ExitCode.BAD_INPUT), refused.stderr
    said = refused.stderr
    assert "line 2, field job_id: row 1 is 'SKU-1' in this run, not 'SKU-9'" in said
    assert "line 4, field row: row 44 is not in this run" in said
    assert "nothing was recorded or sent" in said and "Traceback" not in said
    assert len(sb.ledger()) == creates
    table = pq.read_table(tmp_path / "run" / "results.parquet").to_pylist()
    assert all(r["review"] is None and r["history"] == [] for r in table)
    missing = _cli("retry", str(tmp_path / "run"), "--rejected", str(tmp_path / "none.csv"))
    assert missing.returncode == int(ExitCode.BAD_INPUT) and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    resumed = _cli("run", str(config))
    assert resumed.returncode == 0, resumed.stderr  # not "a run of another mapping"
    assert len(sb.ledger()) == creates


@pytest.mark.anyio
async def test_the_failures_manifest_is_safe_to_open_and_reads_back_as_written(
    sandbox: Start, tmp_path: Path
) -> None:
    sb = shrunk_sandbox(sandbox)
    rows = catalog(2)
    rows[1]["img_url"] = "not-a-url.gif"  # rejected: into the failures manifest
    for row in rows:
        row["note"] = '=HYPERLINK("http://evil.example")'
        row["price"] = "-5"
    manifest = write_manifest(tmp_path / "m.csv", rows)
    config = parse_config(config_data(tmp_path, sb.base_url, manifest), tmp_path)
    summary = await go(config, [KEY])
    assert summary.failures_path is not None
    line = summary.failures_path.read_text().splitlines()[1]
    assert "'=HYPERLINK" in line and ",-5," in line  # a formula neutralised, a number kept
    again = parse_config(config_data(tmp_path, sb.base_url, summary.failures_path), tmp_path)

    (item,) = [
        i
        for b in Manifest(again.manifest, model=config.api.model, allow_loopback=False).batches()
        for i in b
    ]
    assert (
        item.record["note"] == '=HYPERLINK("http://evil.example")' and item.record["price"] == "-5"
    )


@pytest.mark.anyio
async def test_a_remake_is_remembered_under_the_input_it_was_made_for(
    sandbox: Start, tmp_path: Path
) -> None:
    """A rejected edit remade with a changed prompt is what the state store carries the next
    night, for the changed prompt and for the row as it was: the rejected edit is never bought
    again, and the remake keeps its approval."""
    sb = shrunk_sandbox(sandbox, latency_mean_s=2, allow_loopback_urls=True)
    state = tmp_path / "state.sqlite"
    data = _review_config(tmp_path, sb, 3, incremental={"enabled": True, "state": str(state)})
    summary = await go(parse_config(data, tmp_path), [KEY])
    decisions = tmp_path / "decisions.csv"
    decisions.write_text("row,decision,note\n1,rejected,too dark\n")
    data["manifest"]["prompt_template"] = "Place the product on warm oak, daylight"
    await go(parse_config(data, tmp_path), [KEY], reprocess=Reprocess((), decisions=decisions))
    remade = {r["row_number"]: r for r in results(summary)}[1]
    assert remade["prompt"] == "Place the product on warm oak, daylight"
    # status and summary.json count where the review stands
    counted = {"approved": 0, "rejected": 1, "to_review": 3}
    assert folder_status(summary.run_dir, []).reviews == counted
    assert json.loads((summary.run_dir / "summary.json").read_text())["reviews"] == counted
    data["output"]["dir"] = str(tmp_path / "next-night")
    night = {r["row_number"]: r for r in results(await go(parse_config(data, tmp_path), [KEY]))}
    assert night[1]["reused"] and night[1]["prediction_id"] == remade["prediction_id"]
    # reused rows show their input in the report, as rows sent do
    thumbs = tmp_path / "next-night" / "report-thumbs"
    assert len([p for p in thumbs.iterdir() if p.name.startswith("i-")]) == 3
    # approved, and the row mapped as it was (the first prompt): the remake, still approved,
    # and the other rows their own edits; nothing is created
    decisions.write_text(
        f"job_id,prediction_id,decision\n{remade['job_id']},{remade['prediction_id']},approved\n"
    )
    await go(parse_config(data, tmp_path), [KEY], reprocess=Reprocess((), decisions=decisions))
    creates = sb.stats()["creates"]
    del data["manifest"]["prompt_template"]
    data["output"]["dir"] = str(tmp_path / "third-night")
    third = {r["row_number"]: r for r in results(await go(parse_config(data, tmp_path), [KEY]))}
    assert third[1]["prediction_id"] == remade["prediction_id"] and third[1]["reused"]
    assert third[1]["review"] == "approved" and third[2]["review"] is None
    assert third[2]["reused"] and third[3]["reused"] and sb.stats()["creates"] == creates


@pytest.mark.anyio
async def test_a_decision_is_the_edits_and_every_row_sharing_it_is_judged_with_it(
    sandbox: Start, tmp_path: Path
) -> None:
    """Rows 2, 3 and 4 send one seeded input: one edit. Contradicting decisions on it are
    refused; a rejection of one of them remakes it once, for all three; an approval of one
    approves all three, and approved.csv lists each as stored."""
    sb = shrunk_sandbox(sandbox, latency_mean_s=2, allow_loopback_urls=True)
    rows = _sandboxed_rows(sb, 5)
    for row in rows[1:4]:
        row["img_url"], row["prompt"] = rows[1]["img_url"], rows[1]["prompt"]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    data = config_data(
        tmp_path, sb.base_url, manifest, api={"time_scale": SCALE},
        manifest={"allow_loopback_urls": True, "defaults": {"seed": 11}},
    )  # fmt: skip
    summary = await go(parse_config(data, tmp_path), [KEY])
    first = {r["row_number"]: r for r in results(summary)}
    assert len({first[n]["prediction_id"] for n in (2, 3, 4)}) == 1 and sb.stats()["creates"] == 3

    decisions = tmp_path / "decisions.csv"
    decisions.write_text("row,decision\n2,rejected\n3,approved\n4,approved\n")
    with pytest.raises(ConfigError) as said:
        await go(parse_config(data, tmp_path), [KEY], reprocess=Reprocess((), decisions=decisions))
    assert "line 2 (rejected, row 2), line 3 (approved, row 3), line 4 (approved, row 4)" in str(
        said.value
    )

    # one rejection, with a prompt that changes the input: one remake, shared by all three
    decisions.write_text("row,decision,note\n3,rejected,glare\n")
    data["manifest"]["prompt_template"] = "Place the product on slate, soft light"
    await go(parse_config(data, tmp_path), [KEY], reprocess=Reprocess((), decisions=decisions))
    second = {r["row_number"]: r for r in results(summary)}
    assert sb.stats()["creates"] == 4
    remake = second[2]["prediction_id"]
    assert remake != first[2]["prediction_id"]
    assert second[3]["prediction_id"] == second[4]["prediction_id"] == remake
    assert second[3]["output_paths"] == second[2]["output_paths"]

    decisions.write_text("row,decision\n4,approved\n")
    await go(parse_config(data, tmp_path), [KEY], reprocess=Reprocess((), decisions=decisions))
    approved = _approved_as_stored(summary.run_dir)
    assert sorted(int(a["row"]) for a in approved) == [2, 3, 4]
    assert {a["prediction_id"] for a in approved} == {remake}


def _approved_as_stored(run_dir: Path) -> list[dict[str, str]]:
    """approved.csv's lines, each checked against its file: that file, that sha256."""
    with (run_dir / "approved.csv").open(encoding="utf-8") as handle:
        approved = list(csv.DictReader(handle))
    for line in approved:
        assert hashlib.sha256(Path(line["path"]).read_bytes()).hexdigest() == line["sha256"]
    return approved


@pytest.mark.anyio
async def test_two_nights_of_review_keep_every_decision_and_pay_for_nothing_twice(
    sandbox: Start, tmp_path: Path
) -> None:
    """Night 1: 40 rows, three of them one shared edit; all decided but three, one row of the
    shared edit rejected and remade with another prompt. Night 2: 10 % changed, 5 % added,
    5 % deleted: only new and changed edits are to review, every unchanged edit keeps its
    decision, approved.csv carries them, and last night's decisions file still applies."""
    sb = shrunk_sandbox(sandbox, latency_mean_s=2, allow_loopback_urls=True)
    rows = _sandboxed_rows(sb, 40)
    for row in rows[11:14]:  # SKU-12, 13 and 14 send one input: one edit
        row["img_url"], row["prompt"] = rows[11]["img_url"], rows[11]["prompt"]
    manifest = write_manifest(tmp_path / "export.csv", rows)
    data = config_data(
        tmp_path, sb.base_url, manifest, api={"time_scale": SCALE},
        manifest={"allow_loopback_urls": True, "defaults": {"seed": 3}},
        incremental={"enabled": True, "state": str(tmp_path / "state.sqlite")},
        output={"dir": str(tmp_path / "night1")},
    )  # fmt: skip
    night1 = await go(parse_config(data, tmp_path), [KEY])
    made = {r["job_id"]: r for r in results(night1)}
    decided = {f"SKU-{n}": "approved" for n in range(1, 38)} | {"SKU-13": "rejected"}
    decisions = _decisions_file(tmp_path, made, decided)
    with pytest.raises(ConfigError, match="judge one edit"):  # 12 and 14 approved, 13 not
        await go(parse_config(data, tmp_path), [KEY], reprocess=Reprocess((), decisions=decisions))
    del decided["SKU-12"], decided["SKU-14"]
    decisions = _decisions_file(tmp_path, made, decided)
    data["manifest"]["prompt_template"] = "{prompt}, on slate"
    await go(parse_config(data, tmp_path), [KEY], reprocess=Reprocess((), decisions=decisions))
    redone = {r["job_id"]: r for r in results(night1)}
    remake = redone["SKU-13"]["prediction_id"]
    assert {redone[f"SKU-{n}"]["prediction_id"] for n in (12, 13, 14)} == {remake}
    creates = sb.stats()["creates"]
    assert creates == 38 + 1  # 38 inputs, and one remake for the three rows that share it
    approved = {a["job_id"] for a in _approved_as_stored(night1.run_dir)}
    assert approved == {f"SKU-{n}" for n in range(1, 38)} - {"SKU-12", "SKU-13", "SKU-14"}
    del data["manifest"]["prompt_template"]  # tonight maps the rows as the export writes them

    # night 2: SKU-1 and SKU-2 deleted, SKU-20..23 changed, NEW-1 (SKU-1's picture and
    # prompt) and NEW-2 added; every row moves up
    tonight = [dict(r) for r in rows[2:]]
    for row in tonight[17:21]:
        row["prompt"] += " (new season)"
    tonight += [dict(rows[0], sku="NEW-1"), dict(rows[1], sku="NEW-2", prompt="brand new")]
    write_manifest(manifest, tonight)
    data["output"]["dir"] = str(tmp_path / "night2")
    night2 = await go(parse_config(data, tmp_path), [KEY])
    second = {r["job_id"]: r for r in results(night2)}
    changed = {f"SKU-{n}" for n in range(20, 24)}
    assert sb.stats()["creates"] - creates == len(changed) + 1  # and NEW-2; nothing else
    to_review = {j for j, r in second.items() if r["review"] is None}
    shared = {"SKU-12", "SKU-13", "SKU-14"}  # the remake, not judged yet
    assert to_review == changed | shared | {"NEW-2", "SKU-38", "SKU-39", "SKU-40"}
    assert second["SKU-13"]["prediction_id"] == remake and second["SKU-13"]["reused"]
    assert second["NEW-1"]["review"] == "approved"  # SKU-1's approved edit, reused
    carried = {a["job_id"] for a in _approved_as_stored(night2.run_dir)}
    assert carried == set(second) - to_review
    # last night's file still applies, though every row moved: the deleted products' lines
    # are left out, the rejected edit's (it was made again since) too; nothing is sent
    again = await go(
        parse_config(data, tmp_path), [KEY], reprocess=Reprocess((), decisions=decisions)
    )
    assert again.exit_code is ExitCode.OK and sb.stats()["creates"] == creates + 5
    assert {a["job_id"] for a in _approved_as_stored(night2.run_dir)} == carried


def _decisions_file(tmp_path: Path, made: dict[str, Any], decided: dict[str, str]) -> Path:
    """decisions.csv as the review page exports it."""
    path = tmp_path / "decisions.csv"
    lines = ["job_id,row,prediction_id,decision,note"]
    for job_id, word in decided.items():
        r = made[job_id]
        lines.append(f"{job_id},{r['row_number']},{r['prediction_id']},{word},")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.anyio
async def test_a_merchandiser_reviews_256_rows_in_at_most_300_key_presses(
    sandbox: Start, tmp_path: Path, browser: Browser
) -> None:
    """Approve most, reject 10 with a note, by keyboard alone: a decision moves on, `r` opens
    the note and Enter moves on; the view stays put as rows are decided; the current row
    survives a reload. Key presses counted (a note's letters apart)."""
    sb = shrunk_sandbox(sandbox, latency_mean_s=2, allow_loopback_urls=True)
    data = _review_config(tmp_path, sb, 256, one_photo=True)  # the keys are what is judged
    summary = await go(parse_config(data, tmp_path), [KEY, KEY2])
    page, errors = await _open_report(browser, summary.run_dir, 1440)
    assert await page.locator("#decided").input_value() == "open"  # what needs a person
    rejected = {7, 31, 64, 99, 100, 101, 150, 200, 201, 256}
    await _row(page, 1).locator(".meta-box").click()
    keys = letters = 0
    for row in range(1, 257):
        await page.wait_for_selector(f'article.entry.current[data-row="{row}"]')
        if row == 130:  # a reload keeps the row the reviewer is on
            await page.reload()
            await page.wait_for_selector('article.entry.current[data-row="130"]')
        if row in rejected:
            note = f"glare {row}"
            await page.keyboard.press("r")
            await page.keyboard.type(note)
            await page.keyboard.press("Enter")
            keys, letters = keys + 2, letters + len(note)
        else:
            await page.keyboard.press("a")
            keys += 1
    assert (
        "approved 246 \u00b7 rejected 10 \u00b7 to review 0"
        in await page.locator("#tally").inner_text()
    )
    print(f"256 rows reviewed in {keys} key presses (and {letters} letters of notes)")
    assert keys <= 300
    exported = await _exported(page, tmp_path / "decisions.csv")
    with exported.open(newline="") as handle:
        lines = {int(d["row"]): (d["decision"], d["note"]) for d in csv.DictReader(handle)}
    assert {r for r, (d, _) in lines.items() if d == "rejected"} == rejected
    assert all(lines[r][1] == f"glare {r}" for r in rejected)
    assert len(lines) == 256 and errors == []


@pytest.mark.anyio
async def test_approve_shown_approves_the_filtered_rows_after_a_confirmation(
    sandbox: Start, tmp_path: Path, browser: Browser
) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2, allow_loopback_urls=True)
    summary = await go(parse_config(_review_config(tmp_path, sb, 30), tmp_path), [KEY])
    page, errors = await _open_report(browser, summary.run_dir, 1440)
    await page.fill("#q", "edit number 2")  # rows 2 and 20-29
    await page.wait_for_selector('article.entry[data-row="29"]')
    asked: list[str] = []

    async def answer(dialog: Any) -> None:
        asked.append(dialog.message)
        await dialog.accept()

    page.on("dialog", answer)
    await page.locator("#bulk").click()
    await page.wait_for_function(
        "document.getElementById('tally').textContent.includes('approved 11')"
    )
    assert asked == ["Approve the 11 undecided edits shown?"]
    assert "to review 19" in await page.locator("#tally").inner_text() and errors == []


@pytest.mark.anyio
async def test_the_page_judges_rows_that_share_an_edit_together(
    sandbox: Start, tmp_path: Path, browser: Browser
) -> None:
    sb = shrunk_sandbox(sandbox, latency_mean_s=2, allow_loopback_urls=True)
    rows = _sandboxed_rows(sb, 5)
    for row in rows[1:4]:  # rows 2, 3 and 4: one seeded input, one edit
        row["img_url"], row["prompt"] = rows[1]["img_url"], rows[1]["prompt"]
    data = config_data(
        tmp_path, sb.base_url, write_manifest(tmp_path / "m.csv", rows),
        api={"time_scale": SCALE},
        manifest={"allow_loopback_urls": True, "defaults": {"seed": 11}},
    )  # fmt: skip
    summary = await go(parse_config(data, tmp_path), [KEY])
    page, errors = await _open_report(browser, summary.run_dir, 1440)
    # one item for the three rows: the first, listing them
    assert await _row(page, 3).count() == 0 and await _row(page, 4).count() == 0
    assert "one edit for rows 2, 3, 4: judged together" in await _row(page, 2).inner_text()
    await _row(page, 2).locator("button.reject").click()
    await _row(page, 2).locator("input.note").fill("=glare+1")  # a formula, to a spreadsheet
    tally = await page.locator("#tally").inner_text()
    assert "rejected 3" in tally and "to review 2" in tally
    exported = await _exported(page, tmp_path / "decisions.csv")
    with exported.open(newline="") as handle:
        lines = {int(d["row"]): (d["decision"], d["note"]) for d in csv.DictReader(handle)}
    assert lines == {n: ("rejected", "'=glare+1") for n in (2, 3, 4)} and errors == []
    assert {d.note for d in read_decisions(exported)} == {"=glare+1"}  # read back as written
    # the file the page wrote is one the run takes: one remake for the three rows
    data["manifest"]["prompt_template"] = "Place the product on slate"
    await go(parse_config(data, tmp_path), [KEY], reprocess=Reprocess((), decisions=exported))
    assert sb.stats()["creates"] == 3 + 1
