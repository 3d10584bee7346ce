"""report.html: one page a person can glance at in the morning, written into the run folder at
the end of every run and by `wanbatch report RUN_DIR`.

It opens offline: styles, script and the rows' data are inside the file, and the thumbnails
are local files in `report-thumbs/` beside it (made from the stored images, never hot-linked).
Totals sit at the top; the rows are drawn a page at a time by the page's own script, filtered
by status or text, so 100,000 rows stay usable. The address keeps the view
(`report.html#status=failed&page=2`).
"""

from __future__ import annotations

import contextlib
import datetime
import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.core import IMAGE_FIELDS, Status
from pipeline.journal import Journal, ReportRow
from pipeline.outputs.thumbs import THUMBS, input_thumb, output_thumb, write_thumb

__all__ = ["REPORT", "write_report"]

REPORT = "report.html"
_TEXT = 300  # characters of a prompt or an error kept in the page
_BACKFILL = 5_000  # output thumbnails a report may make from stored copies (reused rows)


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
    """One row as the page's compact array: row, id, status, cost, prompt, error, input
    thumbnail, output thumbnails (None where there is none), then what opens at full size (the
    input, each output), the reference images, and the catalog columns the config names."""
    number = row.row_number
    ident = str(row.record.get(id_column, "")) if id_column else row.job_id
    first = row.inputs.get("img_url")
    source = input_thumb(first) if isinstance(first, str) else None
    outputs = []
    for index, path in enumerate(row.output_paths):
        name = output_thumb(number, index)
        if name not in thumbs and path and len(backfill) < _BACKFILL:
            backfill.append((name, path))
        outputs.append(name)
    error = row.error_message or ""
    if row.error_type:
        error = f"{row.error_type}: {error}"
    urls = list(row.output_urls) + [None] * len(row.output_paths)
    full = [_full_size(path, urls[index]) for index, path in enumerate(row.output_paths)]
    if not row.output_paths:
        full = [_href(url) for url in row.output_urls]
    shown = [(c, str(row.record[c])[:_TEXT]) for c in columns if row.record.get(c) is not None]
    return [
        number,
        ident,
        row.status.value,
        row.cost_usd,
        str(row.inputs.get("prompt") or "")[:_TEXT],
        error[:_TEXT],
        source if source in thumbs else None,
        outputs,
        _href(first),
        full,
        [_href(row.inputs.get(f)) for f in IMAGE_FIELDS[1:] if _href(row.inputs.get(f))],
        shown,
    ]


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


def script_safe(data: str) -> str:
    """JSON text made safe to embed in a <script> element: the same value once parsed, whatever
    a manifest, a prompt or the provider put in it."""
    return data.translate(_SCRIPT_UNSAFE)


def write_report(
    journal: Journal, run_dir: Path, id_column: str | None, columns: Sequence[str] = ()
) -> Path:
    """report.html from the journal, replaced whole; `columns`: the catalog columns shown
    beside each row (`report.columns`)."""
    folder = run_dir / THUMBS
    thumbs = set(os.listdir(folder)) if folder.is_dir() else set()
    rows: list[list[Any]] = []
    wanted: list[Any] = []
    for batch in journal.report_rows():
        rows += [_entry(r, id_column, thumbs, wanted, columns) for r in batch]
    if wanted:
        _backfill(folder, run_dir, wanted, thumbs)
    for row in rows:
        row[7] = [name if name in thumbs else None for name in row[7]]
    totals = journal.totals()
    counts = journal.counts()
    head = {
        "run": str(run_dir),
        "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "rows": int(totals["rows"]),
        "counts": counts,
        "images": int(totals["images"]),
        "cost": totals["cost_usd"],
        "duplicates": int(totals["ambiguous_creates"]),
        "reused": int(totals["reused"]),
        "thumbs": THUMBS,
        "statuses": [s.value for s in Status],  # the one status vocabulary, in its order
    }
    data = json.dumps({"head": head, "rows": rows}, separators=(",", ":"))
    page = _PAGE.replace("__TITLE__", html.escape(f"wanbatch report: {run_dir.name}"))
    page = page.replace("__DATA__", script_safe(data))
    path = run_dir / REPORT
    tmp = run_dir / f".{REPORT}.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f6f4;color:#222}
