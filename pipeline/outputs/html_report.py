"""report.html: one page a person can glance at in the morning, written into the run folder at
the end of every run and by `wanbatch report RUN_DIR`.

It opens offline: styles, script and the rows' data are inside the file, and the thumbnails
are local files in `report-thumbs/` beside it (made from the stored images, never hot-linked).
Totals sit at the top; the rows are drawn a page at a time by the page's own script, filtered
by status, decision or text, so 100,000 rows stay usable. The address keeps the view
(`report.html#status=failed&page=2`).

It is also where a person reviews the edits (report_page.html holds the page): each image
opens at full size, the input beside an output (before/after); the keys move from row to row
and approve or reject, with a note; the decisions are kept in the browser and exported as
decisions.csv, which `wanbatch retry RUN_DIR --rejected decisions.csv` takes.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import html
import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.core import (
    DECISION_COLUMNS,
    IMAGE_FIELDS,
    REPORT,
    THUMBS,
    Status,
    input_thumb,
    output_thumb,
    write_thumb,
)
from pipeline.journal import Journal, ReportRow

__all__ = ["write_report"]

_TEXT = 300  # characters of a prompt or an error kept in the page
_BACKFILL = 5_000  # output thumbnails a report may make from stored copies (reused rows)


# a row's fields in the page's data, by position (the page maps the names: `F`)
_FIELDS = (
    "row",
    "id",
    "status",
    "cost",
    "prompt",
    "error",
    "input",
    "outputs",
    "inputFull",
    "outputsFull",
    "refs",
    "columns",
    "job",
    "prediction",
    "review",
    "reviewNote",
    "earlier",
    "reused",
    "flags",
)


def _href(value: object) -> str | None:
    """A link the page may follow: an http(s) URL, or None (a `javascript:` or `data:` URL a
    manifest or the provider gave is never made a link)."""
    if isinstance(value, str) and urlsplit(value).scheme.lower() in ("http", "https"):
        return value
    return None


def _full_size(path: str | None, url: str | None) -> str | None:
    """Where an output opens at full size: its stored copy (relative to the report when it is
    in the run folder), else the provider's URL."""
    if path and "://" not in path:
        local = Path(path)
        return local.as_uri() if local.is_absolute() else local.as_posix()
    return _href(url)


def _entry(
    row: ReportRow,
    id_column: str | None,
    thumbs: set[str],
    backfill: list[Any],
    columns: Sequence[str] = (),
) -> list[Any]:
    """One row as the page's compact array, in `_FIELDS` order (the page reads it by those
    names): row, id, status, cost, prompt, error, input thumbnail, output thumbnails (None
    where there is none), then what opens at full size (the input, each output), the reference
    images, the catalog columns the config names, and what a review needs: the job id and
    prediction judged, the decision recorded on it and its note, and the note of the rejected
    edit this one remakes (None when it remakes none)."""
    number = row.row_number
    first = row.inputs.get("img_url")
    source = input_thumb(first) if isinstance(first, str) else None
    outputs = []
    for index, path in enumerate(row.output_paths):
        name = output_thumb(number, index)
        if name not in thumbs and path:
            backfill.append((name, path))
        outputs.append(name)
    error = row.error_message or ""
    if row.error_type:
        error = f"{row.error_type}: {error}"
    urls = list(row.output_urls) + [None] * len(row.output_paths)
    full = [_full_size(path, urls[index]) for index, path in enumerate(row.output_paths)]
    if not row.output_paths:
        full = [_href(url) for url in row.output_urls]
    fields = {
        "row": number,
        "id": str(row.record.get(id_column, "")) if id_column else row.job_id,
        "status": row.status.value,
        "cost": row.cost_usd,
        "prompt": str(row.inputs.get("prompt") or "")[:_TEXT],
        "error": error[:_TEXT],
        "input": source if source in thumbs else None,
        "outputs": outputs,
        "inputFull": _href(first),
        "outputsFull": full,
        "refs": [_href(row.inputs.get(f)) for f in IMAGE_FIELDS[1:] if _href(row.inputs.get(f))],
        "columns": [
            (c, str(row.record[c])[:_TEXT]) for c in columns if row.record.get(c) is not None
        ],
        "job": row.job_id,
        "prediction": row.prediction_id,
        "review": row.review,
        "reviewNote": row.review_note,
        "earlier": row.rejected_note,
        "reused": row.reused,
        "flags": None if row.flags is None else list(row.flags),
    }
    return [fields[name] for name in _FIELDS]


