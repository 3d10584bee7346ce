"""Results out of the journal: `results.parquet` (one row per manifest row) and the failures
manifest (the failed and rejected rows, in the input's own columns and format, ready to be run
again). Both are written to a temporary file and moved into place, so a reader never sees half.

The manifest's other columns ride along ("passthrough"). From a Parquet manifest they are read
again from the file, in step with the journal's pages, so they keep their Arrow types (an int id
stays an int, a list a list); from a CSV manifest they are the text the journal kept.
"""

from __future__ import annotations

import csv
import json
import os
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

from pipeline.core import FAILURES, IMAGE_FIELDS, RULES, UPLOAD_TOKEN, located, to_int, to_sheet
from pipeline.journal import Journal

if TYPE_CHECKING:
    import sqlite3

__all__ = [
    "RESULTS_ROWS",
    "RESULTS_RUN_ID",
    "RESULTS_SUCCEEDED",
    "ResultLayout",
    "Written",
    "write_failures",
    "write_images",
    "write_results",
]

# the results file's own metadata, which the run folder's check compares with the journal
RESULTS_RUN_ID = b"wanbatch.run_id"
RESULTS_ROWS = b"wanbatch.rows"
RESULTS_SUCCEEDED = b"wanbatch.succeeded"


@dataclass(frozen=True, slots=True)
class ResultLayout:
    """What the results need to know of the manifest."""

    id_column: str | None
    columns: dict[str, str]  # API field -> manifest column
    extra_columns: list[str]
    manifest_columns: list[str]
    manifest_kind: str
    manifest_path: Path

    @property
    def passthrough(self) -> list[str]:
        """The manifest columns the results carry as they are: the id column, then the others."""
        return ([self.id_column] if self.id_column else []) + self.extra_columns

    @property
    def typed(self) -> bool:
        """Passthrough columns keep the manifest's own Arrow types (Parquet); CSV's are text."""
        return self.manifest_kind == "parquet"


_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
_PREFIX = "manifest_"  # a manifest column named like a results column is kept under this prefix
_INT64 = (-(2**63), 2**63 - 1)
_TS = pa.timestamp("us", tz="UTC")
# the earlier outcomes of a row that `wanbatch retry` ran again, oldest first
_HISTORY = pa.list_(
    pa.struct(
        [
            pa.field("status", pa.string()),
            pa.field("error_type", pa.string()),
            pa.field("error_message", pa.string()),
            pa.field("prediction_id", pa.string()),
            pa.field("attempts", pa.int64()),
            pa.field("finished_at", _TS),
            # an edit a reviewer rejected (`retry --rejected`): what it was, and the word on it
            pa.field("cost_usd", pa.float64()),
            pa.field("output_urls", pa.list_(pa.string())),
            pa.field("output_paths", pa.list_(pa.string())),
            pa.field("prompt", pa.string()),
            pa.field("seed", pa.int64()),
            pa.field("review", pa.string()),
            pa.field("review_note", pa.string()),
            pa.field("rejected_by", pa.string()),  # review (a person) or checks
            pa.field("checks_failed", pa.list_(pa.string())),
        ]
    )
)


@dataclass(frozen=True, slots=True)
class _Plan:
    """The results' columns: ours, then the manifest's passthrough columns under their own
    names, or with `manifest_` in front (as often as needed) where ours or an earlier one has
    the name. `lines` is the part built from JSON lines, `typed` the columns read from a
    Parquet manifest (manifest column, results name), `manifest` their types in the manifest."""

    schema: pa.Schema
    lines: pa.Schema
    parsed: pa.Schema  # `lines` as Arrow's JSON reader parses them (timestamps as int64)
    text: list[tuple[str, str]]
    typed: list[tuple[str, str]]
    manifest: pa.Schema | None