header{background:#20232a;color:#fff;padding:12px 20px}
header h1{font-size:18px;margin:0 0 8px}
.totals{display:flex;flex-wrap:wrap;gap:18px}
.totals div{min-width:90px}.totals b{display:block;font-size:20px}
.bar{display:flex;gap:10px;align-items:center;padding:10px 20px;background:#fff;
border-bottom:1px solid #ddd;position:sticky;top:0}
.entry{display:grid;grid-template-columns:170px 1fr 320px;gap:12px;padding:10px 20px;
border-bottom:1px solid #e4e4e4;background:#fff}
.pics{display:flex;gap:6px;flex-wrap:wrap}
.pics img,.none{width:160px;height:160px;object-fit:contain;background:#eee;border-radius:4px}
.none{display:flex;align-items:center;justify-content:center;color:#888;font-size:12px}
.ref{font-size:12px;align-self:flex-end}
.col{font-size:13px;color:#444}
.status{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;color:#fff}
.succeeded{background:#2e7d32}.failed{background:#c62828}.rejected{background:#6d4c41}
.pending,.creating,.created{background:#757575}
.error{color:#b71c1c}.meta{color:#555;font-size:12px}
</style></head>
<body>
<header><h1>__TITLE__</h1><div class="totals" id="totals"></div></header>
<div class="bar">
<label>Status <select id="status"></select></label>
<input id="q" type="search" placeholder="id, prompt or error">
<button id="prev">&larr;</button><span id="pageinfo"></span><button id="next">&rarr;</button>
</div>
<main id="entries"></main>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const H = DATA.head, ROWS = DATA.rows, PER_PAGE = 100;
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};
function totals() {
  const t = document.getElementById("totals");
  const items = [["rows", H.rows.toLocaleString()]];
  for (const s of H.statuses) {
    if (H.counts[s]) items.push([s, H.counts[s].toLocaleString()]);
  }
  items.push(["images", H.images.toLocaleString()], ["cost", "$" + H.cost.toFixed(2)]);
  items.push(["reused", H.reused.toLocaleString()]);
  items.push(["possible duplicates", H.duplicates.toLocaleString()]);
  for (const [label, value] of items) {
    const d = el("div", "total");
    d.dataset.name = label;
    d.append(el("b", "", value), label);
    t.append(d);
  }
  const m = el("div", "meta", H.run + " \\u2014 " + H.generated);
  t.append(m);
}
function state() {
  const p = new URLSearchParams(location.hash.slice(1));
  return {status: p.get("status") || "all", q: p.get("q") || "", page: +(p.get("page") || 1)};
}
function picture(name, label, href) {
  if (!name && !href) return el("div", "none", label);
  let shown;
  if (name) {
    shown = el("img");
    shown.loading = "lazy";
    shown.src = H.thumbs + "/" + name;
    shown.alt = label;
  } else {
    shown = el("div", "none", label);
  }
  if (!href) return shown;
  const a = el("a", "full");
  a.href = href;  // http(s) or a stored copy: the page's data makes no other link
  a.target = "_blank";
  a.rel = "noopener";
  a.title = "open at full size";
  a.append(shown);
  return a;
}
function entry(r) {
  const [row, id, status, cost, prompt, error, input, outputs, inputFull, outputsFull, refs,
    columns] = r;
  const e = el("article", "entry");
  e.dataset.status = status;
  e.dataset.row = row;
  const src = el("div", "pics");
  src.append(picture(input, "no input preview", inputFull));
  refs.forEach((href, i) => {
    const a = el("a", "ref", "reference " + (i + 2));
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener";
    src.append(a);
  });
  const out = el("div", "pics");
  if (outputs.length === 0) out.append(el("div", "none", "no output"));
  outputs.forEach((o, i) => out.append(picture(o, "not stored", outputsFull[i])));
  const meta = el("div");
  meta.append(el("div", "id", id), el("span", "status " + status, status));
  for (const [name, value] of columns) meta.append(el("div", "col", name + ": " + value));
  meta.append(el("div", "meta", "row " + row + " \\u00b7 $" + Number(cost).toFixed(2)));
  meta.append(el("div", "prompt", prompt));
  if (error) meta.append(el("div", "error", error));
  e.append(src, out, meta);
  return e;
}
function render() {
  const s = state();
  const q = s.q.toLowerCase();
  const shown = ROWS.filter(r => (s.status === "all" || r[2] === s.status) &&
    (!q || (r[1] + " " + r[4] + " " + r[5] + " " + r[11].map(c => c[1]).join(" "))
      .toLowerCase().includes(q)));
  const pages = Math.max(1, Math.ceil(shown.length / PER_PAGE));
  const page = Math.min(Math.max(1, s.page), pages);
  const box = document.getElementById("entries");
  box.replaceChildren(...shown.slice((page - 1) * PER_PAGE, page * PER_PAGE).map(entry));
  document.getElementById("pageinfo").textContent =
    "page " + page + " of " + pages + " (" + shown.length.toLocaleString() + " rows)";
  document.getElementById("status").value = s.status;
  document.getElementById("q").value = s.q;
}
function go(change) {
  const s = Object.assign(state(), change);
  location.hash = new URLSearchParams({status: s.status, q: s.q, page: s.page}).toString();
}
function controls() {
  const select = document.getElementById("status");
  for (const s of ["all", ...H.statuses]) {
    if (s === "all" || H.counts[s]) select.append(new Option(s, s));
  }
  select.onchange = () => go({status: select.value, page: 1});
  document.getElementById("q").oninput = e => go({q: e.target.value, page: 1});
  document.getElementById("prev").onclick = () => go({page: state().page - 1});
  document.getElementById("next").onclick = () => go({page: state().page + 1});
  window.onhashchange = render;
}
totals();
controls();
render();
</script>
</body></html>
"""