def _backfill(folder: Path, run_dir: Path, wanted: list[Any], thumbs: set[str]) -> None:
    """Thumbnails of outputs stored as local files (reused rows point at earlier copies)."""
    for name, path in wanted:
        local = Path(path) if Path(path).is_absolute() else run_dir / path
        if "://" in path or not local.is_file():
            continue
        with contextlib.suppress(OSError, ValueError):
            write_thumb(folder, name, local.read_bytes())
            thumbs.add(name)


# what may not appear as itself inside a <script> element's text: `<` starts `</script>` and the
# `<!--<script>` states that swallow the rest of the page, `>` and `&` are escaped alongside,
# and U+2028/U+2029 end a line in older script parsers; each becomes the JSON escape of itself
_SCRIPT_UNSAFE = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


@functools.cache
def _page() -> str:
    """The page around the data: styles and script, in report_page.html beside this module."""
    return resources.files(__package__).joinpath("report_page.html").read_text(encoding="utf-8")


def script_safe(data: str) -> str:
    """JSON text made safe to embed in a <script> element: the same value once parsed, whatever
    a manifest, a prompt or the provider put in it."""
    return data.translate(_SCRIPT_UNSAFE)


def write_report(
    journal: Journal, run_dir: Path, id_column: str | None, columns: Sequence[str] = ()
) -> Path:
    """report.html from the journal, replaced whole; `columns`: the catalog columns shown
    beside each row (`report.columns`). Written a batch of rows at a time: its memory is a
    batch's, whatever the catalog's size."""
    folder = run_dir / THUMBS
    thumbs = set(os.listdir(folder)) if folder.is_dir() else set()
    totals = journal.reports.totals()
    head = {
        "run": str(run_dir),
        "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "rows": int(totals["rows"]),
        "counts": journal.reports.counts(),
        "images": int(totals["images"]),
        "cost": totals["cost_usd"],
        "duplicates": int(totals["possible_duplicate_charges"]),
        "reused": int(totals["reused"]),
        "thumbs": THUMBS,
        "statuses": [s.value for s in Status],  # the one status vocabulary, in its order
        "decisionColumns": DECISION_COLUMNS,  # the decisions file retry --rejected reads
        "fields": _FIELDS,  # the names of each row's positions
    }
    page = _page().replace("__TITLE__", html.escape(f"wanbatch report: {run_dir.name}"))
    before, _, after = page.partition("__DATA__")
    path = run_dir / REPORT
    tmp = run_dir / f".{REPORT}.tmp"
    try:
        _write_rows(tmp, journal, run_dir, id_column, columns, thumbs, (before, head, after))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone once renamed; a failed write leaves nothing
    return path


def _write_rows(
    tmp: Path,
    journal: Journal,
    run_dir: Path,
    id_column: str | None,
    columns: Sequence[str],
    thumbs: set[str],
    page: tuple[str, dict[str, Any], str],
) -> None:
    """The page into `tmp`, its rows a batch at a time."""
    before, head, after = page
    folder = run_dir / THUMBS
    encode = json.JSONEncoder(separators=(",", ":")).encode
    at = _FIELDS.index("outputs")
    backfilled = 0  # thumbnails made from stored copies, at most _BACKFILL a report
    with tmp.open("w", encoding="utf-8") as out:
        out.write(before + script_safe('{"head":' + encode(head) + ',"rows":['))
        first = True
        for batch in journal.reports.report_rows(1000):
            wanted: list[Any] = []
            rows = [_entry(r, id_column, thumbs, wanted, columns) for r in batch]
            if wanted and backfilled < _BACKFILL:
                _backfill(folder, run_dir, wanted[: _BACKFILL - backfilled], thumbs)
                backfilled += len(wanted)
            for row in rows:
                row[at] = [name if name in thumbs else None for name in row[at]]
                out.write(("" if first else ",") + script_safe(encode(row)))
                first = False
        out.write("]}" + after)