def _plan(layout: ResultLayout) -> _Plan:
    base = _base_fields()
    names = _passthrough_names(layout, base)
    if layout.typed:
        manifest = pq.read_schema(layout.manifest_path)
        own = pa.schema([manifest.field(column) for column, _ in names])
        typed = [pa.field(name, own.field(column).type) for column, name in names]
        lines = pa.schema(base)
        schema = _id_third(layout, pa.schema(base + typed))
        return _Plan(schema, lines, _parsed(lines), [], names, own)
    lines = _id_third(layout, pa.schema(base + [pa.field(name, pa.string()) for _, name in names]))
    return _Plan(lines, lines, _parsed(lines), names, [], None)


def _id_third(layout: ResultLayout, schema: pa.Schema) -> pa.Schema:
    """The id column right after job_id and row_number, when it kept its own name."""
    if layout.id_column is None or layout.id_column in _OURS:
        return schema
    at = schema.get_field_index(layout.id_column)
    return schema.remove(at).insert(2, schema.field(at))


def _parsed(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_type(_as_micros(f.type)) for f in schema])


def _base_fields() -> list[pa.Field]:
    return [
        pa.field("job_id", pa.string()),
        pa.field("row_number", pa.int64()),
        pa.field("prompt", pa.string()),
        pa.field("img_urls", pa.list_(pa.string())),
        pa.field("size", pa.string()),
        pa.field("n", pa.int64()),
        pa.field("seed", pa.int64()),
        pa.field("status", pa.string()),
        pa.field("prediction_id", pa.string()),
        pa.field("output_urls", pa.list_(pa.string())),
        pa.field("output_paths", pa.list_(pa.string())),
        pa.field("output_sha256", pa.list_(pa.string())),
        pa.field("output_bytes", pa.list_(pa.int64())),
        pa.field("output_width", pa.list_(pa.int64())),
        pa.field("output_height", pa.list_(pa.int64())),
        pa.field("outputs_status", pa.string()),
        pa.field("images", pa.int64()),
        pa.field("cost_usd", pa.float64()),  # the provider's figure where given, else priced
        pa.field("provider_cost_usd", pa.float64()),  # `metrics.cost`, when a poll gave it
        pa.field("priced_cost_usd", pa.float64()),  # api.price_per_image_usd times images
        pa.field("unconfirmed", pa.bool_()),  # created, and no poll saw it end: may be billed
        pa.field("predict_time_s", pa.float64()),
        pa.field("latency_s", pa.float64()),
        pa.field("attempts", pa.int64()),
        pa.field("ambiguous_creates", pa.int64()),
        pa.field("possible_duplicate_charge", pa.bool_()),  # a lost create left unresolved
        pa.field("create_resolution", pa.string()),  # how the last lost create was (RESOLUTIONS)
        pa.field("served_by", pa.string()),  # a fallback chain's backup model that served it
        pa.field("reused", pa.bool_()),
        pa.field("error_type", pa.string()),
        pa.field("error_code", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("cancel_accepted", pa.bool_()),
        pa.field("created_at", _TS),
        pa.field("finished_at", _TS),
        pa.field("key", pa.string()),
        pa.field("review", pa.string()),  # a reviewer's word on this edit: approved, rejected
        pa.field("review_note", pa.string()),
        # the automatic checks on the row's images: all passed; the rules any failed (null:
        # not measured)
        pa.field("checks_passed", pa.bool_()),
        pa.field("checks_failed", pa.list_(pa.string())),
        pa.field("history", _HISTORY),
    ]


_OURS = frozenset(f.name for f in _base_fields())


def _passthrough_names(layout: ResultLayout, fields: list[pa.Field]) -> list[tuple[str, str]]:
    """Each passthrough column and its results name: its own unless one of ours has it, else
    `manifest_` in front, as often as needed for a name no other column has."""
    # compared in any letter case: a shop's `Status` beside our `status` is renamed too, since
    # DuckDB, Excel and many warehouses fold the case of column names
    ours = {f.name.lower() for f in fields}
    taken = ours | {c.lower() for c in layout.passthrough if c.lower() not in ours}
    names = []
    for column in layout.passthrough:
        name = column
        if name.lower() in ours:
            while name.lower() in taken:
                name = f"{_PREFIX}{name}"
            taken.add(name.lower())
        names.append((column, name))
    return names


def _as_int(value: Any) -> int | None:
    """An int64 value for the results, or None (a rejected row may say anything)."""
    number = to_int(value)
    if number is not None and _INT64[0] <= number <= _INT64[1]:
        return number
    return None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _result_line(row: sqlite3.Row, layout: ResultLayout, plan: _Plan, run_dir: Path) -> str:
    """One results row as a JSON line: the journal's `outcome` object, with the columns that
    come from the row's inputs (or, for a rejected row, from what the manifest said) added."""
    # the record is read only where it is needed: a Parquet manifest's columns come from the file
    record = json.loads(row["record"]) if plan.text or row["inputs"] is None else {}
    if row["inputs"] is not None:
        inputs = json.loads(row["inputs"])
    else:  # a rejected row: show what the manifest said
        inputs = {f: record.get(c) for f, c in layout.columns.items()}
    if row["inputs"] is not None and UPLOAD_TOKEN in row["inputs"]:
        # an uploaded input is shown as the manifest gave it (a path or an object URL)
        record = record or json.loads(row["record"])
        for field, value in list(inputs.items()):
            if isinstance(value, str) and value.startswith(UPLOAD_TOKEN):
                inputs[field] = record.get(layout.columns.get(field, ""), value)
    out: dict[str, Any] = {
        "prompt": _text(inputs.get("prompt")),
        "img_urls": [str(inputs[f]) for f in IMAGE_FIELDS if inputs.get(f)],
        "size": _text(inputs.get("size")),
        "n": _as_int(inputs.get("n")),
        # the seed the edit was made with: the row's, or the one drawn for it
        "seed": _as_int(inputs.get("seed", row["sent_seed"])),
        "history": _history(row["history"], run_dir),
    }
    out.update(_stored(row["stored"], run_dir))
    for column, name in plan.text:
        out[name] = _text(record.get(column))
    outcome: str = row["outcome"]
    return f"{outcome[:-1]},{_ENCODE(out)[1:]}"


def _stored(text: str | None, run_dir: Path) -> dict[str, Any]:
    """The columns of a row's stored outputs, from the journal's images of it."""
    found = json.loads(text) if text else {}
    states: list[str] = found.get("state") or []
    status = None
    if states:
        status = (
            "stored"
            if all(s == "stored" for s in states)
            else ("pending_download" if "pending" in states else "failed_download")
        )
    return {
        # one kind for every row: absolute, or an object URL (None where not stored)
        "output_paths": [
            None if p is None else located(p, run_dir) for p in found.get("path") or []
        ],
        "output_sha256": found.get("sha256") or [],
        "output_bytes": found.get("bytes") or [],
        "output_width": found.get("width") or [],
        "output_height": found.get("height") or [],
        "outputs_status": status,
        **_row_checks(found.get("failed") or []),
    }


def _row_checks(per_image: list[str | None]) -> dict[str, Any]:
    """A row's checks from its images' (each a JSON list of failed rules, or None): null
    until every image was measured."""
    if not per_image or any(f is None for f in per_image):
        return {"checks_passed": None, "checks_failed": None}
    failed = sorted({rule for f in per_image for rule in json.loads(f or "[]")})
    return {"checks_passed": not failed, "checks_failed": failed}


def _micros(seconds: float | None) -> int | None:
    """A journal time (epoch seconds) as a Parquet timestamp (epoch microseconds)."""
    return int(seconds * 1e6) if seconds else None


_HISTORY_FIELDS = frozenset(field.name for field in _HISTORY.value_type)


def _history(text: str | None, run_dir: Path) -> list[dict[str, Any]]:
    if not text:
        return []
    return [
        {
            **{k: v for k, v in h.items() if k in _HISTORY_FIELDS},  # the journal's own kept out
            "finished_at": _micros(h.get("finished_at")),
            "output_paths": [None if p is None else located(p, run_dir) for p in paths]
            if (paths := h.get("output_paths")) is not None
            else None,
        }
        for h in json.loads(text)
    ]


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one step."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _as_micros(kind: pa.DataType) -> pa.DataType:
    """`kind` with its timestamps as int64 microseconds, the form they are parsed in."""
    if pa.types.is_timestamp(kind):
        return pa.int64()
    if pa.types.is_list(kind):
        return pa.list_(_as_micros(kind.value_type))
    if pa.types.is_struct(kind):
        return pa.struct([f.with_type(_as_micros(f.type)) for f in kind])
    return kind


def _to_table(lines: list[str], schema: pa.Schema, parsed: pa.Schema) -> pa.Table:
    """JSON lines as a table, through Arrow's JSON reader: building arrays from Python objects
    (`Table.from_pylist`) makes pyarrow import pandas, about 0.4 s of CPU per run. The int64
    microseconds parsed are then seen as the timestamps they are (a view: a cast would import
    pyarrow.compute, 0.06-0.09 CPU-s a process)."""
    data = "\n".join(lines).encode()
    table = pj.read_json(
        pa.BufferReader(data),
        read_options=pj.ReadOptions(use_threads=False, block_size=len(data) + 1),
        parse_options=pj.ParseOptions(explicit_schema=parsed, unexpected_field_behavior="error"),
    ).select(schema.names)
    columns = [_seen_as(table.column(i), field.type) for i, field in enumerate(schema)]
    return pa.Table.from_arrays(columns, schema=schema)


def _seen_as(column: pa.ChunkedArray, kind: pa.DataType) -> pa.ChunkedArray:
    """`column` as `kind`, of the same layout (int64 microseconds as timestamps, also inside
    lists and structs)."""
    if column.type == kind:
        return column
    return pa.chunked_array([chunk.view(kind) for chunk in column.chunks], type=kind)


class _ManifestRows:
    """Columns of a Parquet manifest for given row numbers (ascending from call to call), read
    in step with the journal's pages, so they keep their Arrow types. A row the file does not
    have, or can no longer give, comes out null; `problem` says why when the file failed."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self._schema = schema
        self._batches = pq.ParquetFile(path).iter_batches(batch_size=4096, columns=schema.names)
        self._held: deque[pa.RecordBatch] = deque()  # the batches from row `_first` on
        self._first = 1
        self._rows = 0  # rows held
        self._done = False
        self.problem: str | None = None

    def take(self, numbers: list[int]) -> pa.Table:
        while not self._done and self._first + self._rows <= numbers[-1]:
            try:
                batch = next(self._batches)
            except StopIteration:
                self._done = True
            except (pa.ArrowException, OSError) as exc:
                self.problem, self._done = str(exc), True
            else:
                self._held.append(batch)
                self._rows += batch.num_rows
        while self._held and self._first + self._held[0].num_rows <= numbers[0]:
            gone = self._held.popleft().num_rows  # every row still wanted comes after it
            self._first += gone
            self._rows -= gone
        held = pa.Table.from_batches(list(self._held)).cast(self._schema) if self._held else None
        at = [n - self._first if n - self._first < self._rows else None for n in numbers]
        if held is None:
            return self._schema.empty_table().take(pa.array([None] * len(numbers), pa.int64()))
        return held.take(pa.array(at, pa.int64()))


def _results_meta(journal: Journal) -> dict[bytes, bytes]:
    """Whose results these are, how many rows they hold and how many succeeded: what the run
    folder's check compares with the journal before a later run sends anything."""
    counts = journal.reports.counts()
    return {
        RESULTS_RUN_ID: (journal.get_meta("run_id") or "").encode(),
        RESULTS_ROWS: str(sum(counts.values())).encode(),
        # successes ever made, rejected edits included: a review's remakes send rows back
        RESULTS_SUCCEEDED: str(journal.reviews.edits_made()).encode(),
    }


@dataclass(frozen=True, slots=True)
class Written:
    rows: int
    problem: str | None = None  # why passthrough columns are null past some row, if they are


def write_results(journal: Journal, layout: ResultLayout, path: Path) -> Written:
    """Write every journaled job as one results row."""
    plan = _plan(layout)
    manifest = None if plan.manifest is None else _ManifestRows(layout.manifest_path, plan.manifest)
    count = 0
    meta = _results_meta(journal)
    with _atomic(path) as tmp, pq.ParquetWriter(tmp, plan.schema.with_metadata(meta)) as out:
        for batch in journal.reports.result_rows():
            lines = [_result_line(r, layout, plan, path.parent) for r in batch]
            table = _to_table(lines, plan.lines, plan.parsed)
            if manifest is not None:
                columns = manifest.take([r["row_number"] for r in batch]).columns
                for (_, name), column in zip(plan.typed, columns, strict=True):
                    table = table.append_column(plan.schema.field(name), column)
                table = table.select(plan.schema.names)
            out.write_table(table)
            count += len(batch)
        if count == 0:
            out.write_table(plan.schema.empty_table())
    return Written(count, None if manifest is None else manifest.problem)


# why each row of the failures manifest failed, after the input's own columns; a failures
# manifest run again and failing again gets these anew, not twice
REASONS = ("wanbatch_status", "wanbatch_error_type", "wanbatch_error_message")


def _reasons(row: sqlite3.Row) -> list[str]:
    return [row["status"], row["error_type"] or "", row["error_message"] or ""]


def write_failures(journal: Journal, layout: ResultLayout, run_dir: Path) -> Path | None:
    """The failed and rejected rows as a manifest of the input's columns, with why each failed
    (REASONS) after them; None if there are none."""
    suffix = layout.manifest_kind  # csv, tsv or parquet: feed it back as it came
    path = run_dir / f"{FAILURES}.{suffix}"
    pages = journal.reports.failed_records()
    first = next(pages, None)
    if first is None:
        path.unlink(missing_ok=True)
        return None
    columns = [c for c in layout.manifest_columns if c not in REASONS]
    with _atomic(path) as tmp:
        if suffix != "parquet":
            with tmp.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle, delimiter="\t" if suffix == "tsv" else ",")
                writer.writerow([*columns, *REASONS])
                for page in (first, *pages):
                    for row in page:
                        record = json.loads(row["record"])
                        values = ["" if record.get(c) is None else record[c] for c in columns]
                        writer.writerow([to_sheet(v) for v in (*values, *_reasons(row))])
        else:  # the rows as the manifest file has them, with its own types
            own = pq.read_schema(layout.manifest_path)
            kept = pa.schema([f for f in own if f.name not in REASONS])
            schema = kept.append(pa.field(REASONS[0], pa.string()))
            schema = schema.append(pa.field(REASONS[1], pa.string()))
            schema = schema.append(pa.field(REASONS[2], pa.string()))
            rows = _ManifestRows(layout.manifest_path, kept)
            with pq.ParquetWriter(tmp, schema) as out:
                for page in (first, *pages):
                    table = rows.take([r["row_number"] for r in page])
                    reasons = [_reasons(r) for r in page]
                    for at, name in enumerate(REASONS):
                        values = [reason[at] for reason in reasons]
                        table = table.append_column(name, pa.array(values, pa.string()))
                    out.write_table(table)
    return path


def _image_schema(layout: ResultLayout) -> tuple[pa.Schema, pa.Schema | None]:
    """images.parquet's columns, and the id column's own type when a Parquet manifest has it."""
    id_field: list[pa.Field] = []
    own = None
    if layout.id_column is not None:
        name = (
            layout.id_column
            if layout.id_column not in _IMAGE_COLUMNS
            else f"{_PREFIX}{layout.id_column}"
        )
        if layout.typed:
            own = pa.schema([pq.read_schema(layout.manifest_path).field(layout.id_column)])
            id_field = [pa.field(name, own.field(0).type)]
        else:
            id_field = [pa.field(name, pa.string())]
    fields = [
        pa.field("job_id", pa.string()),
        pa.field("row_number", pa.int64()),
        *id_field,
        pa.field("prediction_id", pa.string()),
        pa.field("index", pa.int64()),
        pa.field("url", pa.string()),
        pa.field("path", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("format", pa.string()),
        pa.field("state", pa.string()),
        pa.field("error", pa.string()),
        pa.field("cost_usd", pa.float64()),
        pa.field("priced_cost_usd", pa.float64()),
        *_check_fields(),
    ]
    return pa.schema(fields), own


def _check_fields() -> list[pa.Field]:
    """Each rule's measure and verdict (null where it was not held or not measured), then
    the image's: passed every rule held, and the rules it failed (null: not measured)."""
    fields = []
    for name in RULES:
        fields += [
            pa.field(f"check_{name}", pa.float64()),
            pa.field(f"check_{name}_passed", pa.bool_()),
        ]
    return [
        *fields,
        pa.field("checks_passed", pa.bool_()),
        pa.field("checks_failed", pa.list_(pa.string())),
    ]


def _image_checks(r: sqlite3.Row) -> dict[str, Any]:
    """The check columns of one of the journal's images."""
    values = json.loads(r["checks"]) if r["checks"] else {}
    failed = json.loads(r["checks_failed"]) if r["checks_failed"] is not None else None
    out: dict[str, Any] = {}
    for name in RULES:
        value = values[name][0] if name in values else None
        out[f"check_{name}"] = value
        out[f"check_{name}_passed"] = None if value is None else name not in (failed or [])
    out["checks_passed"] = None if failed is None else not failed
    out["checks_failed"] = failed
    return out


def _image_line(
    r: sqlite3.Row, id_column: tuple[str, str] | None, price: float, run_dir: Path
) -> str:
    """One image's row as a JSON line; with `id_column` (its name here, and the manifest's
    column), the row's id as text."""
    line: dict[str, Any] = {
        "job_id": r["job_id"],
        "row_number": r["row_number"],
        "prediction_id": r["prediction_id"],
        "index": r["idx"],
        "url": r["url"],
        **{n: r[n] for n in ("sha256", "bytes", "width", "height", "format", "state", "error")},
        "path": None if r["path"] is None else located(r["path"], run_dir),
        "cost_usd": 0.0 if r["reused"] else round(r["cost_usd"] / max(1, r["images"]), 6),
        "priced_cost_usd": 0.0 if r["reused"] else price,
        **_image_checks(r),
    }
    if id_column is not None:
        line[id_column[0]] = _text(json.loads(r["record"]).get(id_column[1]))
    return json.dumps(line)


_IMAGE_COLUMNS = frozenset(
    {"job_id", "row_number", "prediction_id", "index", "url", "path", "sha256", "bytes"}
    | {"width", "height", "format", "state", "error", "cost_usd", "priced_cost_usd"}
)


def write_images(journal: Journal, layout: ResultLayout, path: Path, price: float) -> int:
    """One row per output image of a succeeded job, its own cost beside it: its share of the
    job's cost (the provider's figure where given), so the column sums to what the provider
    billed, and our price; the number of images."""
    schema, own = _image_schema(layout)
    manifest = None if own is None else _ManifestRows(layout.manifest_path, own)
    # the id column is read from a Parquet manifest with its own type, the rest as JSON lines
    id_column = None
    if layout.id_column is not None and manifest is None:
        id_column = (schema.names[2], layout.id_column)
    lines = schema if manifest is None else schema.remove(2)
    parsed = _parsed(lines)
    count = 0
    with _atomic(path) as tmp, pq.ParquetWriter(tmp, schema) as out:
        for batch in journal.reports.image_rows():
            table = _to_table(
                [_image_line(r, id_column, price, path.parent) for r in batch], lines, parsed
            )
            if manifest is not None:
                column = manifest.take([r["row_number"] for r in batch]).column(0)
                table = table.add_column(2, schema.field(2), column)
            out.write_table(table)
            count += len(batch)
        if count == 0:
            out.write_table(schema.empty_table())
    return count
